"""The op schema (fuzzmmu.program.schema): what the codec and the text form derive from a
field's declaration, and the declarations the schema refuses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import pytest

from fuzzmmu.program import world as W
from fuzzmmu.program.codec import decode, encode, record_digits
from fuzzmmu.program.ops import Access, Header, Memslot, Program, WritePte
from fuzzmmu.program.schema import Fix, Key, Table, layout
from fuzzmmu.program.text import ProgramSyntaxError, format_op, parse_program
from fuzzmmu.world.memslots import MemslotChange
from fuzzmmu.world.observe import AccessKind

_SMALL = Table((1, 2), "small")


@dataclass(frozen=True)
class _NoSyntax:
    a: Annotated[int, _SMALL]


@dataclass(frozen=True)
class _ChainedFix:
    a: Annotated[int, _SMALL, Key()]
    b: Annotated[int, _SMALL, Key(), Fix(min, "a")]
    c: Annotated[int, _SMALL, Key(), Fix(min, "b")]


@pytest.mark.parametrize("cls", [_NoSyntax, _ChainedFix])
def test_schema_refuses_incomplete_declarations(cls: type) -> None:
    with pytest.raises(TypeError):
        layout(cls)


def test_a_field_forced_by_another_is_left_out_of_the_text() -> None:
    read = Access(0, AccessKind.READ, 0x1000, 0, 8, 0, False, 0)
    write = Access(0, AccessKind.WRITE, 0x1000, 0, 8, 0, False, 0)
    assert "seed" not in format_op(read)
    assert format_op(write).endswith(" seed=0x0")
    delete = Memslot(0, 1, MemslotChange.DELETE)
    assert format_op(delete) == "memslot as=0 slot=1 delete"
    # Given anyway, it must be the value it is forced to.
    assert parse_program("read cpu0 0x1000 seed=0\n").ops == (read,)
    assert parse_program("memslot as=0 slot=1 delete base=0x0\n").ops == (delete,)
    with pytest.raises(ProgramSyntaxError, match="a delete has no base"):
        parse_program("memslot as=0 slot=1 delete base=0x8\n")
    with pytest.raises(ProgramSyntaxError, match="missing npages="):
        parse_program("memslot as=0 slot=1 create base=0x8 hva=0x0\n")


def test_a_fixed_field_takes_the_values_its_fix_gives() -> None:
    """A pte's slot wraps in its table: index 510 of an 8-byte table is slot 1022, which is no
    index of a 4-byte table (1024 entries)."""
    (op,) = parse_program("pte cpu0 table=0x4 index=510 -> 0x5 P width=8\n").ops
    assert op == WritePte(0, 4, 510, op.entry, 8)
    data = encode(Program(Header(), (op,)))
    _, digits = record_digits(data[4:])
    assert digits[2] == (W.SLOTS.index(1022), len(W.SLOTS))  # after the vcpu and the table
    assert decode(data).ops == (op,)
    with pytest.raises(ProgramSyntaxError, match="index 0x1fe is not one of the world's"):
        parse_program("pte cpu0 table=0x4 index=510 -> 0x5 P width=4\n")
    with pytest.raises(ProgramSyntaxError, match="level 3 does not exist in pae tables"):
        parse_program("map cpu0 root=current pae 0x1000 -> 0x5 P level=3 pool=0x8\n")


def test_an_op_outside_the_world_still_formats() -> None:
    """The executor writes any op it runs into its trace, whether or not it has a binary form."""
    op = Access(2, AccessKind.WRITE, 0x1234, 0x20, 3, 1, True, 5)
    assert format_op(op) == "write cpu2 0x1234+0x20 width=3 cpl=1 ac seed=0x5"
    with pytest.raises(ValueError):
        encode(Program(Header(), (op,)))
