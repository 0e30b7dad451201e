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
@ROUTES@@FETCH_LOCATION@        location / {
            return 404;
        }
    }
"""

# One route per URL kind: the snapshot's own tree, then (named location) its pool generation.
ROUTE = r"""        location ~ "^/@PREFIX@(?<ag_tail>[^/].*)$" {
            alias @TREE@/$ag_tail;
            disable_symlinks on from=@FROM@;
            error_page 403 404 = @ag_@KIND@_pool;
            error_page 400 405 =404 /.aptguard-404;  # a location's error_page hides the server's
@RECURSE@            if (-d $request_filename) {
                return 404;
            }
        }
        location @ag_@KIND@_pool {
            root @TREE@/.pool;
            rewrite ^ /$ag_tail break;
            disable_symlinks on from=@TREE@/.pool;
@FETCH@            if (-d $request_filename) {
                return 404;
            }
        }
"""
# With an on-demand upstream: a pool file not held yet goes to `aptguard serve`, which fetches,
# verifies and holds it (nginx serves it from then on); its 404, 502 and 504 pass through.
FETCH = """            error_page 404 = @ag_fetch;
"""
RECURSE = """            recursive_error_pages on;  # the pool's 404 may go on to @ag_fetch
"""
FETCH_LOCATION = r"""        location @ag_fetch {
            proxy_pass http://@BACKEND@$request_uri;  # as the client asked (the pool route rewrote it)
            proxy_set_header Host $http_host;
            proxy_read_timeout 600s;
        }
"""
_WORD = "[A-Za-z0-9_+~:%@=,-][^/]*"
# (kind, URL prefix, the snapshot tree it names, where symlink checks start)
_ROUTES = (
    ("snapshot", f"snapshots/(?<ag_name>{_WORD})/(?<ag_id>{_WORD})/", "@SNAPSHOTS@/$ag_name/$ag_id", "@SNAPSHOTS@"),
    ("pin", f"pins/(?<ag_pin>{_WORD})/", "@PINS@/$ag_pin", "@PINS@/$ag_pin"),
    ("current", f"(?<ag_name>{_WORD})/", "@CURRENT@/$ag_name", "@CURRENT@/$ag_name"),
)
SERVER = SERVER.replace(
    "@ROUTES@",
    "".join(
        ROUTE.replace("@KIND@", kind).replace("@TREE@", tree).replace("@FROM@", start).replace("@PREFIX@", prefix)
        for kind, prefix, tree, start in _ROUTES
    ),
)


def render(
    data_dir: Path,
    listen: str,
    backend: str,
    runtime_dir: Path,
    *,
    user: str | None = None,
    server_only: bool = False,
    on_demand: bool = False,
) -> str:
    """The nginx config for a data folder: a whole nginx.conf, or only its server block.
    `on_demand`: pool files nginx does not find are asked of `aptguard serve` (policy = "on-demand")."""
    server = SERVER.replace("@FETCH@", FETCH if on_demand else "").replace("@RECURSE@", RECURSE if on_demand else "")
    server = server.replace("@FETCH_LOCATION@", FETCH_LOCATION if on_demand else "")
    server = server.replace("@LISTEN@", listen).replace("@BACKEND@", backend)
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
