"""The text form (fuzzmmu.program.text): it round-trips exactly with Program and with the
binary form, and every kind of mistake is a ProgramSyntaxError naming the line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fuzzmmu.program.text as text_module
from fuzzmmu.model.mmu.internal import Point
from fuzzmmu.program.codec import MAX_OPS, MAX_SECOND, decode, encode
from fuzzmmu.program.ops import (
    Access,
    Entry,
    Extra,
    GuestMode,
    Header,
    Interleave,
    Map,
    Program,
    WritePte,
    ZapAll,
)
from fuzzmmu.program.strategies import program_bytes, programs, record_count
from fuzzmmu.program.text import (
    FORMAT_LINE,
    ProgramSyntaxError,
    format_op,
    format_program,
    parse_program,
)
from fuzzmmu.world.observe import AccessKind

SETTINGS = settings(max_examples=300, deadline=None)

# seed bug 1: an 8-byte store across PT entries 0 and 1 clears entry 1's P bit
EXAMPLE = (Path(__file__).resolve().parents[1] / "bugs" / "reproducers"
           / "misaligned-pt-write-two-sptes.txt").read_text()


# ---------------------------------------------------------------------- round trips


@SETTINGS
@given(program_bytes)
def test_text_of_decoded_programs_round_trips(data: bytes) -> None:
    p = decode(data)
    t = format_program(p)
    assert t.startswith(FORMAT_LINE + "\n") and t.endswith("\n")
    back = parse_program(t)
    assert back == p
    assert format_program(back) == t
    assert encode(back) == encode(p)


@settings(max_examples=400, deadline=None)
@given(programs())
def test_text_of_built_programs_round_trips(p: Program) -> None:
    t = format_program(p)
    assert parse_program(t) == p
    assert format_program(parse_program(t)) == t
    # Every text program has a binary form, and they agree.
    assert decode(encode(parse_program(t))) == p
    # One line per op record (an interleave's own record is its "interleave at=" line), plus
    # the format line and the config line.
    assert len(t.splitlines()) == 2 + record_count(p)


@SETTINGS
@given(programs(max_records=12))
def test_comments_blank_lines_and_decimal_numbers_do_not_matter(p: Program) -> None:
    lines = format_program(p).splitlines()
    noisy = []
    for i, line in enumerate(lines):
        noisy += ["", "   # a comment line"] if i % 2 else []
        line = re.sub(r"=0x([0-9a-f]+)\b", lambda m: f"={int(m.group(1), 16)}", line)
        noisy.append(f"{line}   # trailing comment")
    assert parse_program("\n".join(noisy) + "\n\n") == p


def test_example_file_parses() -> None:
    p = parse_program(EXAMPLE)
    assert p.header.boot is GuestMode.LONG4
    assert len(p.ops) == 7 and p.ops[4].KIND == "store"
    assert parse_program(format_program(p)) == p


def test_defaults_without_config() -> None:
    p = parse_program("read cpu1 0x1000\n")
    assert p.header == Header()
    assert p.ops == (Access(1, AccessKind.READ, 0x1000, 0, 8, 0, False, 0),)
    assert parse_program("") == Program(Header(), ())
    assert parse_program("# only a comment\n\n") == Program(Header(), ())


def test_each_op_kind_formats_on_one_line() -> None:
    op = WritePte(1, 4, 1, Entry(0x5, 0x27, Extra.RSVD), 4)
    assert format_op(op) == "pte cpu1 table=0x4 index=1 -> 0x5 P|W|U|A rsvd width=4"
    m = Map(0, None, GuestMode.PAE, 0x1000, Entry(5, 1 | (1 << 63)), 2, 0, 8)
    assert format_op(m) == "map cpu0 root=current pae 0x1000 -> 0x5 P|NX level=2 upper=0 pool=0x8"
    il = Interleave(Point.FAULTIN, ZapAll(), (ZapAll(), ZapAll()))
    assert format_op(il) == "interleave at=faultin\n  zap-all\n  zap-all\n  zap-all"


def test_module_docstring_example_parses() -> None:
    doc = text_module.__doc__ or ""
    example = "\n".join(line[4:] for line in doc.splitlines() if line.startswith("    "))
    parse_program(example)


# ---------------------------------------------------------------------- syntax errors

HEAD = "# fuzzmmu program v1\n\n# a comment line\nconfig policy=zap boot=4level\n"  # 4 lines
GOOD = "read cpu0 0x1000+0x8 width=8 cpl=3\n"


@pytest.mark.parametrize(("body", "line", "message"), [
    pytest.param("frobnicate cpu0 0x1000\n", 5, "unknown operation 'frobnicate'",
                 id="unknown-op"),
    pytest.param(GOOD + "read cpu2 0x1000\n", 6, "expected cpu0 or cpu1, not 'cpu2'",
                 id="bad-cpu"),
    pytest.param("invlpg vcpu0 0x1000\n", 5, "expected cpu0 or cpu1", id="bad-cpu-name"),
    pytest.param("read cpu0 0x1234000\n", 5, "address 0x1234000 is not one of the world's",
                 id="address-not-in-world"),
    pytest.param("read cpu0 0x1000+0x20\n", 5, "offset 0x20 is not one of the world's",
                 id="offset-not-in-world"),
    pytest.param(GOOD * 2 + "pte cpu0 table=0x4 index=1 -> 0x5 P|Q width=8\n", 7,
                 "unknown flag 'Q'", id="unknown-flag"),
    pytest.param("pte cpu0 index=1 -> 0x5 P|W width=8\n", 5, "missing table=",
                 id="missing-key"),
    pytest.param("map cpu0 root=current current 0x1000 -> 0x5 P level=1\n", 5,
                 "missing pool=", id="missing-pool"),
    pytest.param("pte cpu0 table=0x4 index=1 -> 0x5 P width=8 colour=red\n", 5,
                 "unknown setting colour=", id="unknown-key"),
    pytest.param("pte cpu0 table=0x4 index=1 0x5 P width=8\n", 5, "expected -> before",
                 id="missing-arrow"),
    pytest.param("pte cpu0 table=zz index=1 -> 0x5 P\n", 5, "table must be a number",
                 id="not-a-number"),
    pytest.param("read cpu0 0x1000 seed=3\n", 5, "only a write has a seed", id="read-seed"),
    pytest.param("set cpu0 wp=1 wp=0\n", 5, "wp given twice", id="key-twice"),
    pytest.param("mode cpu0 6level root=0x1\n", 5, "unknown mode '6level'", id="bad-mode"),
    pytest.param(GOOD + "interleave at=faultin\n" + "  " + GOOD + GOOD, 6,
                 "interleave needs its op", id="interleave-one-indented"),
    pytest.param("interleave at=faultin\n", 5, "interleave needs its op",
                 id="interleave-no-indented"),
    pytest.param("interleave at=faultin\n" + ("  " + GOOD) * (MAX_SECOND + 2), 5,
                 "interleave needs its op", id="interleave-too-many-indented"),
    pytest.param("interleave at=nowhere\n  " + GOOD + "  " + GOOD, 5,
                 "unknown interleave point 'nowhere'", id="interleave-bad-point"),
    pytest.param("interleave at=faultin\n  " + GOOD + "  interleave at=walked\n  " + GOOD,
                 7, "an interleave cannot contain an interleave", id="nested-interleave"),
    pytest.param(GOOD + "  " + GOOD, 6, "an indented line must follow an interleave",
                 id="stray-indented-line"),
    pytest.param(GOOD + "config policy=update\n", 6, "config must come before the operations",
                 id="config-after-ops"),
    pytest.param("config policy=lazy\n", 5, "policy must be zap or update", id="bad-policy"),
    pytest.param("config maxphyaddr=39\n", 5, "maxphyaddr 0x27 is not one of the world's",
                 id="bad-maxphyaddr"),
])
def test_syntax_error_names_the_line(body: str, line: int, message: str) -> None:
    with pytest.raises(ProgramSyntaxError) as info:
        parse_program(HEAD + body)
    assert info.value.line == line
    assert str(info.value).startswith(f"line {line}: ")
    assert message in str(info.value)


def test_too_many_records_names_the_last_op_line() -> None:
    body = "zap-all\n" * MAX_OPS
    assert len(parse_program(HEAD + body).ops) == MAX_OPS
    with pytest.raises(ProgramSyntaxError) as info:
        parse_program(HEAD + body + "zap-all\n# trailing comment\n\n")
    assert info.value.line == 4 + MAX_OPS + 1
    assert f"more than {MAX_OPS} op records" in str(info.value)


def test_interleave_records_count_towards_the_limit() -> None:
    group = "interleave at=faultin\n  zap-all\n  zap-all\n"  # 3 records
    ok = group * (MAX_OPS // 3) + "zap-all\n" * (MAX_OPS % 3)
    assert len(parse_program(ok).ops) == MAX_OPS // 3 + MAX_OPS % 3
    with pytest.raises(ProgramSyntaxError, match="more than"):
        parse_program(ok + "zap-all\n")



@pytest.mark.parametrize(("body", "line"), [
    ("a=b\n", 5), ("interleave at=faultin\n  x=1\n  zap-all\n", 6)])
def test_line_of_only_settings_is_a_syntax_error(body: str, line: int) -> None:
    with pytest.raises(ProgramSyntaxError, match="must start with an operation name") as info:
        parse_program(HEAD + body)
    assert info.value.line == line


# Token soup: the parser's vocabulary, mangled.
_WORDS = st.sampled_from(["read", "write", "fetch", "pte", "map", "store", "mode", "cr3", "set",
                          "invlpg", "smi", "rsm", "memslot", "zap-all", "migrate", "shrink",
                          "mmu-pages", "interleave", "config", "cpu0", "cpu1", "cpu7", "->",
                          "current", "4level", "pae", "32bit", "create", "move", "delete",
                          "P|W|U", "P|", "|", "0", "rsvd", "ac", "0x1000", "0x1000+0x8",
                          "0x1000+", "+", "-1", "0x", "99999999999999999999", "¤"])
_KEYS = st.sampled_from(["root", "table", "index", "width", "cpl", "seed", "level", "upper",
                         "pool", "frame", "offset", "as", "slot", "base", "npages", "hva",
                         "gfn", "at", "policy", "boot", "wp", "nxe", "", "mmio-gen-bits"])
_VALUES = st.sampled_from(["0", "1", "3", "8", "0x8", "0x1", "current", "faultin", "zap",
                           "W|U", "NX", "", "=", "-5", "0x100000000", "x"])
_TOKENS = st.one_of(_WORDS, st.builds(lambda k, v: f"{k}={v}", _KEYS, _VALUES))
_LINES = st.builds(lambda indent, first, rest, comment: indent + " ".join([first, *rest])
                   + comment, st.sampled_from(["", "", "  ", "\t"]), _TOKENS,
                   st.lists(_TOKENS, max_size=8), st.sampled_from(["", " # c", "#"]))


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(_LINES, st.just(""), st.just("   ")), max_size=12))
def test_parser_raises_only_syntax_errors(lines: list[str]) -> None:
    try:
        p = parse_program("\n".join(lines))
    except ProgramSyntaxError as exc:
        assert 1 <= exc.line <= max(len(lines), 1)
        return
    assert parse_program(format_program(p)) == p
