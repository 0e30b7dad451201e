"""An upstream's keyring: the keys apt would trust for it, and gpgv run against them alone.

Signature verdicts come from gpgv (apt's own verifier) run on a keyring file holding only
this upstream's keys, its status read from a dedicated pipe as bytes (keyring.Keyring.gpgv).
Never from gpg's stderr or python-gnupg's status attributes: gpg prints text the signer
chooses (a Signer's-UID, a user id) there, and python-gnupg reads status lines from stderr
through a reader that also breaks lines on U+2028, so a signer could forge `[GNUPG:]` lines.
python-gnupg is used only to list the keys (fingerprints, user ids, expiry) for warnings.

Everything gpg writes goes to a folder inside the data folder that the caller removes (and
that the next run removes after a kill).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import os
import resource
import select
import shutil
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from aptguard.reasons import Rejected, UsageError

GPGV = "gpgv"
# A good verification takes milliseconds; a Release.gpg holding a compressed packet that
# inflates to gigabytes takes gpgv minutes or hours. Wall clock and CPU are both capped.
GPGV_SECONDS = 10
GPGV_MEMORY = 512 * 1024 * 1024
STATUS_LIMIT = 1 << 20  # bytes of status output: a few hundred per signature
# The first byte of an OpenPGP public-key packet (old format, 1- or 2-byte length; new format).
_PUBLIC_KEY_TAGS = (0x98, 0x99, 0xC6)


@dataclass(frozen=True)
class KeyInfo:
    fingerprint: str  # the primary key's
    uid: str
    expires: datetime | None  # the latest expiry among the key's signing-capable parts
    revoked: bool


def read_keyring(source: Path) -> bytes:
    """The keyring file as binary OpenPGP packets (what gpgv reads), or UsageError.

    Like apt with a Signed-By file: a binary keyring is used as it is; an ASCII-armored one is
    decoded (every PUBLIC KEY BLOCK in it). Pure: reads the file, writes nothing.
    """
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise UsageError(f"{source}: cannot read the keyring file: {exc.strerror}") from None
    packets = data if data[:1] and data[0] in _PUBLIC_KEY_TAGS else _dearmor(data)
    if not packets or packets[0] not in _PUBLIC_KEY_TAGS:
        raise UsageError(
            f"{source}: no OpenPGP public key could be read from this keyring file; "
            "give an ASCII-armored (.asc) or binary (.gpg) export of the upstream's key"
        )
    return packets


def _dearmor(data: bytes) -> bytes:
    out = bytearray()
    body: list[bytes] | None = None
    in_headers = False
    for raw in data.splitlines():
        line = raw.strip()
        if line.startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----"):
            body, in_headers = [], True
        elif body is None:
            continue
        elif line.startswith(b"-----END PGP PUBLIC KEY BLOCK-----"):
            try:
                out += base64.b64decode(b"".join(body), validate=True)
            except (binascii.Error, ValueError):
                return b""
            body = None
        elif in_headers:
            in_headers = bool(line)
        elif line and not line.startswith(b"="):
            body.append(line)
    return bytes(out)


class Keyring:
    """One upstream's keys, in `home` (a fresh folder inside the data folder, removed by close())."""

    def __init__(self, source: Path, home: Path) -> None:
        self.source = source
        packets = read_keyring(source)
        home.mkdir(mode=0o700, parents=True)
        self.home = home
        try:
            self.file = home / "trusted.gpg"
            self.file.write_bytes(packets)
            (home / "gpgv").mkdir(mode=0o700)
            self.keys, self.fingerprints = self._read_keys(packets)
            self._calls = itertools.count(1)  # next() is atomic: suites are verified in parallel threads
        except BaseException:
            self.close()
            raise

    def _read_keys(self, packets: bytes) -> tuple[list[KeyInfo], frozenset[str]]:
        import gnupg

        (self.home / "list").mkdir(mode=0o700)
        gpg = gnupg.GPG(gnupghome=str(self.home / "list"), options=["--no-autostart"])
        gpg.encoding = "utf-8"
        gpg.import_keys(packets)
        keys: list[KeyInfo] = []
        fingerprints: set[str] = set()
        for key in gpg.list_keys():
            fingerprints.add(key["fingerprint"].upper())
            expiries = [key.get("expires") or ""]
            for sub in key.get("subkeys", []):
                # [keyid, capabilities, fingerprint, grip] in python-gnupg >= 0.5
                if len(sub) > 2 and sub[2]:
                    fingerprints.add(sub[2].upper())
                info = key.get("subkey_info", {}).get(sub[0], {})
                if "s" in (sub[1] if len(sub) > 1 else "") and info.get("trust") not in ("r", "e"):
                    expiries.append(info.get("expires") or "")
            never = any(not e for e in expiries)
            latest = None if never else max(int(e) for e in expiries)
            keys.append(
                KeyInfo(
                    fingerprint=key["fingerprint"].upper(),
                    uid=(key.get("uids") or [""])[0],
                    expires=None if latest is None else datetime.fromtimestamp(latest, UTC),
                    revoked=key.get("trust") == "r",
                )
            )
        return keys, frozenset(fingerprints)

    def gpgv(self, signature: bytes, data: bytes, where: str) -> list[bytes]:
        """Run gpgv on a detached signature and its data; return its `[GNUPG:] ` status lines.

        As apt runs it: `--ignore-time-conflict`, only this keyring, the C locale. The status
        is read from a pipe of its own (gpgv's stdout and stderr go nowhere), as bytes, split
        on "\\n" only: gpg escapes "\\n" and "\\r" in what it prints there, so no signer-chosen
        text can start a line. Rejected `too-large` if gpgv runs past GPGV_SECONDS or prints
        more than STATUS_LIMIT bytes.
        """
        n = next(self._calls)
        sig_path = self.home / f"check-{n}.sig"
        data_path = self.home / f"check-{n}.data"
        sig_path.write_bytes(signature)
        data_path.write_bytes(data)
        try:
            status = self._run_gpgv(sig_path, data_path, where)
        finally:
            sig_path.unlink(missing_ok=True)
            data_path.unlink(missing_ok=True)
        return [line for line in status.split(b"\n") if line.startswith(b"[GNUPG:] ")]

    def _run_gpgv(self, sig_path: Path, data_path: Path, where: str) -> bytes:
        read_end, write_end = os.pipe()
        try:
            args = [GPGV, "--homedir", str(self.home / "gpgv"), "--ignore-time-conflict"]
            args += ["--keyring", str(self.file), "--status-fd", str(write_end), str(sig_path), str(data_path)]
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(write_end,),
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
                preexec_fn=_bound_gpgv,
            )
        except OSError as exc:
            os.close(read_end)
            raise Rejected("internal-error", f"cannot run {GPGV} to check {where}: {exc.strerror}") from None
        finally:
            os.close(write_end)
        status = bytearray()
        deadline = time.monotonic() + GPGV_SECONDS
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Rejected(
                        "too-large", f"{where}: gpgv still working after {GPGV_SECONDS} s (a signature bomb?)"
                    )
                ready, _, _ = select.select([read_end], [], [], left)
                if not ready:
                    continue
                chunk = os.read(read_end, 65536)
                if not chunk:
                    break
                status += chunk
                if len(status) > STATUS_LIMIT:
                    raise Rejected("too-large", f"{where}: gpgv reported more than {STATUS_LIMIT} bytes of status")
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise Rejected(
                    "too-large", f"{where}: gpgv still working after {GPGV_SECONDS} s (a signature bomb?)"
                ) from None
        finally:
            os.close(read_end)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode < 0:
            raise Rejected("too-large", f"{where}: gpgv was stopped by its CPU or memory limit (a signature bomb?)")
        return bytes(status)

    def close(self) -> None:
        # --no-autostart: listing keys never starts an agent, so there is none to stop.
        shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> Keyring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _bound_gpgv() -> None:
    """In the child before exec: CPU seconds and address space capped, whatever it is fed."""
    resource.setrlimit(resource.RLIMIT_CPU, (GPGV_SECONDS, GPGV_SECONDS + 1))
    resource.setrlimit(resource.RLIMIT_AS, (GPGV_MEMORY, GPGV_MEMORY))
