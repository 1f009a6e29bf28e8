"""The small world programs index into: virtual addresses, page-table slots, frames and
values. Fields of an operation are small indices into these tables, so that random programs
build page-table hierarchies that share and alias tables and hit interesting entries.

Virtual addresses combine per-level slot choices that mean something in every paging mode: a
64-bit canonical address whose low 32 bits are what 32-bit and PAE guests use.
"""

from __future__ import annotations

import enum
from typing import Final

from fuzzmmu.arch.bits import PAGE_SHIFT, PTE_PS
from fuzzmmu.world.layout import DIRECT_MAP, NUM_GFNS

# Bits 47:30 (PML4 and PDPT slot; in 32-bit modes bits 31:30 pick the 1 GiB quarter).
_VA_HIGH: Final = (
    0x0000_0000_0000_0000,  # PML4E 0, PDPTE 0
    0x0000_0000_4000_0000,  # PML4E 0, PDPTE 1 (32-bit: PDE 256, the second quadrant root)
    0x0000_0080_8000_0000,  # PML4E 1, PDPTE 2 (32-bit: PDE 512)
    DIRECT_MAP,  # PML4E 511, PDPTE 3: the kernel direct map (32-bit: PDE 768)
)
_VA_L2: Final = (0, 1)  # PD slot (bits 29:21); in 32-bit paging bit 21 is the PT quadrant
_VA_L1: Final = (0, 1, 8, 511)  # PT slot (bits 20:12): two in one prefetch group, another, the last

VAS: Final[tuple[int, ...]] = tuple(hi | (l2 << 21) | (l1 << 12)
                                    for hi in _VA_HIGH for l2 in _VA_L2 for l1 in _VA_L1)
# The address field picks from VA_CHOICES: every address once, and four hot ones (a first PT,
# the other 32-bit PT quadrant, a second PDPTE, a second PML4E) many times, so that maps and
# accesses of a random program meet. An index stands for the first occurrence of its address.
_HOT: Final = (0x1000, 0x201000, 0x4000_1000, 0x80_8020_1000)
VA_CHOICES: Final[tuple[int, ...]] = VAS + tuple(va for va in _HOT for _ in range(8))

OFFSETS: Final = (0x0, 0x8, 0x10, 0x6, 0x7FC, 0xFF8, 0xFFC, 0x3)  # byte offset of an access

# Entry slots of a table; an index beyond a 64-bit table's 512 entries wraps.
SLOTS: Final = (0, 1, 2, 3, 4, 7, 8, 255, 256, 257, 511, 512, 513, 768, 1022, 1023)

# Store offsets: around the interesting slots (4-byte granularity), plus 0-7 bytes; at most
# 4096 - 8, so that a store of any width stays in its frame.
STORE_OFFSETS: Final[tuple[int, ...]] = tuple(dict.fromkeys(
    min(s * 4 + d, 4088) for s in SLOTS for d in range(8)))

# Targets of entries: guest frames 0-63, then frames outside RAM that matter to large pages,
# PSE-36 and MAXPHYADDR.
_SPECIAL_TARGETS: Final = (
    0x200, 0x201, 0x400, 0x401, 0x600, 0x800, 0xC00, 0xFFFF,
    0x40000, 0x80000, 0xC0000, 0xFFFFF, 0x100000, 0x100400, 0x400000, 0xFFFFFF,
)
TARGETS: Final[tuple[int, ...]] = tuple(range(NUM_GFNS)) + _SPECIAL_TARGETS

WIDTHS: Final[tuple[int, ...]] = (1, 2, 4, 8)

# Frames a program uses as roots (CR3 and the tables it maps in): a few, so that programs
# switch between the same address spaces and map into the one they run on. Frame 1 is the
# boot root and repeats (an index into this table stands for its first occurrence).
ROOTS: Final[tuple[int, ...]] = (1, 1, 1, 2, 2, 3, 4, 40)
BOOT_ROOT: Final = 1
# Where a map goes: None is the vCPU's current root (what a kernel maps into most of the time).
MAP_ROOTS: Final[tuple[int | None, ...]] = (None, None, None, None, None, None, 2, 40)
MAP_LEVELS: Final = (1, 1, 1, 1, 1, 2, 2, 3)  # mostly 4 KiB pages
# Page-table pages come from the kernel's allocator: RAM frames 8-47, handed out in order from
# one of a few starting points, so that maps share tables (and sometimes alias them).
POOL_FRAMES: Final = range(8, 48)
POOLS: Final = (8, 12, 16, 20, 24, 30, 36, 44)


def next_pool_frame(frame: int) -> int:
    lo, n = POOL_FRAMES.start, len(POOL_FRAMES)
    return lo + (frame - lo + 1) % n

# Memslot updates: base gfns, sizes and host pages to choose from.
SLOT_BASES: Final = (0, 8, 16, 32, 48, 56, 60, 64)
SLOT_SIZES: Final = (1, 4, 8, 16)
SLOT_HVAS: Final = (0, 8, 16, 32, 48, 56, 64, 68)
MAX_PAGES: Final = (16, 20, 32, 64, 2000)
SHRINK_COUNTS: Final = (1, 2, 5, 25)

MMIO_GEN_BITS: Final = (19, 3, 2, 8)
MAXPHYADDRS: Final = (40, 36, 46, 52)
MMU_PAGES: Final = (2000, 64, 32, 20)


def data_value(seed: int, width: int) -> int:
    """The value a store of ``width`` bytes writes, from an 8-bit seed."""
    return (seed * 0x0101010101010101) & ((1 << (8 * width)) - 1)


class Extra(enum.Enum):
    """One more thing about an entry's value."""
    __hash__ = object.__hash__  # see fuzzmmu.world.observe.ObsKind

    NONE = "none"
    RSVD = "rsvd"  # bit 51 (8-byte: reserved below MAXPHYADDR 52) or bit 21 (4-byte PSE PDE)
    BIT13 = "bit13"  # reserved in a 2 MiB/1 GiB leaf, PSE-36 address bit in a 4 MiB one
    BIT62 = "bit62"  # ignored in long mode, reserved with PAE


def entry_value(target: int, flags: int, extra: Extra, width: int) -> int:
    """The bytes of an entry (fuzzmmu.program.ops.Entry) for a 4-byte (32-bit paging) or
    8-byte table. Here rather than in the op's class: the executor computes one per store of
    a table entry, and this module is compiled."""
    if width == 4:
        low = ((target << PAGE_SHIFT) | (flags & 0xFFF)) & 0xFFFFFFFF
        if flags & PTE_PS:
            # A 4 MiB PDE holds physical address bits 39:32 in bits 20:13 (PSE-36).
            low = (low & ~0x3FE000) | (((target >> 20) & 0xFF) << 13)
        if extra is Extra.RSVD:
            low |= 1 << 21
        elif extra is Extra.BIT13:
            low |= 1 << 13
        return low
    value = (target << PAGE_SHIFT) | flags
    if extra is Extra.RSVD:
        value |= 1 << 51
    elif extra is Extra.BIT13:
        value |= 1 << 13
    elif extra is Extra.BIT62:
        value |= 1 << 62
    return value & ((1 << 64) - 1)
