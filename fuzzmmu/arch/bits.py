"""x86 architectural bit definitions: paging-structure entries, #PF error codes, control registers.

Everything here is architecture (SDM Vol. 3A chapter 4, AMD APM Vol. 2 chapter 5); nothing knows
about KVM. Both the reference walker and the shadow-MMU model import these constants, which is
the only thing they share.
"""

from __future__ import annotations

import enum
from typing import Final

# Paging-structure entry bits (SDM §4.3-4.5 entry-format tables).
PTE_P: Final = 1 << 0
PTE_W: Final = 1 << 1
PTE_U: Final = 1 << 2
PTE_PWT: Final = 1 << 3
PTE_PCD: Final = 1 << 4
PTE_A: Final = 1 << 5
PTE_D: Final = 1 << 6
PTE_PS: Final = 1 << 7  # page size in PDE/PDPTE; PAT in a 4 KiB PTE
PTE_G: Final = 1 << 8
PTE_PAT_LARGE: Final = 1 << 12  # PAT bit of a 2 MiB / 4 MiB / 1 GiB leaf
PTE_NX: Final = 1 << 63
PTE_PKEY_SHIFT: Final = 59  # bits 62:59: protection key of a long-mode leaf (SDM §4.6.2)

# #PF error code (SDM Vol. 3A §4.7, Figure 4-12).
PFERR_P: Final = 1 << 0
PFERR_W: Final = 1 << 1
PFERR_U: Final = 1 << 2
PFERR_RSVD: Final = 1 << 3
PFERR_FETCH: Final = 1 << 4
PFERR_PK: Final = 1 << 5

_PFERR_NAMES: Final = ((PFERR_P, "P"), (PFERR_W, "W"), (PFERR_U, "U"), (PFERR_RSVD, "RSVD"),
                       (PFERR_FETCH, "FETCH"), (PFERR_PK, "PK"))

# Control registers and EFER (SDM Vol. 3A §2.5, §2.2.1).
CR0_PE: Final = 1 << 0
CR0_WP: Final = 1 << 16
CR0_NW: Final = 1 << 29
CR0_CD: Final = 1 << 30
CR0_PG: Final = 1 << 31

CR4_PSE: Final = 1 << 4
CR4_PAE: Final = 1 << 5
CR4_PGE: Final = 1 << 7
CR4_LA57: Final = 1 << 12
CR4_SMEP: Final = 1 << 20
CR4_SMAP: Final = 1 << 21
CR4_PKE: Final = 1 << 22

EFER_LME: Final = 1 << 8
EFER_LMA: Final = 1 << 10
EFER_NXE: Final = 1 << 11

# Accumulated rights of a translation. The encoding is KVM's ACC_* (exec is positive sense) so
# that traces of both sides read alike; the reference computes them on its own.
ACC_X: Final = 1
ACC_W: Final = 2
ACC_U: Final = 4
ACC_ALL: Final = ACC_X | ACC_W | ACC_U

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT
PAGE_MASK: Final = ~(PAGE_SIZE - 1)


class PagingMode(enum.IntEnum):
    """The five rows of SDM Table 4-1. The value is the number of paging levels."""

    OFF = 0
    BIT32 = 2
    PAE = 3
    LONG4 = 4
    LONG5 = 5

    @property
    def entry_size(self) -> int:
        return 4 if self is PagingMode.BIT32 else 8

    @property
    def label(self) -> str:
        return _MODE_LABELS[self]


_MODE_LABELS: Final = {
    PagingMode.OFF: "off",
    PagingMode.BIT32: "32bit",
    PagingMode.PAE: "pae",
    PagingMode.LONG4: "4level",
    PagingMode.LONG5: "5level",
}


def paging_mode(cr0: int, cr4: int, efer: int) -> PagingMode:
    """Select the paging mode from CR0.PG, CR4.PAE, EFER.LME and CR4.LA57 (SDM Table 4-1)."""
    if not cr0 & CR0_PG:
        return PagingMode.OFF
    if not cr4 & CR4_PAE:
        return PagingMode.BIT32
    if not efer & EFER_LME:
        return PagingMode.PAE
    return PagingMode.LONG5 if cr4 & CR4_LA57 else PagingMode.LONG4


def bits(hi: int, lo: int) -> int:
    """Mask with bits hi..lo (inclusive) set; empty when hi < lo."""
    if hi < lo:
        return 0
    return ((1 << (hi - lo + 1)) - 1) << lo


def pferr_str(code: int) -> str:
    """Error code as named bits, e.g. ``P|W|U``; ``0`` when no bit is set."""
    names = [name for bit, name in _PFERR_NAMES if code & bit]
    return "|".join(names) if names else "0"


_PTE_FLAG_NAMES: Final = ((PTE_P, "P"), (PTE_W, "W"), (PTE_U, "U"), (PTE_PWT, "PWT"),
                          (PTE_PCD, "PCD"), (PTE_A, "A"), (PTE_D, "D"), (PTE_PS, "PS"),
                          (PTE_G, "G"), (PTE_NX, "NX"))


def pte_flags_str(value: int, *, entry_size: int = 8) -> str:
    """Low flag bits of an entry by name (NX only for 8-byte entries)."""
    names = [name for bit, name in _PTE_FLAG_NAMES
             if value & bit and (bit >> 32 == 0 or entry_size == 8)]
    return "|".join(names) if names else "-"


def acc_str(acc: int) -> str:
    """Rights as ``uwx`` with dashes for what is missing."""
    return (("u" if acc & ACC_U else "-") + ("w" if acc & ACC_W else "-")
            + ("x" if acc & ACC_X else "-"))
