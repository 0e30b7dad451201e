"""The words a sync ends with: one exception carries one reason code of SPEC §2 and a detail.

The CLI, `status --json`, the logs and the metrics all print these same codes, so an operator
reads one vocabulary everywhere.
"""

from __future__ import annotations

REASONS = frozenset(
    {
        "unreachable",
        "signature-missing",
        "signature-invalid",
        "signature-unknown-key",
        "signature-key-expired",
        "signature-key-revoked",
        "release-invalid",
        "release-mismatch",
        "release-changed",
        "release-expired",
        "release-future",
        "release-rollback",
        "index-missing",
        "index-mismatch",
        "package-missing",
        "package-mismatch",
        "unsafe-path",
        "too-large",
        "storage-error",
        "publish-failed",
        "internal-error",
    }
)

# What an operator does about each reason (printed by `sync` and shown on the status page).
ADVICE = {
    "unreachable": "check the upstream URL and the network; the next sync retries",
    "signature-missing": "the upstream publishes no InRelease nor Release + Release.gpg at this URL: check url and suites",
    "signature-invalid": "the upstream's signature does not verify: wait for the upstream to fix it; do not bypass",
    "signature-unknown-key": "the upstream signs with a key not in this keyring: verify the new key out of band, "
    "then add it to the keyring file",
    "signature-key-expired": "the upstream signing key expired: fetch the upstream's renewed key and replace the keyring file",
    "signature-key-revoked": "the upstream signing key was revoked: verify the upstream's new key out of band",
    "release-invalid": "the upstream Release is malformed: wait for the upstream to fix it",
    "release-mismatch": "the Release does not match the configured suite, components or architectures: check the config",
    "release-changed": "Origin, Label or Codename changed upstream: clients need --allow-releaseinfo-change; "
    "accept with `aptguard sync --allow-release-change NAME`",
    "release-expired": "the upstream Release is past its Valid-Until: the upstream must re-sign it",
    "release-future": "the Release Date lies in the future: check this machine's clock and the upstream's",
    "release-rollback": "the upstream serves an older Release than the one already served (a replay or a stale mirror)",
    "index-missing": "an index the Release lists is absent upstream (publishing in progress?): the next sync retries",
    "index-mismatch": "an index differs from its Release entry (publishing in progress?): the next sync retries",
    "package-missing": "a package its index names is absent upstream: the next sync retries",
    "package-mismatch": "a package differs from its index entry: the next sync retries; report it upstream if it stays",
    "unsafe-path": "the upstream names a path outside the repository: it is hostile or broken; report it",
    "too-large": "a download ran past its declared size: the upstream is broken or hostile",
    "storage-error": "the local disk failed (full or read-only): free space or fix the disk, then sync again",
    "publish-failed": "the re-signed view could not be made (a signing key, or a filtered package's dependency): "
    "fix the key or the packages filter; the previous view is still served",
    "internal-error": "a bug in aptguard: report it with the log's traceback; the other upstreams still synced",
}


class Rejected(Exception):
    """A sync refused: `reason` is a SPEC reason code, `detail` names the file, value or key."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown reason code {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class UsageError(Exception):
    """A usage or config error: exit 2, nothing touched."""
