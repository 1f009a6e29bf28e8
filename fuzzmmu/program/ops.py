"""Programs: a machine configuration and a sequence of guest and host operations.

Every operation is something a real guest or VMM can do; a later backend can replay the same
programs as guest code on real KVM. Page-table entries and stores reach page tables through the
guest kernel's direct map (fuzzmmu.world.layout), i.e. as ordinary guest stores.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

from fuzzmmu.arch.bits import PAGE_SHIFT, PTE_A, PTE_D, PTE_NX, PTE_P, PTE_PS, PTE_U, PTE_W
from fuzzmmu.model.mmu.internal import Point
from fuzzmmu.world.memslots import MemslotChange
from fuzzmmu.world.observe import AccessKind


class GuestMode(enum.Enum):
    """The paging modes a program switches a vCPU to."""

    OFF = "off"
    BIT32 = "32bit"
    BIT32_PSE = "32bit-pse"
    PAE = "pae"
    LONG4 = "4level"


class CrBit(enum.Enum):
    """Control bits a program toggles on their own."""

    WP = "wp"  # CR0.WP
    NXE = "nxe"  # EFER.NXE
    SMEP = "smep"  # CR4.SMEP
    SMAP = "smap"  # CR4.SMAP
    PSE = "pse"  # CR4.PSE


class Extra(enum.Enum):
    """One more thing about an entry's value."""

    NONE = "none"
    RSVD = "rsvd"  # bit 51 (8-byte: reserved below MAXPHYADDR 52) or bit 21 (4-byte PSE PDE)
    BIT13 = "bit13"  # reserved in a 2 MiB/1 GiB leaf, PSE-36 address bit in a 4 MiB one
    BIT62 = "bit62"  # ignored in long mode, reserved with PAE


_FLAG_ORDER = (("P", PTE_P), ("W", PTE_W), ("U", PTE_U), ("A", PTE_A), ("D", PTE_D),
               ("PS", PTE_PS), ("NX", PTE_NX))
FLAG_BITS = dict(_FLAG_ORDER)


@dataclass(frozen=True)
class Entry:
    """An entry value the guest kernel builds: a target frame, flags, one extra."""

    target: int  # guest frame number
    flags: int  # PTE_* bits among P, W, U, A, D, PS, NX
    extra: Extra = Extra.NONE

    def value(self, width: int) -> int:
        """The bytes of the entry for a 4-byte (32-bit paging) or 8-byte table."""
        if width == 4:
            low = ((self.target << PAGE_SHIFT) | (self.flags & 0xFFF)) & 0xFFFFFFFF
            if self.flags & PTE_PS:
                # A 4 MiB PDE holds physical address bits 39:32 in bits 20:13 (PSE-36).
                low = (low & ~0x3FE000) | (((self.target >> 20) & 0xFF) << 13)
            if self.extra is Extra.RSVD:
                low |= 1 << 21
            elif self.extra is Extra.BIT13:
                low |= 1 << 13
            return low
        value = (self.target << PAGE_SHIFT) | self.flags
        if self.extra is Extra.RSVD:
            value |= 1 << 51
        elif self.extra is Extra.BIT13:
            value |= 1 << 13
        elif self.extra is Extra.BIT62:
            value |= 1 << 62
        return value & ((1 << 64) - 1)

    def flags_str(self) -> str:
        names = [n for n, b in _FLAG_ORDER if self.flags & b]
        return "|".join(names) if names else "0"


@dataclass(frozen=True)
class Header:
    """The machine a program runs on, and the paging mode both vCPUs boot into (with the root
    table in frame fuzzmmu.program.world.BOOT_ROOT) before the first op."""

    policy: str = "zap"  # emulated PT writes: "zap" (modern KVM) or "update" (2007-2021)
    mmio_gen_bits: int = 19
    maxphyaddr: int = 40
    mmu_pages: int = 2000
    boot: GuestMode = GuestMode.OFF


class Op:
    """Base of operations; ``KIND`` is the op's name in the text form."""

    KIND: ClassVar[str]


@dataclass(frozen=True)
class SetMode(Op):
    """Switch a vCPU's paging mode, with ``root`` as the top-level table (paging off first,
    the kernel half linked into the root, then CR4/EFER/CR3/CR0)."""

    KIND: ClassVar[str] = "mode"
    vcpu: int
    mode: GuestMode
    root: int


