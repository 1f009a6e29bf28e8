"""Emulated writes to write-protected guest page tables: kvm_mmu_track_write() (modern,
zap policy) and kvm_mmu_pte_write() with mmu_pte_write_new_pte() (2007-2021, update policy:
the new gpte is prefetched into the spte).

Every shadow page of the written gfn (all roles, both address spaces) is visited: misaligned
or flooded writes zap the page; otherwise the sptes shadowing the written gptes are zapped (and,
under the update policy, rebuilt from the new gpte). A 4-byte guest PDE maps 4 MiB and is
shadowed by two 2 MiB shadow PDEs, in the quadrant page that covers it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from fuzzmmu.arch.bits import CR4_PAE, PAGE_SHIFT, PTE_A, PTE_P
from fuzzmmu.model.mmu import spte as S
from fuzzmmu.model.mmu.fault import mmu_set_spte
from fuzzmmu.model.mmu.page import ShadowPage
from fuzzmmu.model.mmu.role import (
    CR0_WP,
    EFER_NX,
    HAS_4_BYTE_GPTE,
    LONG_MODE,
    SMAP_ANDNOT_WP,
    SMEP_ANDNOT_WP,
    SMM_SHIFT,
)
from fuzzmmu.model.mmu.walk import gpte_access, protect_clean_gpte

if TYPE_CHECKING:
    from fuzzmmu.model.mmu.mmu import KvmMmu
    from fuzzmmu.model.x86 import Vcpu

# mmu_base_role_mask: role bits in which a page must match the writing vCPU's context for the
# update policy to interpret the new gpte in the page's format (LONG_MODE, the model's own bit:
# the reserved bits of a gpte differ between PAE and 4-level paging).
BASE_ROLE_MASK: Final = CR0_WP | HAS_4_BYTE_GPTE | EFER_NX | SMEP_ANDNOT_WP | SMAP_ANDNOT_WP | (
    LONG_MODE | (0xFF << SMM_SHIFT))


def mmu_pte_write_fetch_gpte(vcpu: Vcpu, gpa: int, nbytes: int, widen_any: bool
                             ) -> tuple[int, int, int]:
    """A PAE/long-mode vCPU writing 4 bytes is taken to write part of an 8-byte gpte: the write
    is widened to the aligned 8 bytes, whose new value is the gpte. KVM widens every 4-byte
    write, which hides a write straddling two gptes from detect_write_misaligned(); the model
    widens the writes that stay inside one gpte (``widen_any`` is KVM's behaviour). A write
    left as it is has no gpte to read: it only zaps. Returns (gpa, bytes, new gpte or 0)."""
    if (vcpu.cr4 & CR4_PAE and nbytes == 4  # is_pae(vcpu)
            and (widen_any or (gpa & 7) + nbytes <= 8)):
        gpa &= ~7
        nbytes = 8
    gentry = 0
    if nbytes in (4, 8):
        value = vcpu.phys.read(vcpu.smm, gpa, nbytes)
        gentry = value if value is not None else 0
    return gpa, nbytes, gentry


def detect_write_misaligned(sp: ShadowPage, gpa: int, nbytes: int) -> bool:
    offset = gpa & 0xFFF
    pte_size = 4 if sp.has_4_byte_gpte else 8
    # Linux's clear_bit() is an `andb` on the gpte's first byte: a 1-byte aligned write.
    if not offset & (pte_size - 1) and nbytes == 1:
        return False
    misaligned = (offset ^ (offset + nbytes - 1)) & ~(pte_size - 1)
    return bool(misaligned) or nbytes < 4


def detect_write_flooding(sp: ShadowPage) -> bool:
    """Three emulated writes to an upper-level page without a fault walk through it in
    between: it is probably no longer a page table."""
    if sp.level == 1:
        return False
    sp.write_flooding_count += 1
    return sp.write_flooding_count >= 3


def get_written_sptes(kvm: KvmMmu, sp: ShadowPage, gpa: int) -> tuple[int, int] | None:
    """get_written_sptes(): (first spte index, count) shadowing the written gpte, or None when
    the gpte lies in another quadrant's page."""
    page_offset = gpa & 0xFFF
    npte = 1
    if sp.has_4_byte_gpte:
        page_offset <<= 1  # 32 -> 64
        if sp.level == 2:
            if kvm.bugs.nonpae_pde_single_spte:
                # Before ac1b714e78c8: doubled once, one spte, the wrong one.
                pass
            else:
                # A 32-bit PDE maps 4 MiB, a shadow PDE 2 MiB: double again, zap two.
                page_offset &= ~7
                page_offset <<= 1
                npte = 2
        quadrant = page_offset >> PAGE_SHIFT
        page_offset &= 0xFFF
        if quadrant != sp.quadrant and not kvm.bugs.no_quadrant_filter:
            return None
    return page_offset // 8, npte


def kvm_mmu_track_write(kvm: KvmMmu, vcpu: Vcpu, gpa: int, nbytes: int) -> None:
    """Called after the emulator wrote ``nbytes`` at ``gpa`` (kvm_page_track_write)."""
    if not kvm.indirect_shadow_pages:
        return
    kvm.stat.mmu_pte_write += 1
    gfn = gpa >> PAGE_SHIFT
    gpa, nbytes, gentry = mmu_pte_write_fetch_gpte(vcpu, gpa, nbytes,
                                                   kvm.bugs.pte_write_widen_misaligned)
    update = kvm.config.pte_write_policy == "update"
    base_role = vcpu.mmu.root_role
    invalid: list[ShadowPage] = []
    remote_flush = False
    local_flush = False
    if kvm.trace is not None:  # the detail only for a trace
        kvm.emit("pte_write", None, f"gpa={gpa:#x} bytes={nbytes} gentry={gentry:#x}")
    for sp in list(kvm.page_hash.get(gfn, ())):
        if kvm.is_obsolete_sp(sp) or not sp.has_gptes():
            continue
        misaligned = (not kvm.bugs.pte_write_no_misaligned_check
                      and detect_write_misaligned(sp, gpa, nbytes))
        if misaligned or detect_write_flooding(sp):
            kvm.kvm_mmu_prepare_zap_page(sp, invalid)
            kvm.stat.mmu_flooded += 1
            continue
        written = get_written_sptes(kvm, sp, gpa)
        if written is None:
            continue
        first, npte = written
        local_flush = True
        for i in range(first, first + npte):
            old = sp.sptv[i]
            kvm.mmu_page_zap_pte(sp, i)
            if gentry and sp.level != 1:
                kvm.stat.mmu_pde_zapped += 1
            if (update and gentry and not (sp.role ^ base_role) & BASE_ROLE_MASK
                    and sp.level == 1):
                mmu_pte_write_new_pte(kvm, vcpu, sp, i, gentry)
            if need_remote_flush(old, sp.sptv[i]):
                remote_flush = True
    # kvm_mmu_remote_flush_or_zap() / kvm_mmu_flush_or_zap(): the update policy rebuilt the
    # sptes itself and only needs the writer's TLB flushed unless a permission was lost.
    if invalid:
        kvm.kvm_mmu_commit_zap_page(invalid)
    elif remote_flush:
        kvm.kvm_flush_remote_tlbs()
    elif local_flush and update:
        vcpu.requests.add("tlb_flush_current")


def need_remote_flush(old: int, new: int) -> bool:
    """need_remote_flush(): other vCPUs must flush when the spte lost presence, changed frame
    or lost a permission."""
    if not old & S.SPTE_MMU_PRESENT:
        return False
    if not new & S.SPTE_MMU_PRESENT:
        return True
    if (old ^ new) & S.SPTE_BASE_ADDR_MASK:
        return True
    perm = S.SPTE_W | S.SPTE_U | S.SPTE_NX
    old ^= S.SPTE_NX
    new ^= S.SPTE_NX
    return bool(old & ~new & perm)


def mmu_pte_write_new_pte(kvm: KvmMmu, vcpu: Vcpu, sp: ShadowPage, i: int, gpte: int) -> None:
    """FNAME(update_pte) -> FNAME(prefetch_gpte): install the new gpte's translation."""
    if sp.has_4_byte_gpte:
        gpte &= 0xFFFFFFFF
    rsvd = vcpu.mmu.rsvd
    if not gpte & PTE_P or not gpte & PTE_A or gpte & rsvd[0][1]:
        return
    mask = 0xFFFFF000 if sp.has_4_byte_gpte else S.SPTE_BASE_ADDR_MASK
    gfn = (gpte & mask) >> PAGE_SHIFT
    access = gpte_access(gpte, sp.has_4_byte_gpte)
    if not kvm.bugs.pte_update_ignores_role_access:
        # 41074d07c78b: restrictions inherited from the parent entries stay in force.
        access &= sp.access
    access = protect_clean_gpte(access, gpte)
    slot = kvm.slot_for(sp.smm, gfn)
    if slot is None:
        return
    pfn = vcpu.phys.host.pfn[slot.gfn_to_hva(gfn)]
    mmu_set_spte(kvm, vcpu, slot, sp, i, access, gfn, pfn, None)
