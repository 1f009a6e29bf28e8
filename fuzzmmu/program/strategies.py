"""Hypothesis strategies for programs: raw byte strings for the decoder, and ops and Programs
built field by field from the op schema (fuzzmmu.program.ops): each field a digit of its
domain drawn uniformly (shrinking towards the first value of the world's table), unlike
generate.py, which aims its ops at the tables a program has built. Property tests and the
Hypothesis engine of the benchmark draw from these."""

from __future__ import annotations

from typing import Any, Final, TypeVar

from hypothesis import strategies as st

from fuzzmmu.program.codec import HEADER_SIZE, MAX_OPS, RECORD_SIZE
from fuzzmmu.program.ops import (
    SIMPLE_OPS,
    Access,
    Header,
    Interleave,
    Invlpg,
    LoadCr3,
    Map,
    Memslot,
    Migrate,
    MmuPages,
    Op,
    Program,
    Rsm,
    SetBit,
    SetMode,
    Shrink,
    Smi,
    Store,
    WritePte,
    ZapAll,
)
from fuzzmmu.program.schema import Nested, layout

T = TypeVar("T")

# Byte strings of every interesting length: empty, partial header, partial records, and more
# records than MAX_OPS.
program_bytes = st.binary(max_size=HEADER_SIZE + RECORD_SIZE * (MAX_OPS + 6))


def _nested(operands: Nested) -> st.SearchStrategy[Any]:
    if operands.group is None:
        return simple_ops
    least, most = operands.group
    return st.lists(simple_ops, min_size=least, max_size=most).map(tuple)


def of(kind: type[T]) -> st.SearchStrategy[T]:
    """Any op (or header) of the world: a uniform digit per field, fixed as decoding fixes it,
    then any nested ops."""
    lay = layout(kind)
    fields = [st.integers(0, f.domain.radix - 1).map(f.domain.value) for f in lay.fields]
    fields += [_nested(operands) for _, operands in lay.nested]
    return st.tuples(*fields).map(lambda args: lay.build(list(args)))


def accesses() -> st.SearchStrategy[Access]:
    return of(Access)


def maps() -> st.SearchStrategy[Map]:
    return of(Map)


def _any(kinds: tuple[type[Op], ...]) -> st.SearchStrategy[Op]:
    return st.one_of(*(of(kind) for kind in kinds))


# Groups of op kinds, each group as likely as an access or a map (the benchmark's state
# machine has a rule per group).
_TABLE_WRITES: Final[tuple[type[Op], ...]] = (WritePte, Store)
_CONTROL: Final[tuple[type[Op], ...]] = (SetMode, LoadCr3, SetBit, Invlpg)
_SMM: Final[tuple[type[Op], ...]] = (Smi, Rsm)
_HOST: Final[tuple[type[Op], ...]] = (Memslot, ZapAll, Migrate, Shrink, MmuPages)
assert {Access, Map, *_TABLE_WRITES, *_CONTROL, *_SMM, *_HOST} == set(SIMPLE_OPS), (
    "a new op kind goes into a group")
table_writes = _any(_TABLE_WRITES)
control_ops = _any(_CONTROL)
smm_ops = _any(_SMM)
host_ops = _any(_HOST)
simple_ops: st.SearchStrategy[Op] = st.one_of(accesses(), maps(), table_writes, control_ops,
                                              smm_ops, host_ops)
interleaves = of(Interleave)
ops = st.one_of(simple_ops, interleaves)
headers = of(Header)


def records(op: Op) -> int:
    """Op records of ``op`` in the binary form: an interleave record, its op, its second ops."""
    return 2 + len(op.second) if isinstance(op, Interleave) else 1


def record_count(program: Program) -> int:
    return sum(records(op) for op in program.ops)


@st.composite
def programs(draw: st.DrawFn, max_records: int = MAX_OPS) -> Program:
    """A program of at most ``max_records`` op records."""
    out: list[Op] = []
    used = 0
    for op in draw(st.lists(ops, max_size=max_records)):
        if used + records(op) > max_records:
            break
        out.append(op)
        used += records(op)
    return Program(draw(headers), tuple(out))
