"""Helpers that lay out paging structures for the walker tests.

Everything here follows the architecture (Intel SDM Vol. 3A ch. 4, the walker's specification;
docs/x86-paging.md restates it), not the walker's code: index extraction per mode (§2-§4 there),
entry sizes, and where each table lives.

Layout used by :class:`Tables`: the table of level L lives in guest page L (gpa ``L * 0x1000``),
so the root is page 2 (32-bit), 3 (PAE PDPT), 4 (PML4) or 5 (PML5). Data frames are never read
by the walker, so they may lie outside guest memory.
"""

from __future__ import annotations

from fuzzmmu.arch import Access, CpuState, walk
from fuzzmmu.arch.bits import (
    PFERR_FETCH,
    PFERR_P,
    PFERR_PK,
    PFERR_RSVD,
    PFERR_U,
    PFERR_W,
    PTE_P,
    PTE_PS,
    PTE_U,
    PTE_W,
    PagingMode,
)
from fuzzmmu.world.memory import GuestMemory

BIT32, PAE, LONG4, LONG5 = PagingMode.BIT32, PagingMode.PAE, PagingMode.LONG4, PagingMode.LONG5
PAGING_MODES = (BIT32, PAE, LONG4, LONG5)

PWU = PTE_P | PTE_W | PTE_U

# Default linear address per mode: every index distinct and non-zero, so that a walker that
# takes an index from the wrong bits reads an empty entry.
GVA = {
    # PD 0x123 (31:22), PT 0x2B5 (21:12)
    BIT32: (0x123 << 22) | (0x2B5 << 12) | 0xABC,
    # PDPTE 2 (31:30), PD 0x1A5 (29:21), PT 0x0F3 (20:12)
    PAE: (2 << 30) | (0x1A5 << 21) | (0x0F3 << 12) | 0x9C4,
    # PML4 0x0A3 (47:39), PDPT 0x155 (38:30), PD 0x0C7 (29:21), PT 0x1F1 (20:12)
    LONG4: (0x0A3 << 39) | (0x155 << 30) | (0x0C7 << 21) | (0x1F1 << 12) | 0x678,
    # PML5 0x05B (56:48), then as above
    LONG5: (0x05B << 48) | (0x0A3 << 39) | (0x155 << 30) | (0x0C7 << 21) | (0x1F1 << 12) | 0x678,
}

# Leaf frames (page-size aligned; arbitrary, above guest memory on purpose).
FRAME = {1: 0x0ABCD000, 2: 0x3AC00000, 3: 0x1C0000000}
FRAME_4M = 0x7AC00000  # 4 MiB aligned, for 32-bit PSE pages


def entry_size(mode: PagingMode) -> int:
    return 4 if mode == BIT32 else 8


def top_level(mode: PagingMode) -> int:
    return {BIT32: 2, PAE: 3, LONG4: 4, LONG5: 5}[mode]


def index(mode: PagingMode, gva: int, level: int) -> int:
    """Index of ``gva`` in the table of ``level`` (SDM §4.3-4.5)."""
    if mode == BIT32:
        return (gva >> (12 + 10 * (level - 1))) & 0x3FF
    if mode == PAE and level == 3:
        return (gva >> 30) & 3
    return (gva >> (12 + 9 * (level - 1))) & 0x1FF


def page_size(mode: PagingMode, level: int) -> int:
    if mode == BIT32:
        return {1: 1 << 12, 2: 1 << 22}[level]
    return {1: 1 << 12, 2: 1 << 21, 3: 1 << 30}[level]


def table_gpa(level: int) -> int:
    return level * 0x1000


def default_flags(mode: PagingMode, level: int) -> int:
    """Fully permissive flags for ``level`` (a PAE PDPTE has only P: the rest is reserved)."""
    if mode == PAE and level == 3:
        return PTE_P
    return PWU


class Tables:
    """One translation path for ``gva`` in a fresh guest memory."""

    def __init__(self, mode: PagingMode | str, gva: int | None = None, *, pages: int = 16):
        self.mode = PagingMode(mode) if isinstance(mode, int) else _MODE_BY_LABEL[mode]
        self.gva = GVA[self.mode] if gva is None else gva
        self.mem = GuestMemory(pages)
        self.top = top_level(self.mode)
        self.cr3 = table_gpa(self.top)
        self.esize = entry_size(self.mode)

    def entry_gpa(self, level: int) -> int:
        return table_gpa(level) + index(self.mode, self.gva, level) * self.esize

    def set(self, level: int, value: int) -> None:
        self.mem.write(self.entry_gpa(level), self.esize, value)

    def get(self, level: int) -> int:
        return self.mem.read(self.entry_gpa(level), self.esize)

    def chain(self, leaf: int = 1, flags: dict[int, int] | None = None,
              extra: dict[int, int] | None = None, frame: int | None = None) -> int:
        """Write the entries of levels ``top..leaf`` for ``self.gva``.

        ``flags[L]`` replaces the default flags of level L, ``extra[L]`` is OR-ed into the entry.
        Levels above ``leaf`` point at the next table; the leaf maps ``frame`` (PS is added
        for a leaf above level 1). Returns the expected gpa if the walk succeeds.
        """
        flags = flags or {}
        extra = extra or {}
        if frame is None:
            frame = FRAME_4M if (self.mode == BIT32 and leaf == 2) else FRAME[leaf]
        for level in range(self.top, leaf - 1, -1):
            f = flags.get(level, default_flags(self.mode, level))
            if level == leaf:
                value = frame | f | (PTE_PS if leaf > 1 else 0)
            else:
                value = table_gpa(level - 1) | f
            self.set(level, value | extra.get(level, 0))
        return frame + (self.gva & (page_size(self.mode, leaf) - 1))

    def cpu(self, **kw) -> CpuState:
        """CpuState for this layout; for PAE the PDPTE registers are loaded now from memory."""
        return CpuState.build(self.mode, self.cr3, mem=self.mem, **kw)

    def walk(self, acc: Access | None = None, cpu: CpuState | None = None,
             gva: int | None = None, **kw):
        cpu = cpu if cpu is not None else self.cpu(**kw)
        return walk(self.mem, cpu, self.gva if gva is None else gva, acc or Access())

    def walked_entries(self, leaf: int) -> list[tuple[int, int]]:
        """(gpa, size) of each in-memory entry a walk down to ``leaf`` uses (no PAE PDPTEs)."""
        top = 2 if self.mode == PAE else self.top
        return [(self.entry_gpa(level), self.esize) for level in range(top, leaf - 1, -1)]


_MODE_BY_LABEL = {"32bit": BIT32, "pae": PAE, "4level": LONG4, "5level": LONG5}


def error_code(*, write=False, user=False, fetch_bit=False, p=True, rsvd=False, pk=False) -> int:
    return ((PFERR_P if p else 0) | (PFERR_W if write else 0) | (PFERR_U if user else 0)
            | (PFERR_RSVD if rsvd else 0) | (PFERR_FETCH if fetch_bit else 0)
            | (PFERR_PK if pk else 0))


__all__ = [
    "BIT32", "FRAME", "FRAME_4M", "GVA", "LONG4", "LONG5", "PAE", "PAGING_MODES", "PWU",
    "Tables", "default_flags", "entry_size", "error_code", "index",
    "page_size", "table_gpa", "top_level",
]
