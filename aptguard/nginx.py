"""nginx for production: the same URLs (SPEC §4) served from the same data folder, rendered per install.

nginx reads the snapshot trees directly (sendfile, no Python in the path) and proxies `/`,
`/status` and `/metrics` to `aptguard serve`. It must see a promotion the instant the
current/NAME symlink is swapped, so it resolves every path on every request: no
open_file_cache. The folders come from the store (FileStore.nginx_roots). A path is looked
up in the snapshot's own tree, then in its pool generation (`.pool`), as the embedded server
does; no symlink is followed but the pointer (current/NAME, pins/PIN) and `.pool`
(`disable_symlinks on from=`).
"""

from __future__ import annotations

from pathlib import Path

from aptguard.store import FileStore

# @WORD@ placeholders: nginx's own syntax uses both $ and {}.
MAIN = """\
# aptguard: nginx serving the mirror's URLs from @DATA@.
# Rendered by `aptguard nginx-config`; run with `nginx -c THIS_FILE` (or include the server block).
@USER@worker_processes auto;
pid @RUN@/nginx.pid;
error_log @RUN@/error.log warn;

events {
    worker_connections 1024;
}

http {
    default_type application/octet-stream;
    types { }
    access_log @RUN@/access.log;
    client_body_temp_path @RUN@/body;
    proxy_temp_path @RUN@/proxy;
    fastcgi_temp_path @RUN@/fastcgi;
    uwsgi_temp_path @RUN@/uwsgi;
    scgi_temp_path @RUN@/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    server_tokens off;

@SERVER@}
"""

SERVER = r"""    server {
        listen @LISTEN@;

        # Promotion swaps the current/NAME symlink: look every path up again on every request.
        open_file_cache off;
        # Same conditional semantics as the embedded server (aiohttp): 304 when not newer.
        etag on;
        if_modified_since before;
        autoindex off;
        gzip off;

        # Anything that is not a file of a snapshot is a 404 (apt falls back only on 404).
        error_page 400 403 404 405 =404 /.aptguard-404;
        location = /.aptguard-404 {
            internal;
            default_type text/plain;
            return 200 "404 not found\n";
        }
        log_not_found off;
        # Encoded slashes, backslashes, dots and NULs, and any dot-file or dot segment: refused
        # before decoding, exactly as `aptguard serve` refuses them.
        if ($request_uri ~* "%2f|%5c|%2e|%00|/\.") {
            return 404;
        }

        # For operators: the status page, `status --json` and Prometheus, from `aptguard serve`.
        location = / {
            proxy_pass http://@BACKEND@;
            proxy_set_header Host $http_host;
        }
        location = /status {
            proxy_pass http://@BACKEND@;
            proxy_set_header Host $http_host;
        }
        location = /metrics {
            proxy_pass http://@BACKEND@;
            proxy_set_header Host $http_host;
        }

        # A path is the snapshot's own tree's file, else its pool generation's (`.pool`): no
        # symlink is followed below the pointer or `.pool` (`disable_symlinks on from=`).
        location ~ "^/snapshots/(?<ag_name>[A-Za-z0-9_+~:%@=,-][^/]*)/(?<ag_id>[A-Za-z0-9_+~:%@=,-][^/]*)/(?<ag_tail>[^/].*)$" {
            alias @SNAPSHOTS@/$ag_name/$ag_id/$ag_tail;
            disable_symlinks on from=@SNAPSHOTS@;
            error_page 403 404 = @ag_snapshot_pool;
            if (-d $request_filename) {
                return 404;
            }
        }
        location @ag_snapshot_pool {
            root @SNAPSHOTS@/$ag_name/$ag_id/.pool;
            rewrite ^ /$ag_tail break;
            disable_symlinks on from=@SNAPSHOTS@/$ag_name/$ag_id/.pool;
            if (-d $request_filename) {
                return 404;
            }
        }
        location ~ "^/pins/(?<ag_pin>[A-Za-z0-9_+~:%@=,-][^/]*)/(?<ag_tail>[^/].*)$" {
            alias @PINS@/$ag_pin/$ag_tail;
            disable_symlinks on from=@PINS@/$ag_pin;
            error_page 403 404 = @ag_pin_pool;
            if (-d $request_filename) {
                return 404;
            }
        }
        location @ag_pin_pool {
            root @PINS@/$ag_pin/.pool;
            rewrite ^ /$ag_tail break;
            disable_symlinks on from=@PINS@/$ag_pin/.pool;
            if (-d $request_filename) {
                return 404;
            }
        }
        location ~ "^/(?<ag_name>[A-Za-z0-9_+~:%@=,-][^/]*)/(?<ag_tail>[^/].*)$" {
            alias @CURRENT@/$ag_name/$ag_tail;
            disable_symlinks on from=@CURRENT@/$ag_name;
            error_page 403 404 = @ag_current_pool;
            if (-d $request_filename) {
                return 404;
            }
        }
        location @ag_current_pool {
            root @CURRENT@/$ag_name/.pool;
            rewrite ^ /$ag_tail break;
            disable_symlinks on from=@CURRENT@/$ag_name/.pool;
            if (-d $request_filename) {
                return 404;
            }
        }
        location / {
            return 404;
        }
    }
"""


def render(
    data_dir: Path,
    listen: str,
    backend: str,
    runtime_dir: Path,
    *,
    user: str | None = None,
    server_only: bool = False,
) -> str:
    """The nginx config for a data folder: a whole nginx.conf, or only its server block."""
    server = SERVER.replace("@LISTEN@", listen).replace("@BACKEND@", backend)
    for word, folder in FileStore(data_dir).nginx_roots().items():
        server = server.replace(f"@{word.upper()}@", str(folder))
    if server_only:
        return server
    return (
        MAIN.replace("@USER@", f"user {user};\n" if user else "")
        .replace("@RUN@", str(runtime_dir))
        .replace("@DATA@", str(Path(data_dir).resolve()))
        .replace("@SERVER@", server)
    )
