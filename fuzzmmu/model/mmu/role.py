"""union kvm_mmu_page_role as an int word, with KVM's bit layout (asm/kvm_host.h).

Together with the gfn, the role word is the lookup key of a shadow page: every bit here exists
because two guest contexts must not share a shadow page that differs in it (mmu.rst).
"""

from __future__ import annotations

from typing import Final

from fuzzmmu.arch.bits import acc_str

LEVEL_MASK: Final = 0xF  # bits 0-3
HAS_4_BYTE_GPTE: Final = 1 << 4
QUADRANT_SHIFT: Final = 5  # bits 5-6
QUADRANT_MASK: Final = 3 << QUADRANT_SHIFT
DIRECT: Final = 1 << 7
ACCESS_SHIFT: Final = 8  # bits 8-10
ACCESS_MASK: Final = 7 << ACCESS_SHIFT
INVALID: Final = 1 << 11
EFER_NX: Final = 1 << 12
CR0_WP: Final = 1 << 13
SMEP_ANDNOT_WP: Final = 1 << 14
SMAP_ANDNOT_WP: Final = 1 << 15
# Not in KVM's role (bit 19 is one of its unused bits): with 4-byte gptes, CR4.PSE decides
# whether a PDE with PS=1 maps a 4 MiB page or points at a page table, so pages built under
# one setting must not serve the other. KVM shares them (the kvm.cr4-pse-not-in-role mutant).
CR4_PSE: Final = 1 << 19
# Not in KVM's role either (bit 20 is unused too): PAE paging reserves bits 62:MAXPHYADDR of a
# PDE or PTE that 4-level paging ignores from bit 52 up, so the same 8-byte gptes are valid
# for one and a reserved-bit #PF for the other: shadow pages built under long mode must not
# serve a PAE vCPU. KVM shares them (the kvm.pae-shares-long-mode-pages mutant).
LONG_MODE: Final = 1 << 20
SMM_SHIFT: Final = 24  # bits 24-31 (later renamed as_id)


def make_role(level: int, *, has_4_byte_gpte: bool = False, quadrant: int = 0,
              direct: bool = False, access: int = 7, efer_nx: bool = False,
              cr0_wp: bool = False, smep_andnot_wp: bool = False,
              smap_andnot_wp: bool = False, cr4_pse: bool = False, long_mode: bool = False,
              smm: int = 0) -> int:
    return (level | (HAS_4_BYTE_GPTE if has_4_byte_gpte else 0) | (quadrant << QUADRANT_SHIFT)
            | (CR4_PSE if cr4_pse else 0) | (LONG_MODE if long_mode else 0)
            | (DIRECT if direct else 0) | (access << ACCESS_SHIFT)
            | (EFER_NX if efer_nx else 0) | (CR0_WP if cr0_wp else 0)
            | (SMEP_ANDNOT_WP if smep_andnot_wp else 0)
            | (SMAP_ANDNOT_WP if smap_andnot_wp else 0) | (smm << SMM_SHIFT))


def role_level(role: int) -> int:
    return role & LEVEL_MASK


def role_quadrant(role: int) -> int:
    return (role & QUADRANT_MASK) >> QUADRANT_SHIFT


def role_access(role: int) -> int:
    return (role & ACCESS_MASK) >> ACCESS_SHIFT


def role_smm(role: int) -> int:
    return role >> SMM_SHIFT


def with_level(role: int, level: int) -> int:
    return (role & ~LEVEL_MASK) | level


def with_access(role: int, access: int) -> int:
    return (role & ~ACCESS_MASK) | (access << ACCESS_SHIFT)


def with_quadrant(role: int, quadrant: int) -> int:
    return (role & ~QUADRANT_MASK) | (quadrant << QUADRANT_SHIFT)


def with_direct(role: int, direct: bool) -> int:
    return (role | DIRECT) if direct else (role & ~DIRECT)


def role_str(role: int) -> str:
    """Like mmutrace.h's KVM_MMU_PAGE_PRINTK: ``l2 q1 4byte direct u-x !nx wp smm``."""
    parts = [f"l{role_level(role)}"]
    if role & HAS_4_BYTE_GPTE:
        parts.append(f"q{role_quadrant(role)} 4byte")
    parts.append("direct" if role & DIRECT else "indirect")
    parts.append(acc_str(role_access(role)))
    if role & INVALID:
        parts.append("invalid")
    parts.append("nx" if role & EFER_NX else "!nx")
    parts.append("wp" if role & CR0_WP else "!wp")
    if role & SMEP_ANDNOT_WP:
        parts.append("smep&!wp")
    if role & SMAP_ANDNOT_WP:
        parts.append("smap&!wp")
    if role & CR4_PSE:
        parts.append("pse")
    if role & LONG_MODE:
        parts.append("lm")
    if role_smm(role):
        parts.append("smm")
    return " ".join(parts)
