"""Shadow PTE encoding: every bit of an spte is defined here (KVM's spte.h / spte.c).

Sptes are always 8-byte PAE/long-mode entries, run by the hardware with CR0.WP=1 and EFER.NX=1.
Software bits follow the non-EPT defaults of spte.h: bit 9 host-writable, bit 10 MMU-writable,
bit 11 MMU-present. MMIO sptes are hardware-present (P=1) with reserved bit 51 set so that every
access faults with RSVD, not MMU-present, and carry gfn, cached access and memslot generation.
"""

from __future__ import annotations

from typing import Final

from fuzzmmu.arch.bits import ACC_U, ACC_W, ACC_X, PAGE_SHIFT, bits

SPTE_P: Final = 1 << 0
SPTE_W: Final = 1 << 1
SPTE_U: Final = 1 << 2
SPTE_A: Final = 1 << 5
SPTE_D: Final = 1 << 6
SPTE_PS: Final = 1 << 7
SPTE_NX: Final = 1 << 63
SPTE_HOST_WRITABLE: Final = 1 << 9  # DEFAULT_SPTE_HOST_WRITABLE
SPTE_MMU_WRITABLE: Final = 1 << 10  # DEFAULT_SPTE_MMU_WRITABLE
SPTE_MMU_PRESENT: Final = 1 << 11  # SPTE_MMU_PRESENT_MASK
SPTE_BASE_ADDR_MASK: Final = bits(51, 12)

# MMIO sptes (mark_mmio_spte / make_mmio_spte). shadow_mmio_value for a host with
# MAXPHYADDR < 52: reserved bit 51 plus P, so hardware raises #PF(P|RSVD).
MMIO_RSVD_BIT: Final = 1 << 51
SPTE_MMIO_VALUE: Final = MMIO_RSVD_BIT | SPTE_P
SPTE_MMIO_MASK: Final = MMIO_RSVD_BIT | SPTE_P | SPTE_MMU_PRESENT
MMIO_ACCESS_MASK: Final = ACC_W | ACC_U  # shadow_mmio_access_mask: X is not cached
MMIO_GEN_LOW_SHIFT: Final = 3  # generation bits 0-7 -> spte bits 3-10
MMIO_GEN_LOW_BITS: Final = 8
MMIO_GEN_HIGH_SHIFT: Final = 52  # generation bits 8-18 -> spte bits 52-62
MMIO_GFN_MASK: Final = bits(50, 12)



def is_mmio_spte(spte: int) -> bool:
    return spte & SPTE_MMIO_MASK == SPTE_MMIO_VALUE



def is_last_spte(spte: int, level: int) -> bool:
    return level == 1 or bool(spte & SPTE_PS)


def spte_pfn(spte: int) -> int:
    return (spte & SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT




def spte_access(spte: int) -> int:
    """ACC_* rights a present leaf spte grants."""
    return ((ACC_W if spte & SPTE_W else 0) | (ACC_U if spte & SPTE_U else 0)
            | (0 if spte & SPTE_NX else ACC_X))


def make_nonleaf_spte(child_hpfn: int) -> int:
    """make_nonleaf_spte(): full rights, permissions live only in the leaves."""
    return ((child_hpfn << PAGE_SHIFT) | SPTE_P | SPTE_W | SPTE_U | SPTE_A | SPTE_MMU_PRESENT)


def make_leaf_spte(pfn: int, level: int, access: int, *, writable: bool, prefetch: bool) -> int:
    """The leaf part of make_spte(): P, MMU-present, A unless prefetched, U from ACC_U, NX unless
    ACC_X, PS above 4K, host-writable, W + MMU-writable + D when ``writable``."""
    spte = SPTE_P | SPTE_MMU_PRESENT | SPTE_HOST_WRITABLE | (pfn << PAGE_SHIFT)
    if not prefetch:
        spte |= SPTE_A
    if access & ACC_U:
        spte |= SPTE_U
    if not access & ACC_X:
        spte |= SPTE_NX
    if level > 1:
        spte |= SPTE_PS
    if writable:
        spte |= SPTE_W | SPTE_MMU_WRITABLE | SPTE_D
    return spte


def make_mmio_spte(gfn: int, access: int, gen: int, gen_bits: int) -> int:
    """make_mmio_spte(): gfn, cached W/U access and the low ``gen_bits`` of the generation."""
    gen &= (1 << gen_bits) - 1
    low = gen & ((1 << MMIO_GEN_LOW_BITS) - 1)
    high = gen >> MMIO_GEN_LOW_BITS
    return (SPTE_MMIO_VALUE | (access & MMIO_ACCESS_MASK) | ((gfn << PAGE_SHIFT) & MMIO_GFN_MASK)
            | (low << MMIO_GEN_LOW_SHIFT) | (high << MMIO_GEN_HIGH_SHIFT))


def get_mmio_spte_gfn(spte: int) -> int:
    return (spte & MMIO_GFN_MASK) >> PAGE_SHIFT


def get_mmio_spte_access(spte: int) -> int:
    return spte & MMIO_ACCESS_MASK


def get_mmio_spte_generation(spte: int) -> int:
    low = (spte >> MMIO_GEN_LOW_SHIFT) & ((1 << MMIO_GEN_LOW_BITS) - 1)
    high = (spte >> MMIO_GEN_HIGH_SHIFT) & 0x7FF
    return low | (high << MMIO_GEN_LOW_BITS)


def wrprotect_spte(spte: int) -> int:
    """spte_write_protect(pt_protect=true): clear W and MMU-writable."""
    return spte & ~(SPTE_W | SPTE_MMU_WRITABLE)
