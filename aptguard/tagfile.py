"""apt's tag-file rules (apt-pkg/tagfile.cc, apt 2.6) for Release, Packages and Sources.

The mirror must read a signed index exactly as the client will: if aptguard verified and
stored the file named by one `Filename:` while apt reads another, a signed index could make
clients fetch bytes the mirror never checked. So, as apt:
- a stanza ends at a newline followed by optional carriage returns and another newline;
  newlines and carriage returns between stanzas are skipped;
- a field starts on a line whose first byte is not whitespace; its name runs to the first
  colon, trailing whitespace removed; names compare case-insensitively, and where a name is
  repeated in a stanza the last one wins;
- the value starts after the colon and any whitespace, where a newline is crossed only when
  a space follows it; it runs up to the next field, trailing whitespace removed; lines
  starting with whitespace continue it;
- a field line with no colon before the stanza's end makes the whole file unparsable.
Numbers are read as C's strtoull reads them: ASCII digits only (`str.isdigit` also accepts "²").

Pure functions over bytes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

# isspace() in the C locale, as apt's isspace_ascii.
WHITESPACE = b" \t\n\v\f\r"
STANZA_END = re.compile(rb"\n\r*\n")
_NUMBER = re.compile(r"[ \t\n\v\f\r]*([+-]?)([0-9]+)")


class TagFileError(Exception):
    """A file apt's tag parser cannot read."""


def stanzas(data: bytes, *, start_of_file: bool = True) -> Iterator[bytes]:
    """The stanzas of a tag file, each ending with the newline that closed its last line.

    As apt: newlines and carriage returns after a stanza's end are skipped, but not at the
    start of the file, where a blank line makes an empty stanza (apt then refuses a Packages
    file: a stanza with no Package). A stanza of whitespace alone is empty too.
    """
    if data and not data.endswith(b"\n"):
        data += b"\n"
    pos, end = 0, len(data)
    if not start_of_file:
        while pos < end and data[pos] in b"\r\n":
            pos += 1
    if b"\r" not in data:  # then a stanza ends at "\n\n": found by bytes.find, not the regex
        while pos < end:
            found = data.find(b"\n\n", pos)
            stop = found + 1 if found >= 0 else end
            yield data[pos:stop]
            pos = found + 2 if found >= 0 else end
            while pos < end and data[pos] == 10:  # b"\n"
                pos += 1
        return
    while pos < end:
        found = STANZA_END.search(data, pos)
        stop = found.start() + 1 if found else end
        yield data[pos:stop]
        pos = found.end() if found else end
        while pos < end and data[pos] in b"\r\n":
            pos += 1


def fields(stanza: bytes) -> dict[bytes, bytes]:
    """Field name (ASCII lower case, as apt compares) -> value; the last of repeated names wins."""
    out: dict[bytes, bytes] = {}
    pos, end = 0, len(stanza)
    while pos < end:
        if stanza[pos] in WHITESPACE:  # a continuation line with no field before it: skipped
            pos = _next_line(stanza, pos)
            continue
        colon = stanza.find(b":", pos)
        if colon < 0:
            raise TagFileError(f"line {_show(stanza[pos:])} is not 'Field: value'")
        name = stanza[pos:colon].rstrip(WHITESPACE)
        start = colon + 1
        while start < end and stanza[start] in WHITESPACE:
            if stanza[start] == 0x0A and stanza[start + 1 : start + 2] != b" ":
                break
            start += 1
        if start >= end:
            raise TagFileError(f"field {_show(name)} has no value before the end of the stanza")
        stop = start
        while True:
            stop = _next_line(stanza, stop)
            if stop >= end or stanza[stop] not in WHITESPACE:
                break
        out[name.lower()] = stanza[start:stop].rstrip(WHITESPACE)
        pos = stop
    return out


def _next_line(data: bytes, pos: int) -> int:
    """Where the line after the one at `pos` starts; apt skips carriage returns after a newline."""
    newline = data.find(b"\n", pos)
    if newline < 0:
        return len(data)
    pos = newline + 1
    while pos < len(data) and data[pos] == 0x0D:
        pos += 1
    return pos


def first_stanza(data: bytes) -> dict[bytes, bytes]:
    """The fields of the first stanza: apt reads a Release file's first stanza and nothing else."""
    for stanza in stanzas(data):
        return fields(stanza)
    return {}


def number(value: str | bytes) -> int | None:
    """A number as apt reads it (strtoull): optional whitespace and sign, then ASCII digits,
    whatever follows ignored; None where no digit starts it ("²", "٢", "x"). A minus sign
    wraps around as in C, so the size matches no real file."""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    found = _NUMBER.match(text)
    if found is None:
        return None
    n = int(found.group(2))
    if n >= 1 << 64:
        return (1 << 64) - 1  # strtoull's ERANGE answer, whatever the sign
    return (-n) % (1 << 64) if found.group(1) == "-" else n


def _show(data: bytes) -> str:
    return repr(data[:60].decode("utf-8", "backslashreplace"))
