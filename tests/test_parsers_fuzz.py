"""Property-based fuzzing of the parsers every upstream byte goes through (hypothesis).

The differential corpus (test_differential.py) compares verdicts with the real apt; these
properties cover the space between its mutants with a fixed budget per run (derandomized,
so CI is repeatable): the clearsigned splitter, the tag-file reader and its fast path, numbers
against C's own strtoull, and the path check that keeps every stored file inside a snapshot.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import posixpath

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aptguard import clearsign, tagfile, verify
from aptguard.reasons import Rejected

BUDGET = settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# Bytes that matter to the parsers, over-represented so that hypothesis hits the edges.
_EDGE = st.sampled_from([b"\n", b"\r", b" ", b"\t", b"\f", b"\v", b"\x00", b":", b"-", b"- ", b"#", b"\xc2\x85"])
_NOISE = st.lists(st.one_of(_EDGE, st.binary(max_size=6)), max_size=40).map(b"".join)


def _frame(text_lines: list[bytes], sig_lines: list[bytes]) -> bytes:
    """A clearsigned file as gpg writes one: header, dash-escaped text, one signature block."""
    body = b"".join((b"- " + line if line.startswith(b"-") else line) + b"\n" for line in text_lines)
    block = b"".join(line + b"\n" for line in sig_lines)
    return (
        b"-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n"
        + body
        + b"-----BEGIN PGP SIGNATURE-----\n\n"
        + block
        + b"-----END PGP SIGNATURE-----\n"
    )


_LINE = st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"").rstrip(b"\r \t"))
_B64 = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=", max_size=64).map(
    str.encode
)


@BUDGET
@given(st.lists(_LINE, min_size=1, max_size=8), st.lists(_B64.filter(lambda b: not b.startswith(b"-")), max_size=4))
def test_a_gpg_framed_file_splits_back_into_its_text_and_signature(text_lines, sig_lines) -> None:
    split = clearsign.split_clearsigned(_frame(text_lines, sig_lines))
    assert split.text == b"\n".join(text_lines)
    assert (
        split.signature
        == b"-----BEGIN PGP SIGNATURE-----\n\n"
        + b"".join(line + b"\n" for line in sig_lines)
        + b"-----END PGP SIGNATURE-----\n"
    )


@BUDGET
@given(st.lists(_LINE, min_size=1, max_size=4), _NOISE)
def test_anything_around_the_block_that_is_not_a_signature_is_refused(text_lines, noise) -> None:
    good = _frame(text_lines, [b"AAAA"])
    for mangled in (noise + b"\n" + good, good + noise + b"\n"):
        stripped = noise.rstrip(b"\r\n").rstrip(b" \t")
        if mangled.startswith(good) and not stripped.replace(b"\r", b"").replace(b"\n", b""):
            continue  # only line ends after the block: apt reads no extra line
        with pytest.raises(clearsign.FramingError):
            clearsign.split_clearsigned(mangled)


@BUDGET
@given(st.binary(max_size=400) | _NOISE)
def test_the_splitter_never_fails_but_with_a_framing_error(data: bytes) -> None:
    try:
        split = clearsign.split_clearsigned(data)
    except clearsign.FramingError:
        return
    assert split.signature.startswith(clearsign.BEGIN_SIGNATURE + b"\n")
    assert split.signature.endswith(clearsign.END_SIGNATURE + b"\n")
    try:
        clearsign.check_detached(data)
    except clearsign.FramingError:
        pass


_NAMES = st.sampled_from(["Package", "package", "PACKAGE", "Filename", "filename", "Size", "SIZE", "SHA256"])
_NAMES |= st.sampled_from(["sha256", "MD5sum", "MD5Sum", "Version", "Description", "X-Other", "#Filename"])
_NAMES |= st.sampled_from(["Depends", "depends", "Pre-Depends", "PRE-DEPENDS", "Provides", "Depends-X", "X-Depends"])
_VALUES = st.lists(st.one_of(_EDGE, st.sampled_from([b"pool/a.deb", b"12", b"abc", b"1.0"])), max_size=5).map(b"".join)
_SEP = st.sampled_from([b":", b" :", b"\t:", b": ", b":\t", b":  "])


@st.composite
def stanzas(draw: st.DrawFn) -> bytes:
    lines = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.integers(0, 9))
        if kind == 0:
            lines.append(b" " + draw(_VALUES))  # a continuation line
        elif kind == 1:
            lines.append(draw(_VALUES))  # maybe a line with no colon
        else:
            lines.append(draw(_NAMES).encode() + draw(_SEP) + draw(_VALUES))
    return b"\n".join(line.replace(b"\n", b"") for line in lines) + b"\n"


@BUDGET
@given(stanzas())
def test_the_fast_packages_reader_reads_what_the_full_tag_parser_reads(stanza: bytes) -> None:
    """The per-stanza regex path must never disagree with the rule-for-rule port of apt's parser."""
    try:
        exact = {k: v for k, v in tagfile.fields(stanza).items() if k in verify._WANTED}
    except tagfile.TagFileError:
        exact = None
    try:
        fast = verify._stanza_fields(b"\n" + stanza)
    except Rejected:
        fast = None
    assert fast == exact