@dataclass(frozen=True)
class LoadCr3(Op):
    """Switch address space (or flush the TLB when ``root`` is the current one)."""

    KIND: ClassVar[str] = "cr3"
    vcpu: int
    root: int


@dataclass(frozen=True)
class SetBit(Op):
    KIND: ClassVar[str] = "set"
    vcpu: int
    bit: CrBit
    on: bool


@dataclass(frozen=True)
class WritePte(Op):
    """Store an entry into slot ``index`` of the table in frame ``table``."""

    KIND: ClassVar[str] = "pte"
    vcpu: int
    table: int
    index: int
    entry: Entry
    width: int  # 4 or 8


@dataclass(frozen=True)
class Map(Op):
    """The guest kernel maps ``va`` to ``entry`` in the tables rooted at frame ``root`` (in
    ``fmt``'s format), as Linux's page-table code does: it walks its tables, takes a frame from
    ``pool`` onwards for each missing table (pool frames are not cleared, and may alias other
    tables), links it with ``upper`` rights, and writes the leaf at ``level`` (1: 4 KiB, 2: a
    2/4 MiB page, 3: a 1 GiB page; the target frame is aligned down to the page size, PS set).
    Every entry is written with a guest store."""

    KIND: ClassVar[str] = "map"
    vcpu: int
    root: int | None  # None: the vCPU's current root (its CR3 frame)
    fmt: GuestMode | None  # BIT32, PAE or LONG4; None: the vCPU's current format
    va: int
    entry: Entry
    level: int
    upper: int  # flags of new upper-level entries, among W, U, A, NX (P is always set)
    pool: int


@dataclass(frozen=True)
class Store(Op):
    """Store ``width`` bytes of an entry value at any offset of a frame (misaligned stores
    across two entries included)."""

    KIND: ClassVar[str] = "store"
    vcpu: int
    frame: int
    offset: int
    width: int
    entry: Entry


@dataclass(frozen=True)
class Access(Op):
    """A checked load, store or fetch at ``va + offset``."""

    KIND: ClassVar[str] = "access"
    vcpu: int
    kind: AccessKind
    va: int
    offset: int
    width: int
    cpl: int
    ac: bool
    seed: int  # the stored value's seed (fuzzmmu.program.world.data_value)


@dataclass(frozen=True)
class Invlpg(Op):
    KIND: ClassVar[str] = "invlpg"
    vcpu: int
    va: int


@dataclass(frozen=True)
class Smi(Op):
    KIND: ClassVar[str] = "smi"
    vcpu: int


@dataclass(frozen=True)
class Rsm(Op):
    KIND: ClassVar[str] = "rsm"
    vcpu: int


@dataclass(frozen=True)
class Memslot(Op):
    KIND: ClassVar[str] = "memslot"
    as_id: int
    slot: int
    change: MemslotChange
    base: int = 0
    npages: int = 0
    hva: int = 0


@dataclass(frozen=True)
class ZapAll(Op):
    KIND: ClassVar[str] = "zap-all"


@dataclass(frozen=True)
class Migrate(Op):
    """The host migrates the page backing ``gfn`` (an MMU-notifier invalidation)."""

    KIND: ClassVar[str] = "migrate"
    as_id: int
    gfn: int


@dataclass(frozen=True)
class Shrink(Op):
    KIND: ClassVar[str] = "shrink"
    count: int


@dataclass(frozen=True)
class MmuPages(Op):
    KIND: ClassVar[str] = "mmu-pages"
    count: int


@dataclass(frozen=True)
class Interleave(Op):
    """Run ``first``; where it reaches ``point`` inside KVM, run the ``second`` ops (one to
    three, e.g. another vCPU's store and then its fault). The first op and the second group
    may appear in either order: both are architecturally allowed."""

    KIND: ClassVar[str] = "interleave"
    point: Point
    first: Op
    second: tuple[Op, ...]


MAP_FORMATS = (None, None, None, None, None, GuestMode.BIT32, GuestMode.PAE, GuestMode.LONG4)
UPPER_FLAGS = (PTE_W, PTE_U, PTE_A, PTE_NX)

SIMPLE_OPS: tuple[type[Op], ...] = (SetMode, LoadCr3, SetBit, WritePte, Map, Store, Access,
                                     Invlpg, Smi, Rsm, Memslot, ZapAll, Migrate, Shrink, MmuPages)


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
