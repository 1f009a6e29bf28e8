"""Hypothesis strategies for programs: raw byte strings for the decoder, and ops and Programs
built field by field from the world's tables (fuzzmmu.program.world), uniformly, unlike
generate.py, which aims its ops at the tables a program has built. Property tests and the
Hypothesis engine of the benchmark draw from these."""

from __future__ import annotations

from hypothesis import strategies as st

from fuzzmmu.model.mmu.internal import Point
from fuzzmmu.program import world as W
from fuzzmmu.program.codec import HEADER_SIZE, MAX_OPS, MAX_SECOND, RECORD_SIZE, STORE_OFFSETS
from fuzzmmu.program.ops import (
    FLAG_BITS,
    MAP_FORMATS,
    UPPER_FLAGS,
    Access,
    CrBit,
    Entry,
    Extra,
    GuestMode,
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
from fuzzmmu.world.memslots import MemslotChange
from fuzzmmu.world.observe import AccessKind

# Byte strings of every interesting length: empty, partial header, partial records, and more
# records than MAX_OPS.
program_bytes = st.binary(max_size=HEADER_SIZE + RECORD_SIZE * (MAX_OPS + 6))

vcpus = st.integers(0, 1)
vas = st.sampled_from(W.VAS)
frames = st.integers(0, 63)


def flag_sets(names: tuple[str, ...]) -> st.SearchStrategy[int]:
    return st.lists(st.sampled_from(names), unique=True).map(
        lambda chosen: sum(FLAG_BITS[n] for n in chosen))


def entries(flag_names: tuple[str, ...] = tuple(FLAG_BITS)) -> st.SearchStrategy[Entry]:
    return st.builds(Entry, st.sampled_from(W.TARGETS), flag_sets(flag_names),
                     st.sampled_from(list(Extra)))


@st.composite
def accesses(draw: st.DrawFn) -> Access:
    kind = draw(st.sampled_from(list(AccessKind)))
    width = draw(st.sampled_from(W.WIDTHS))
    offset = min(draw(st.sampled_from(W.OFFSETS)), 4096 - width)
    seed = draw(st.integers(0, 255)) if kind is AccessKind.WRITE else 0
    return Access(draw(vcpus), kind, draw(vas), offset, width, draw(st.sampled_from((0, 3))),
                  draw(st.booleans()), seed)


@st.composite
def write_ptes(draw: st.DrawFn) -> WritePte:
    width = draw(st.sampled_from((4, 8)))
    index = draw(st.sampled_from(W.SLOTS)) % (4096 // width)
    return WritePte(draw(vcpus), draw(frames), index, draw(entries()), width)


@st.composite
def stores(draw: st.DrawFn) -> Store:
    width = draw(st.sampled_from(W.WIDTHS))
    offset = min(draw(st.sampled_from(STORE_OFFSETS)), 4096 - width)
    return Store(draw(vcpus), draw(frames), offset, width, draw(entries()))


@st.composite
def maps(draw: st.DrawFn) -> Map:
    fmt = draw(st.sampled_from(MAP_FORMATS))
    level = draw(st.sampled_from(W.MAP_LEVELS))
    if fmt not in (None, GuestMode.LONG4):
        level = min(level, 2)  # no 1 GiB pages below long mode
    upper = draw(st.lists(st.sampled_from(UPPER_FLAGS), unique=True).map(sum))
    # A map sets PS itself from its level.
    entry = draw(entries(tuple(n for n in FLAG_BITS if n != "PS")))
    return Map(draw(vcpus), draw(st.sampled_from(W.MAP_ROOTS)), fmt, draw(vas), entry, level,
               upper, draw(st.sampled_from(W.POOLS)))


@st.composite
def memslots(draw: st.DrawFn) -> Memslot:
    as_id, slot = draw(st.integers(0, 1)), draw(st.integers(0, 3))
    change = draw(st.sampled_from(list(MemslotChange)))
    if change is MemslotChange.DELETE:
        return Memslot(as_id, slot, change)
    base = draw(st.sampled_from(W.SLOT_BASES))
    if change is MemslotChange.MOVE:
        return Memslot(as_id, slot, change, base)
    return Memslot(as_id, slot, change, base, draw(st.sampled_from(W.SLOT_SIZES)),
                   draw(st.sampled_from(W.SLOT_HVAS)))


table_writes: st.SearchStrategy[Op] = st.one_of(write_ptes(), stores())
control_ops: st.SearchStrategy[Op] = st.one_of(
    st.builds(SetMode, vcpus, st.sampled_from(list(GuestMode)), st.sampled_from(W.ROOTS)),
    st.builds(LoadCr3, vcpus, st.sampled_from(W.ROOTS)),
    st.builds(SetBit, vcpus, st.sampled_from(list(CrBit)), st.booleans()),
    st.builds(Invlpg, vcpus, vas))
smm_ops: st.SearchStrategy[Op] = st.one_of(st.builds(Smi, vcpus), st.builds(Rsm, vcpus))
host_ops: st.SearchStrategy[Op] = st.one_of(
    memslots(),
    st.just(ZapAll()),
    st.builds(Migrate, st.integers(0, 1), frames),
    st.builds(Shrink, st.sampled_from(W.SHRINK_COUNTS)),
    st.builds(MmuPages, st.sampled_from(W.MAX_PAGES)))
simple_ops: st.SearchStrategy[Op] = st.one_of(accesses(), maps(), table_writes, control_ops,
                                              smm_ops, host_ops)
interleaves = st.builds(Interleave, st.sampled_from(list(Point)), simple_ops,
                        st.lists(simple_ops, min_size=1, max_size=MAX_SECOND).map(tuple))
ops = st.one_of(simple_ops, interleaves)

headers = st.builds(Header, st.sampled_from(("zap", "update")), st.sampled_from(W.MMIO_GEN_BITS),
                    st.sampled_from(W.MAXPHYADDRS), st.sampled_from(W.MMU_PAGES),
                    st.sampled_from(list(GuestMode)))


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
