"""apt's framing rules for signed Release files, so the mirror and apt never disagree.

apt never lets gpg parse a clearsigned InRelease: it splits the file itself into the signed
text and a detached signature and runs gpgv on that pair (apt-pkg/contrib/gpgv.cc,
`SplitClearSignedFile`, and the checks `ExecGPGV` makes on a detached Release.gpg). gpg's own
parser is more lenient in some places (blank lines around the block) and stricter in others
(CRLF line ends, a missing `Hash:` header), so applying "gpg accepted it" would let an
attacker without a key break every client. These functions follow apt 2.6 rule for rule;
each refusal raises FramingError with the sentence apt's refusal amounts to.

Pure functions over bytes: no I/O, no gpg.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

BEGIN_MESSAGE = b"-----BEGIN PGP SIGNED MESSAGE-----"
BEGIN_SIGNATURE = b"-----BEGIN PGP SIGNATURE-----"
END_SIGNATURE = b"-----END PGP SIGNATURE-----"


class FramingError(Exception):
    """A signed file apt refuses to split; the message says why, in apt's terms."""


@dataclass(frozen=True)
class Split:
    """A clearsigned file as apt hands it to gpgv: the signed text and the armored signature(s)."""

    text: bytes  # the lines of the message, dash-escapes removed, joined by "\n", no final newline
    signature: bytes  # every signature block, one line each, "\n"-terminated


def lines_of(data: bytes) -> Iterator[bytes]:
    """Lines as apt's LineBuffer reads them: split on "\\n" only (getline), then every trailing
    "\\r"/"\\n" removed and, after that, trailing spaces and tabs (RFC 4880 7.1)."""
    start, end = 0, len(data)
    while start < end:
        stop = data.find(b"\n", start)
        if stop < 0:
            stop = end
        yield data[start:stop].rstrip(b"\r\n").rstrip(b" \t")
        start = stop + 1


def split_clearsigned(data: bytes) -> Split:
    """Split an InRelease the way apt does, or raise FramingError.

    One signed message must start on the first line; its armor headers end at the first
    empty line and none may start with a dash; message lines starting with a dash must be
    dash-escaped ("- "); after the message only signature blocks may follow, each closed,
    with nothing (not even an empty line) between or after them.
    """
    lines = iter(lines_of(data))
    first = next(lines, None)
    if first is None:
        raise FramingError("the file is empty")
    if first != BEGIN_MESSAGE:
        if any(line == BEGIN_MESSAGE for line in lines):
            raise FramingError("text before the clearsigned block (apt: does not start with a signed message block)")
        raise FramingError("not a clearsigned file (no BEGIN PGP SIGNED MESSAGE line)")
    for line in lines:  # armor headers, up to the first empty line
        if not line:
            break
        if line.startswith(b"-"):
            raise FramingError(f"armor header line starting with a dash: {_show(line)}")
    else:
        raise FramingError("the file ends inside the armor headers")
    message: list[bytes] = []
    for line in lines:
        if line.startswith(b"-"):
            if line == BEGIN_SIGNATURE:
                break
            if not line.startswith(b"- "):
                raise FramingError(f"message line starting with a dash that is not dash-escaped: {_show(line)}")
            line = line[2:]
        message.append(line)
    else:
        raise FramingError("the file ends before the signature")
    signature = [BEGIN_SIGNATURE]
    open_block = True
    for line in lines:
        if open_block:
            open_block = not _closes_block(line)
        elif line == BEGIN_SIGNATURE:
            open_block = True
        else:
            raise FramingError(f"text after the signature (apt: contains unsigned lines): {_show(line)}")
        signature.append(line)
    if open_block:
        raise FramingError("the signature block is not closed")
    return Split(text=b"\n".join(message), signature=b"".join(line + b"\n" for line in signature))


def check_detached(signature: bytes) -> None:
    """Refuse a Release.gpg apt refuses: anything but armored signature blocks, back to back."""
    found = 0
    open_block = False
    stray: bytes | None = None
    for line in lines_of(signature):
        if open_block:
            open_block = not _closes_block(line)
        elif line == BEGIN_SIGNATURE:
            open_block = True
            found += 1
            if stray is not None:
                break
        else:
            stray = line
            if found:
                break
    if found == 0:
        if signature[:1] and signature[0] & 0x80 and not signature[0] & 0x40:
            raise FramingError("a binary signature (apt reads only ASCII-armored Release.gpg)")
        raise FramingError("no ASCII-armored signature in it")
    if stray is not None:
        raise FramingError(f"lines that belong to no signature: {_show(stray)}")
    if open_block:
        raise FramingError("the signature block is not closed")


def _closes_block(line: bytes) -> bool:
    """A line inside a signature block: True for its END line. Radix-64 never starts with a dash,
    so any other dash line is a header apt's parser and gpg's could read differently: refused."""
    if line == END_SIGNATURE:
        return True
    if line.startswith(b"-"):
        raise FramingError(f"signature line starting with a dash: {_show(line)}")
    return False


def _show(line: bytes) -> str:
    return repr(line[:60].decode("utf-8", "backslashreplace"))
