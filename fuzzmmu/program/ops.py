"""Programs: a machine configuration and a sequence of guest and host operations.

Every operation is something a real guest or VMM can do; a later backend can replay the same
programs as guest code on real KVM. Page-table entries and stores reach page tables through the
guest kernel's direct map (fuzzmmu.world.layout), i.e. as ordinary guest stores.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Annotated, ClassVar, Final

from fuzzmmu.arch.bits import PTE_A, PTE_D, PTE_NX, PTE_P, PTE_PS, PTE_U, PTE_W
from fuzzmmu.model.mmu.internal import Point
from fuzzmmu.program import world as W
from fuzzmmu.program.schema import (
    Address,
    BiasedFlags,
    Composite,
    Cpu,
    Fix,
    FlagMask,
    FlagWord,
    Key,
    Name,
    Nested,
    Plus,
    SwitchName,
    SwitchValue,
    Table,
    Word,
)
from fuzzmmu.program.world import Extra
from fuzzmmu.world.memslots import MemslotChange
from fuzzmmu.world.observe import AccessKind


class GuestMode(enum.Enum):
    """The paging modes a program switches a vCPU to."""
    __hash__ = object.__hash__  # see fuzzmmu.world.observe.ObsKind

    OFF = "off"
    BIT32 = "32bit"
    BIT32_PSE = "32bit-pse"
    PAE = "pae"
    LONG4 = "4level"


class CrBit(enum.Enum):
    """Control bits a program toggles on their own."""
    __hash__ = object.__hash__  # see fuzzmmu.world.observe.ObsKind

    WP = "wp"  # CR0.WP
    NXE = "nxe"  # EFER.NXE
    SMEP = "smep"  # CR4.SMEP
    SMAP = "smap"  # CR4.SMAP
    PSE = "pse"  # CR4.PSE


# Entry flags by name, in the order the text form spells them.
FLAG_BITS: Final = {"P": PTE_P, "W": PTE_W, "U": PTE_U, "A": PTE_A, "D": PTE_D, "PS": PTE_PS,
                    "NX": PTE_NX}


@dataclass(frozen=True)
class Entry:
    """An entry value the guest kernel builds: a target frame, flags, one extra (its bytes:
    fuzzmmu.program.world.entry_value)."""

    target: int  # guest frame number
    flags: int  # PTE_* bits among P, W, U, A, D, PS, NX
    extra: Extra = Extra.NONE


# ---------------------------------------------------------------------- the schema's domains
# Each field below is Annotated with its domain (the world's values it takes, each a digit of
# the binary form), its syntax in the text form and, for a field that depends on another, a
# Fix; fuzzmmu.program.schema derives the codec, the text form and the strategies from them.

VCPU: Final = Cpu()
ADDRESS: Final = Table(W.VA_CHOICES, "address", hexa=True)
WIDTH: Final = Table(W.WIDTHS, "width")
ROOT: Final = Table(W.ROOTS, "root frame", hexa=True)
AS_ID: Final = Table(range(2), "address space")
_TARGET: Final = Table(W.TARGETS, "target frame", hexa=True)
_EXTRA: Final = Table(tuple(Extra), "extra")
ENTRY: Final = Composite(Entry, (("target", _TARGET),
                                 ("flags", FlagMask(FLAG_BITS, tuple(FLAG_BITS), "entry flags")),
                                 ("extra", _EXTRA)),
                         "entry", "->", Extra.NONE)
# A kernel's mappings are mostly present and executable: P unless a 1-in-8 digit says not,
# NX only on a 1-in-8 digit (NX is a reserved bit while EFER.NXE is off). PS is the level's.
MAP_ENTRY: Final = Composite(Entry, (
    ("target", _TARGET),
    ("flags", BiasedFlags(FLAG_BITS, (("P", 8, True), ("W", 2, True), ("U", 2, True),
                                      ("A", 2, True), ("D", 2, True), ("NX", 8, False)),
                          "a map entry's flags", why="a map sets PS itself from its level")),
    ("extra", _EXTRA)), "entry", "->", Extra.NONE)
# Upper entries: W and U unless a 1-in-8 digit says not, A on a coin, NX on a 1-in-8 digit.
UPPER: Final = BiasedFlags(FLAG_BITS, (("W", 8, True), ("U", 8, True), ("A", 2, True),
                                       ("NX", 8, False)),
                           "upper entries' flags",
                           why="upper entries take W, U, A or NX, not {name!r}")
# A map's table format: mostly the vCPU's current one (None).
MAP_FORMATS: Final = (None, None, None, None, None, GuestMode.BIT32, GuestMode.PAE, GuestMode.LONG4)
# Boot modes, most programs running paged (a mode may repeat: its first index stands for it).
BOOT_MODES: Final = (GuestMode.LONG4, GuestMode.PAE, GuestMode.BIT32, GuestMode.LONG4,
                     GuestMode.BIT32_PSE, GuestMode.OFF, GuestMode.LONG4, GuestMode.PAE)
MAX_SECOND: Final = 3  # ops in the second part of an interleave
POINT: Final = Table(tuple(Point), "interleave point")


def _in_page(offset: int, width: int) -> int:
    """An access ends in its page: its offset moves down."""
    return min(offset, 4096 - width)


def _stored(seed: int, kind: AccessKind) -> int:
    """A load or fetch stores nothing: its seed is normalised away, so that two programs that
    differ only there are one program."""
    return seed if kind is AccessKind.WRITE else 0


def _slot_in(slot: int, width: int) -> int:
    """A slot beyond the table's entries (512 of 8 bytes, 1024 of 4) wraps."""
    return slot % (4096 // width)


def _level_in(level: int, fmt: GuestMode | None) -> int:
    """No 1 GiB pages below long mode (None: the vCPU's current format, which may be long)."""
    return min(level, 2) if fmt is not None and fmt is not GuestMode.LONG4 else level


def _unless_deleted(value: int, change: MemslotChange) -> int:
    """A deleted memslot has no base."""
    return 0 if change is MemslotChange.DELETE else value


def _if_created(value: int, change: MemslotChange) -> int:
    """Only a create gives a memslot a size and host pages (a move keeps the slot's)."""
    return value if change is MemslotChange.CREATE else 0


# ---------------------------------------------------------------------- header and ops


@dataclass(frozen=True)
class Header:
    """The machine a program runs on, and the paging mode both vCPUs boot into (with the root
    table in frame fuzzmmu.program.world.BOOT_ROOT) before the first op."""

    # emulated PT writes: "zap" (modern KVM) or "update" (2007-2021)
    policy: Annotated[str, Table(("zap", "update"), "policy"), Key()] = "zap"
    mmio_gen_bits: Annotated[int, Table(W.MMIO_GEN_BITS, "mmio-gen-bits"), Key()] = 19
    maxphyaddr: Annotated[int, Table(W.MAXPHYADDRS, "maxphyaddr"), Key()] = 40
    mmu_pages: Annotated[int, Table(W.MMU_PAGES, "mmu-pages"), Key()] = 2000
    boot: Annotated[GuestMode, Table(BOOT_MODES, "boot mode"), Key()] = GuestMode.OFF
    # Leaf shadow pages may go unsync (every KVM since 2008); off, every shadowed table stays
    # write-protected. The last digit: headers written before it existed decode with it off.
    unsync: Annotated[bool, Table((False, True), "unsync"), FlagWord("unsync")] = False


class Op:
    """Base of operations; ``KIND`` is the op's name in the text form."""

    KIND: ClassVar[str]


@dataclass(frozen=True)
class SetMode(Op):
    """Switch a vCPU's paging mode, with ``root`` as the top-level table (paging off first,
    the kernel half linked into the root, then CR4/EFER/CR3/CR0)."""

    KIND: ClassVar[str] = "mode"
    vcpu: Annotated[int, VCPU, Word()]
    mode: Annotated[GuestMode, Table(tuple(GuestMode), "mode"), Word()]
    root: Annotated[int, ROOT, Key()]


@dataclass(frozen=True)
class LoadCr3(Op):
    """Switch address space (or flush the TLB when ``root`` is the current one)."""

    KIND: ClassVar[str] = "cr3"
    vcpu: Annotated[int, VCPU, Word()]
    root: Annotated[int, ROOT, Key()]


@dataclass(frozen=True)
class SetBit(Op):
    KIND: ClassVar[str] = "set"
    vcpu: Annotated[int, VCPU, Word()]
    bit: Annotated[CrBit, Table(tuple(CrBit), "control bit"), SwitchName()]
    on: Annotated[bool, Table((False, True), "bit value"), SwitchValue()]


@dataclass(frozen=True)
class WritePte(Op):
    """Store an entry into slot ``index`` of the table in frame ``table``."""

    KIND: ClassVar[str] = "pte"
    vcpu: Annotated[int, VCPU, Word()]
    table: Annotated[int, Table(range(64), "table frame", hexa=True), Key()]
    index: Annotated[int, Table(W.SLOTS, "index"), Key(), Fix(_slot_in, "width")]
    entry: Annotated[Entry, ENTRY, Word()]
    width: Annotated[int, Table((4, 8), "width"), Key(default=8)]


@dataclass(frozen=True)
class Map(Op):
    """The guest kernel maps ``va`` to ``entry`` in the tables rooted at frame ``root`` (in
    ``fmt``'s format), as Linux's page-table code does: it walks its tables, takes a frame from
    ``pool`` onwards for each missing table (pool frames are not cleared, and may alias other
    tables), links it with ``upper`` rights, and writes the leaf at ``level`` (1: 4 KiB, 2: a
    2/4 MiB page, 3: a 1 GiB page; the target frame is aligned down to the page size, PS set).
    Every entry is written with a guest store."""

    KIND: ClassVar[str] = "map"
    vcpu: Annotated[int, VCPU, Word()]
    # None: the vCPU's current root (its CR3 frame)
    root: Annotated[int | None, Table(W.MAP_ROOTS, "root frame", hexa=True), Key()]
    # BIT32, PAE or LONG4; None: the vCPU's current format
    fmt: Annotated[GuestMode | None, Table(MAP_FORMATS, "table format"), Word()]
    va: Annotated[int, ADDRESS, Address()]
    entry: Annotated[Entry, MAP_ENTRY, Word()]
    level: Annotated[int, Table(W.MAP_LEVELS, "level"), Key(default=1),
                     Fix(_level_in, "fmt", why="level {level} does not exist in {fmt} tables")]
    # flags of new upper-level entries, among W, U, A, NX (P is always set)
    upper: Annotated[int, UPPER, Key(default=0)]
    pool: Annotated[int, Table(W.POOLS, "pool frame", hexa=True), Key()]


@dataclass(frozen=True)
class Store(Op):
    """Store ``width`` bytes of an entry value at any offset of a frame (misaligned stores
    across two entries included)."""

    KIND: ClassVar[str] = "store"
    vcpu: Annotated[int, VCPU, Word()]
    frame: Annotated[int, Table(range(64), "frame", hexa=True), Key()]
    offset: Annotated[int, Table(W.STORE_OFFSETS, "store offset", hexa=True), Key()]
    width: Annotated[int, WIDTH, Key()]
    entry: Annotated[Entry, ENTRY, Word()]


@dataclass(frozen=True)
class Access(Op):
    """A checked load, store or fetch at ``va + offset``."""

    KIND: ClassVar[str] = "access"
    vcpu: Annotated[int, VCPU, Word()]
    kind: Annotated[AccessKind, Table((AccessKind.READ, AccessKind.WRITE, AccessKind.FETCH),
                                      "access"), Name()]
    va: Annotated[int, ADDRESS, Address()]
    offset: Annotated[int, Table(W.OFFSETS, "offset", hexa=True), Plus(),
                      Fix(_in_page, "width")]
    width: Annotated[int, WIDTH, Key(default=8)]
    cpl: Annotated[int, Table((0, 3), "cpl"), Key(default=0)]
    ac: Annotated[bool, Table((False, True), "ac"), FlagWord("ac")]
    # the stored value's seed (fuzzmmu.program.world.data_value)
    seed: Annotated[int, Table(range(256), "seed", hexa=True), Key(default=0),
                    Fix(_stored, "kind", why="only a write has a seed")]


@dataclass(frozen=True)
class Invlpg(Op):
    KIND: ClassVar[str] = "invlpg"
    vcpu: Annotated[int, VCPU, Word()]
    va: Annotated[int, ADDRESS, Address()]


@dataclass(frozen=True)
class Smi(Op):
    KIND: ClassVar[str] = "smi"
    vcpu: Annotated[int, VCPU, Word()]


@dataclass(frozen=True)
class Rsm(Op):
    KIND: ClassVar[str] = "rsm"
    vcpu: Annotated[int, VCPU, Word()]


@dataclass(frozen=True)
class Memslot(Op):
    KIND: ClassVar[str] = "memslot"
    as_id: Annotated[int, AS_ID, Key("as")]
    slot: Annotated[int, Table(range(4), "slot"), Key()]
    change: Annotated[MemslotChange, Table(tuple(MemslotChange), "change"), Word()]
    base: Annotated[int, Table(W.SLOT_BASES, "base gfn", hexa=True), Key(),
                    Fix(_unless_deleted, "change", why="a delete has no base")] = 0
    npages: Annotated[int, Table(W.SLOT_SIZES, "size"), Key(),
                      Fix(_if_created, "change", why="only a create has npages")] = 0
    hva: Annotated[int, Table(W.SLOT_HVAS, "host page", hexa=True), Key(),
                   Fix(_if_created, "change", why="only a create has hva")] = 0


@dataclass(frozen=True)
class ZapAll(Op):
    KIND: ClassVar[str] = "zap-all"


@dataclass(frozen=True)
class Migrate(Op):
    """The host migrates the page backing ``gfn`` (an MMU-notifier invalidation)."""

    KIND: ClassVar[str] = "migrate"
    as_id: Annotated[int, AS_ID, Key("as")]
    gfn: Annotated[int, Table(range(64), "gfn", hexa=True), Key()]


@dataclass(frozen=True)
class Shrink(Op):
    KIND: ClassVar[str] = "shrink"
    count: Annotated[int, Table(W.SHRINK_COUNTS, "count"), Word()]


@dataclass(frozen=True)
class MmuPages(Op):
    KIND: ClassVar[str] = "mmu-pages"
    count: Annotated[int, Table(W.MAX_PAGES, "count"), Word()]


@dataclass(frozen=True)
class Interleave(Op):
    """Run ``first``; where it reaches ``point`` inside KVM, run the ``second`` ops (one to
    three, e.g. another vCPU's store and then its fault). The first op and the second group
    may appear in either order: both are architecturally allowed."""

    KIND: ClassVar[str] = "interleave"
    point: Annotated[Point, POINT, Key("at")]
    first: Annotated[Op, Nested()]
    second: Annotated[tuple[Op, ...], Nested(group=(1, MAX_SECOND))]


SIMPLE_OPS: Final[tuple[type[Op], ...]] = (SetMode, LoadCr3, SetBit, WritePte, Map, Store,
                                           Access, Invlpg, Smi, Rsm, Memslot, ZapAll, Migrate,
                                           Shrink, MmuPages)

@dataclass(frozen=True)
class Program:
    header: Header
    ops: tuple[Op, ...]

    def flat_ops(self) -> list[Op]:
        """Every op, interleaved ones in execution order of their parts."""
        out: list[Op] = []
        for op in self.ops:
            if isinstance(op, Interleave):
                out += [op.first, *op.second]
            else:
                out.append(op)
        return out