@BUDGET
@given(stanzas())
def test_the_fast_relation_reader_reads_what_the_full_tag_parser_reads(stanza: bytes) -> None:
    """A published view's filter reads Package, Version and the relations fast where index_stanzas
    says the block is plain; there it must read what apt's rule-for-rule parser reads."""
    if not verify._plain(b"\n" + stanza):
        return  # the full parser reads those itself
    try:
        exact = verify.relation_fields(stanza, plain=False)
    except Rejected:
        return
    assert verify.relation_fields(stanza, plain=True) == exact


@BUDGET
@given(st.binary(max_size=300) | st.lists(stanzas(), max_size=4).map(b"\n".join))
def test_tag_files_split_into_stanzas_and_fields_without_surprises(data: bytes) -> None:
    """No stanza holds a stanza end; reading fields fails, if at all, with TagFileError."""
    parts = list(tagfile.stanzas(data))
    for part in parts:
        assert tagfile.STANZA_END.search(part) is None and part.endswith(b"\n")
        try:
            tagfile.fields(part)
        except tagfile.TagFileError:
            pass


_libc = ctypes.CDLL(ctypes.util.find_library("c"))
_libc.strtoull.restype = ctypes.c_ulonglong
_libc.strtoull.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int]


@BUDGET
@given(st.text(alphabet=" \t\n\v+-0123456789²٢x\u00a0", max_size=30))
def test_numbers_are_read_as_cs_strtoull_reads_them(text: str) -> None:
    """Size fields are read as apt reads them: C's strtoull, base 10, whatever follows ignored."""
    raw = ctypes.create_string_buffer(text.encode())
    end = ctypes.c_char_p()
    value = _libc.strtoull(raw, ctypes.byref(end), 10)
    consumed = ctypes.cast(end, ctypes.c_void_p).value - ctypes.addressof(raw)
    assert tagfile.number(text) == (value if consumed else None)


_PART = st.text(alphabet="abz09._+~:%@=,-/\\ \x00é", max_size=12)


@BUDGET
@given(st.lists(_PART, min_size=1, max_size=5).map("/".join) | st.text(max_size=40))
def test_a_path_the_check_lets_through_stays_inside_the_snapshot(path: str) -> None:
    try:
        checked = verify.check_path(path, "fuzz")
    except Rejected as exc:
        assert exc.reason == "unsafe-path"
        return
    assert checked == path
    assert not path.startswith("/") and posixpath.normpath(path) == path
    root = "/srv/snapshot"
    assert posixpath.normpath(posixpath.join(root, path)).startswith(root + "/")
    for part in path.split("/"):
        assert part and not part.startswith(".") and len(part.encode()) <= 255 and part.isascii()
