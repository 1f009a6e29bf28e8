"""MMIO sptes and the MMIO fault path (mmu.c: mark_mmio_spte, handle_mmio_page_fault,
check_mmio_spte, kvm_mmu_invalidate_mmio_sptes).

An MMIO spte caches "this gfn has no memslot" together with the memslot generation it was
made under; it is trusted only while the generation of the vCPU's address space still
matches. The vCPU also caches the last MMIO gva/gfn (vcpu_cache_mmio_info).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fuzzmmu.model.mmu import spte as S
from fuzzmmu.model.mmu.context import shadow_walk
from fuzzmmu.model.mmu.internal import RET_PF_EMULATE, RET_PF_INVALID, RET_PF_RETRY, Point, VmError
from fuzzmmu.model.mmu.role import DIRECT
from fuzzmmu.world.memslots import GEN_UPDATE_IN_PROGRESS, NUM_ADDRESS_SPACES

if TYPE_CHECKING:
    from fuzzmmu.model.mmu.mmu import KvmMmu
    from fuzzmmu.model.mmu.page import ShadowPage
    from fuzzmmu.model.x86 import Vcpu


def mmio_gen_mask(kvm: KvmMmu) -> int:
    return (1 << kvm.config.mmio_gen_bits) - 1


def mark_mmio_spte(kvm: KvmMmu, vcpu: Vcpu, sp: ShadowPage, i: int, gfn: int, access: int
                   ) -> None:
    gen = kvm.memslots.generation[vcpu.smm]
    if gen & GEN_UPDATE_IN_PROGRESS:
        spte = 0  # make_mmio_spte() WARNs and returns 0 while memslots are in flux
    else:
        spte = S.make_mmio_spte(gfn, access, gen, kvm.config.mmio_gen_bits)
    sp.sptv[i] = spte
    kvm.stat.pf_mmio_spte_created += 1
    if kvm.trace is not None:  # the detail only for a trace
        kvm.emit("mark_mmio_spte", sp, f"[{i}] gfn={gfn:#x} gen={gen & mmio_gen_mask(kvm)}")


def check_mmio_spte(kvm: KvmMmu, vcpu: Vcpu, spte: int) -> bool:
    gen = kvm.memslots.generation[vcpu.smm]
    if gen & GEN_UPDATE_IN_PROGRESS:
        return False
    return gen & mmio_gen_mask(kvm) == S.get_mmio_spte_generation(spte)


def get_mmio_spte(kvm: KvmMmu, vcpu: Vcpu, addr: int) -> int:
    """The lockless shadow walk: the last spte on the path (0 when there is none)."""
    path = shadow_walk(kvm, vcpu, addr)
    if not path:
        return 0
    sp, index, level = path[-1]
    spte = sp.sptv[index]
    if spte & S.SPTE_MMU_PRESENT and spte & S.MMIO_RSVD_BIT:
        raise VmError(f"KVM_RUN: -EINVAL (reserved bits in present spte {spte:#x} at level "
                      f"{level})")
    return spte


def handle_mmio_page_fault(kvm: KvmMmu, vcpu: Vcpu, addr: int) -> int:
    """A #PF with RSVD set came from an MMIO spte (or from one that was there a moment ago)."""
    direct = bool(vcpu.mmu.root_role & DIRECT)
    if vcpu.mmio_info_in_cache(addr, direct):
        return RET_PF_EMULATE
    kvm.point(Point.MMIO_LOCKLESS, vcpu)
    spte = get_mmio_spte(kvm, vcpu, addr)
    if S.is_mmio_spte(spte):
        gfn = S.get_mmio_spte_gfn(spte)
        access = S.get_mmio_spte_access(spte)
        if not check_mmio_spte(kvm, vcpu, spte):
            return RET_PF_INVALID
        vcpu.cache_mmio_info(0 if direct else addr, gfn, access)
        return RET_PF_EMULATE
    if kvm.bugs.mmio_zapped_spte_is_error:
        raise VmError(f"KVM_RUN: MMIO fault on gva {addr:#x} found spte {spte:#x}, neither "
                      "MMIO nor present (treated as a misconfiguration)")
    # The page table was zapped by another vCPU: let the CPU fault again.
    return RET_PF_RETRY


def kvm_mmu_invalidate_mmio_sptes(kvm: KvmMmu, gen: int) -> None:
    """The generation field of MMIO sptes wraps: zap everything so that no old MMIO spte can
    match a new generation. The address-space modifier is stripped first."""
    gen &= mmio_gen_mask(kvm)
    gen &= ~(NUM_ADDRESS_SPACES - 1)
    if gen == 0:
        kvm.emit("mmio_gen_wrap")
        kvm.kvm_mmu_zap_all_fast()
