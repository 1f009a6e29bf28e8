"""The processor under the model: a guest access is translated through the vCPU's host TLB,
filled by walking KVM's shadow tables the way the hardware does.

Shadow tables are run with CR0.WP=1 and EFER.NX=1 (KVM forces both without TDP), the guest's
CR4.SMEP/SMAP while guest paging is on, and PAE-shaped tables for guests below 64-bit paging.
A translation that faults is dropped from the TLB (SDM §4.10.4.1); nothing else drops entries
except a flush the model requests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from fuzzmmu.arch.bits import (
    ACC_U,
    ACC_W,
    ACC_X,
    CR0_PG,
    CR4_SMAP,
    CR4_SMEP,
    PAGE_SHIFT,
    PFERR_FETCH,
    PFERR_P,
    PFERR_RSVD,
    PFERR_U,
    PFERR_W,
    bits,
)
from fuzzmmu.model.mmu import spte as S
from fuzzmmu.model.mmu.context import DUMMY_ROOT, PAE_ROOT
from fuzzmmu.model.mmu.internal import ModelError

if TYPE_CHECKING:
    from fuzzmmu.model.mmu.mmu import KvmMmu
    from fuzzmmu.model.x86 import Vcpu


# Bits 51:MAXPHYADDR of a paging entry, reserved on the host CPU, per MAXPHYADDR (36..52).
_RSVD_PA_BITS: Final = {m: bits(51, m) for m in range(36, 53)}


def walk_shadow_tables(kvm: KvmMmu, vcpu: Vcpu, gva: int) -> tuple[int, int]:
    """The hardware page walk over the shadow tables: (pfn, ACC rights) or (-1, #PF code)."""
    mmu = vcpu.mmu
    root = mmu.root_hpa
    rsvd = _RSVD_PA_BITS[kvm.config.maxphyaddr]
    sp_by_hpfn = kvm.sp_by_hpfn
    if root == PAE_ROOT:
        pdpte = mmu.pae_root[(gva >> 30) & 3]
        if not pdpte & S.SPTE_P:
            return -1, 0
        sp = sp_by_hpfn.get(pdpte >> PAGE_SHIFT)
        level = 2
    elif root == DUMMY_ROOT:
        return -1, 0
    elif root >= 0:
        sp = sp_by_hpfn.get(root >> PAGE_SHIFT)
        level = sp.level if sp is not None else 0
    else:
        raise ModelError(f"vCPU {vcpu.id} entered the guest without a root")
    # Rights accumulate over the levels: W and U where every spte has them, NX where any does.
    w_u = S.SPTE_W | S.SPTE_U
    nx = 0
    while True:
        if sp is None:
            raise ModelError("the hardware walked into a freed shadow page")
        spte = sp.sptv[(gva >> (PAGE_SHIFT + 9 * (level - 1))) & 511]
        if not spte & S.SPTE_P:
            return -1, 0
        if spte & rsvd:
            return -1, PFERR_RSVD | PFERR_P
        w_u &= spte
        nx |= spte
        if level == 1 or spte & S.SPTE_PS:
            break
        sp = sp_by_hpfn.get((spte & S.SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT)  # spte_pfn()
        level -= 1
    pfn = (spte & S.SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT
    if level > 1:
        pfn += (gva >> PAGE_SHIFT) & ((1 << (9 * (level - 1))) - 1)
    return pfn, ((ACC_W if w_u & S.SPTE_W else 0) | (ACC_U if w_u & S.SPTE_U else 0)
                 | (0 if nx & S.SPTE_NX else ACC_X))


def translate(kvm: KvmMmu, vcpu: Vcpu, gva: int, write: bool, fetch: bool) -> tuple[int, int]:
    """(pfn, 0) for an access the hardware completes, or (-1, #PF error code) for a #PF exit
    to KVM. The error code has I/D for every fetch (hardware NX is on)."""
    page = gva >> PAGE_SHIFT
    entry = vcpu.tlb.get(page)
    if entry is None:
        pfn, rights = walk_shadow_tables(kvm, vcpu, gva)
        if pfn < 0:
            return -1, _code(rights, vcpu, write, fetch)
        entry = (pfn, rights)
        vcpu.tlb[page] = entry
    pfn, rights = entry
    if not permits(vcpu, rights, write, fetch, vcpu.cpl, vcpu.eflags_ac):
        del vcpu.tlb[page]
        return -1, _code(PFERR_P, vcpu, write, fetch)
    return pfn, 0


def permits(vcpu: Vcpu, rights: int, write: bool, fetch: bool, cpl: int, ac: bool) -> bool:
    """The hardware's rights check on a shadow translation (CR0.WP=1)."""
    paging = bool(vcpu.cr0 & CR0_PG)
    if cpl == 3:
        return bool(rights & ACC_U) and not (write and not rights & ACC_W) and not (
            fetch and not rights & ACC_X)
    if fetch:
        return bool(rights & ACC_X) and not (paging and vcpu.cr4 & CR4_SMEP and rights & ACC_U)
    return not (write and not rights & ACC_W) and not (
        paging and vcpu.cr4 & CR4_SMAP and rights & ACC_U and not ac)


def completes_without_exit(kvm: KvmMmu, vcpu: Vcpu, gva: int, write: bool, fetch: bool,
                           cpl: int, ac: bool) -> bool:
    """Whether an access would complete in the hardware alone (no #PF exit to KVM); nothing
    changes."""
    if vcpu.requests or not vcpu.mmu.root_valid:
        return False
    entry = vcpu.tlb.get(gva >> PAGE_SHIFT)
    if entry is None:
        pfn, rights = walk_shadow_tables(kvm, vcpu, gva)
        if pfn < 0:
            return False
    else:
        rights = entry[1]
    return permits(vcpu, rights, write, fetch, cpl, ac)


def _code(base: int, vcpu: Vcpu, write: bool, fetch: bool) -> int:
    return base | (PFERR_W if write else 0) | (PFERR_U if vcpu.cpl == 3 else 0) | (
        PFERR_FETCH if fetch else 0)
