"""An upstream's keyring, imported into a private GnuPG home that holds nothing else.

python-gnupg's `valid` means "some key in this home signed", so the home must hold only
this upstream's keys; verify.py still compares every signer's fingerprint with `fingerprints`.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import gnupg

from aptguard.reasons import UsageError


@dataclass(frozen=True)
class KeyInfo:
    fingerprint: str  # the primary key's
    uid: str
    expires: datetime | None  # the latest expiry among the key's signing-capable parts
    revoked: bool


class Keyring:
    """A throwaway GnuPG home holding exactly the keys of one keyring file."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.home = Path(tempfile.mkdtemp(prefix="aptguard-gpg-"))
        try:
            self.gpg = gnupg.GPG(gnupghome=str(self.home), options=["--no-autostart"])
            self.gpg.encoding = "utf-8"
            imported = self.gpg.import_keys(source.read_bytes())
            if not imported.fingerprints:
                raise UsageError(
                    f"{source}: no OpenPGP public key could be read from this keyring file; "
                    "give an ASCII-armored (.asc) or binary (.gpg) export of the upstream's key"
                )
            self.keys, self.fingerprints = self._read_keys()
        except BaseException:
            self.close()
            raise

    def _read_keys(self) -> tuple[list[KeyInfo], frozenset[str]]:
        keys: list[KeyInfo] = []
        fingerprints: set[str] = set()
        for key in self.gpg.list_keys():
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

    def close(self) -> None:
        # --no-autostart: verification never starts an agent, so there is none to stop.
        shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> Keyring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
