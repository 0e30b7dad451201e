"""The deb822 `.sources` stanza a client uses to read from this mirror.

Clients keep verifying with the upstream's own key (SPEC §3.3), so `Signed-By` names the
upstream keyring; for a published view (SPEC §7) it embeds the mirror's own public keys. A fixed snapshot or pin never gets a newer Release, so once its Valid-Until
passes apt would refuse it ("Release file is expired"): for those the stanza turns that check
off, which is safe because the content can no longer change.
"""

from __future__ import annotations

import socket
from pathlib import Path

from aptguard.config import UpstreamConfig
from aptguard.records import Manifest


def default_base_url(listen: str) -> str:
    """http://HOST:PORT of the embedded server; a wildcard address becomes this host's name."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def stanza(
    up: UpstreamConfig,
    uri: str,
    *,
    fixed_manifest: Manifest | None = None,
    signed_by: Path | str | None = None,
) -> str:
    """One deb822 stanza for `uri`; `fixed_manifest` is the snapshot's manifest when it is fixed."""
    suites = list(up.suites)
    fields = [
        ("Types", "deb deb-src" if up.sources else "deb"),
        ("URIs", uri),
        ("Suites", " ".join(suites)),
    ]
    if up.components:
        fields.append(("Components", " ".join(up.components)))
    arches = [a for a in up.architectures if a not in ("all", "source")]
    if arches:
        fields.append(("Architectures", " ".join(arches)))
    fields.append(("Signed-By", str(signed_by or up.keyring)))
    if fixed_manifest is not None and (
        fixed_manifest.published is not None or any(meta.valid_until for meta in fixed_manifest.suites.values())
    ):
        fields.append(("Check-Valid-Until", "no"))
    return "".join(f"{key}: {value}\n" for key, value in fields)


def embedded_keys(armored: bytes) -> str:
    """An ASCII-armored key block as a deb822 field value (apt >= 2.3.10 reads keys embedded in
    Signed-By): each line indented, an empty line written " ."."""
    lines = armored.decode("ascii").strip().splitlines()
    return "\n" + "\n".join(f" {line}" if line.strip() else " ." for line in lines)
