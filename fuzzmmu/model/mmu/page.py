"""struct kvm_mmu_page: one shadow page table (mmu_internal.h)."""

from __future__ import annotations

from typing import Final

import numpy as np

from fuzzmmu.model.mmu.role import (
    ACCESS_MASK,
    ACCESS_SHIFT,
    DIRECT,
    HAS_4_BYTE_GPTE,
    INVALID,
    LEVEL_MASK,
    QUADRANT_MASK,
    QUADRANT_SHIFT,
    SMM_SHIFT,
    role_str,
)

SPTES_PER_PAGE: Final = 512
# numpy's names, bound once: the compiled model would look each up in numpy's module dict
# for every shadow page it makes
_zeros: Final = np.zeros
_UINT64: Final = np.uint64


class ShadowPage:
    """A shadow page: 512 sptes (numpy, with a memoryview for single entries), its key
    (gfn, role), reverse links and bookkeeping.

    ``shadowed`` is shadowed_translation[]: for indirect pages, per spte the gfn and guest
    access being shadowed, packed as ``gfn << 3 | access`` (by spte index, 0 where none was
    ever set: a dict, since a page sets a few of its 512 and a program makes a dozen pages).
    """

    __slots__ = ("access", "direct", "gfn", "has_4_byte_gpte", "hpfn", "level", "mmu_valid_gen",
                 "parent_ptes", "quadrant", "role", "root_count", "shadowed", "smm", "spt",
                 "sptv", "unsync", "unsync_child_bitmap", "unsync_children",
                 "write_flooding_count")

    def __init__(self, gfn: int, role: int, hpfn: int, valid_gen: int) -> None:
        self.gfn = gfn
        self.role = role
        # role_level() and friends, inline: ~17 pages are made per program
        self.level = role & LEVEL_MASK
        self.direct = bool(role & DIRECT)
        self.has_4_byte_gpte = bool(role & HAS_4_BYTE_GPTE)
        self.quadrant = (role & QUADRANT_MASK) >> QUADRANT_SHIFT
        self.access = (role & ACCESS_MASK) >> ACCESS_SHIFT
        self.smm = role >> SMM_SHIFT
        self.hpfn = hpfn
        self.mmu_valid_gen = valid_gen
        self.spt = _zeros(SPTES_PER_PAGE, _UINT64)
        self.sptv = self.spt.data  # a memoryview of the sptes: ~4x cheaper per entry
        self.shadowed: dict[int, int] | None = None if self.direct else {}
        self.parent_ptes: set[tuple[ShadowPage, int]] = set()
        self.root_count = 0
        self.unsync = False
        self.unsync_children = 0
        self.unsync_child_bitmap = 0
        self.write_flooding_count = 0

    @property
    def invalid(self) -> bool:
        return bool(self.role & INVALID)

    def has_gptes(self) -> bool:
        """sp_has_gptes(): indirect pages shadow a guest table."""
        return not self.direct

    def get_gfn(self, index: int) -> int:
        """kvm_mmu_page_get_gfn()."""
        if self.shadowed is not None:
            return self.shadowed.get(index, 0) >> 3
        return self.gfn + (index << (9 * (self.level - 1)))

    def get_access(self, index: int) -> int:
        """kvm_mmu_page_get_access()."""
        if self.shadowed is not None:
            return self.shadowed.get(index, 0) & 7
        return self.access

    def set_translation(self, index: int, gfn: int, access: int) -> None:
        if self.shadowed is not None:
            self.shadowed[index] = (gfn << 3) | access

    def __repr__(self) -> str:
        return f"<sp gfn={self.gfn:#x} {role_str(self.role)} hpfn={self.hpfn:#x}>"

    def __hash__(self) -> int:
        return self.hpfn

    def __eq__(self, other: object) -> bool:
        return self is other
