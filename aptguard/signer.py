"""The mirror's own signing keys (`[upstreams.NAME.publish] sign_with`): checked, then used.

The keys are the operator's, not an upstream's: nothing here reads hostile bytes. What matters is
that a key that cannot sign (expired, revoked, no signing capability, a wrong passphrase, a file
holding only a public key) is found before a sync downloads anything, and named with its file, so
the sync ends as `publish-failed` and the served view stays the previous one.

Each Signer imports the key files into a private GNUPGHOME of its own (a short folder under the
system's temp dir: gpg-agent's socket path must stay under 108 bytes) and removes it, agent
included, on close; a home left by a killed process is removed by the next Signer. Every Release is signed by every key at once (`gpg -u A -u B`), so clients
that trust any one of them verify it: that is how the mirror's key is rotated.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from aptguard.config import Publish
from aptguard.reasons import Rejected
from aptguard.store import process_alive

GPG = "gpg"
GPG_SECONDS = 60  # one signature of a Release of a few MB; a hung agent must not hang a sync
HOME_PREFIX = "aptguard-sign-"  # then the PID: a killed process's home is found and removed


@dataclass(frozen=True)
class SigningKey:
    fingerprint: str
    uid: str
    expires: datetime | None
    source: Path  # the sign_with file it came from


class Signer:
    """The sign_with keys of one upstream, imported and checked at `now`."""

    def __init__(self, publish: Publish, now: datetime | None = None) -> None:
        self.publish = publish
        _discard_dead_homes()
        self.home = Path(tempfile.mkdtemp(prefix=f"{HOME_PREFIX}{os.getpid()}-"))
        try:
            self.keys = [self._import(path, now or datetime.now(UTC)) for path in publish.sign_with]
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ keys

    def _gpg(self, *args: str, data: bytes = b"", what: str) -> bytes:
        command = [GPG, "--batch", "--no-tty", "--homedir", str(self.home), "--with-colons", "--fixed-list-mode"]
        if self.publish.passphrase_file is not None:
            command += ["--pinentry-mode", "loopback", "--passphrase-file", str(self.publish.passphrase_file)]
        try:
            done = subprocess.run([*command, *args], input=data, capture_output=True, timeout=GPG_SECONDS, check=False)
        except subprocess.TimeoutExpired:
            raise Rejected("publish-failed", f"{what}: gpg did not answer within {GPG_SECONDS} s") from None
        except OSError as exc:
            raise Rejected("publish-failed", f"{what}: gpg could not be run ({exc.strerror})") from None
        if done.returncode != 0:
            lines = [ln for ln in done.stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
            raise Rejected("publish-failed", f"{what}: gpg failed: {' / '.join(lines[-3:])[:400]}")
        return done.stdout

    def _import(self, path: Path, now: datetime) -> SigningKey:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise Rejected("publish-failed", f"sign_with {path}: cannot be read ({exc.strerror})") from None
        listing = self._gpg("--import-options", "show-only", "--import", data=data, what=f"sign_with {path}")
        records = [line.split(":") for line in listing.decode("utf-8", "replace").splitlines()]
        secret = [r for r in records if r[0] == "sec"]
        if not secret:
            raise Rejected(
                "publish-failed",
                f"sign_with {path}: holds no secret key (a public key only?); export it with "
                "`gpg --armor --export-secret-keys KEYID`",
            )
        if len(secret) > 1:
            raise Rejected("publish-failed", f"sign_with {path}: holds {len(secret)} keys; give one key per file")
        self._gpg("--import", data=data, what=f"sign_with {path}")
        fingerprint = next((r[9] for r in records if r[0] == "fpr"), "").upper()
        uid = next((r[9] for r in records if r[0] == "uid"), "")
        # The key as this home now knows it, with gpg's own verdict on validity and capabilities.
        mine = [
            ln.split(":")
            for ln in self._gpg("--list-secret-keys", fingerprint, what=str(path))
            .decode("utf-8", "replace")
            .splitlines()
        ]
        primary = next(r for r in mine if r[0] == "sec")
        expires = datetime.fromtimestamp(int(primary[6]), UTC) if primary[6] else None
        name = f"sign_with {path} (key {fingerprint})"
        if primary[1] == "r":
            raise Rejected("publish-failed", f"{name}: revoked; put a new key in sign_with")
        if primary[1] == "e" or (expires is not None and expires <= now):
            when = f" on {expires:%Y-%m-%d}" if expires else ""
            raise Rejected(
                "publish-failed",
                f"{name}: expired{when}; extend it (gpg --quick-set-expire) or put a new key in sign_with",
            )
        if "S" not in primary[11]:
            raise Rejected("publish-failed", f"{name}: has no usable signing (sub)key (expired, revoked or none)")
        return SigningKey(fingerprint, uid, expires, path)

    # ------------------------------------------------------------ signatures

    def _sign(self, mode: str, text: bytes) -> bytes:
        users = [arg for key in self.keys for arg in ("--local-user", key.fingerprint)]
        what = "signing the Release with " + ", ".join(k.fingerprint for k in self.keys)
        return self._gpg("--digest-algo", "SHA512", "--armor", mode, *users, "--output", "-", data=text, what=what)

    def clearsign(self, text: bytes) -> bytes:
        """InRelease: `text` clearsigned by every key."""
        return self._sign("--clearsign", text)

    def detach(self, text: bytes) -> bytes:
        """Release.gpg: an armored detached signature of `text` by every key."""
        return self._sign("--detach-sign", text)

    def public_keys(self) -> bytes:
        """Every key's public part, one ASCII-armored block (what clients put in Signed-By)."""
        return self._gpg("--armor", "--export", *(k.fingerprint for k in self.keys), what="exporting the public keys")

    def close(self) -> None:
        _remove_home(self.home)

    def __enter__(self) -> Signer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remove_home(home: Path) -> None:
    """Stop the home's gpg-agent and delete the home (with the secret keys imported into it)."""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(
            ["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"],
            capture_output=True,
            check=False,
            timeout=GPG_SECONDS,
        )
    shutil.rmtree(home, ignore_errors=True)


def _discard_dead_homes() -> None:
    """The homes of aptguard processes killed while signing (kill -9 runs no close()): their
    agents stopped and the secret keys they hold deleted."""
    with contextlib.suppress(OSError):
        for entry in Path(tempfile.gettempdir()).iterdir():
            pid = entry.name.removeprefix(HOME_PREFIX).partition("-")[0]
            if entry.name.startswith(HOME_PREFIX) and pid.isdigit() and not process_alive(int(pid)):
                _remove_home(entry)
