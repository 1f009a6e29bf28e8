"""The shadow page-fault path (mmu.c / paging_tmpl.h): kvm_mmu_page_fault, FNAME(page_fault)
and direct_page_fault, kvm_faultin_pfn, FNAME(fetch) and direct_map, mmu_set_spte/make_spte,
and pte prefetch.

The fault path is where KVM defends against concurrent change: gpte_changed() after a table
is write-protected, mmu_invalidate_seq against MMU-notifier invalidations, obsolete roots.
``kvm.point(...)`` marks where another vCPU or the host may act.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from fuzzmmu.arch.bits import (
    ACC_ALL,
    ACC_U,
    ACC_W,
    ACC_X,
    PAGE_SHIFT,
    PFERR_P,
    PFERR_RSVD,
    PFERR_U,
    PFERR_W,
    PTE_A,
    PTE_P,
)
from fuzzmmu.model.mmu import spte as S
from fuzzmmu.model.mmu.context import DUMMY_ROOT, PAE_ROOT, shadow_walk, shadow_walk_init
from fuzzmmu.model.mmu.internal import (
    RET_PF_CONTINUE,
    RET_PF_EMULATE,
    RET_PF_FIXED,
    RET_PF_INVALID,
    RET_PF_RETRY,
    RET_PF_SPURIOUS,
    ModelError,
    Point,
    VmError,
)
from fuzzmmu.model.mmu.mmio import check_mmio_spte, handle_mmio_page_fault, mark_mmio_spte
from fuzzmmu.model.mmu.mmu import KvmMmu
from fuzzmmu.model.mmu.page import ShadowPage
from fuzzmmu.model.mmu.walk import (
    PTE_PREFETCH_NUM,
    GuestWalker,
    gpte_access,
    protect_clean_gpte,
    set_pending_dirty,
    walk_addr,
)

if TYPE_CHECKING:
    from fuzzmmu.model.x86 import Vcpu
    from fuzzmmu.world.memslots import Memslot

KVM_PFN_NOSLOT: Final = -1


class PageFault:
    """struct kvm_page_fault."""

    __slots__ = ("addr", "error_code", "gfn", "gpte_size", "hva", "mmu_seq", "pfn", "prefetch",
                 "present", "slot", "user", "walker", "write")

    def __init__(self, addr: int, error_code: int) -> None:
        self.addr = addr
        self.error_code = error_code
        self.write = bool(error_code & PFERR_W)
        self.present = bool(error_code & PFERR_P)
        self.user = bool(error_code & PFERR_U)
        self.prefetch = False
        self.gfn = 0
        self.slot: Memslot | None = None
        self.pfn = KVM_PFN_NOSLOT
        self.hva = -1
        self.mmu_seq = 0
        # A write whose leaf gpte's D bit the walk left to set (GuestWalker.dirty_pending).
        self.walker: GuestWalker | None = None
        self.gpte_size = 8


def kvm_mmu_page_fault(kvm: KvmMmu, vcpu: Vcpu, addr: int, error_code: int) -> int:
    """kvm_mmu_page_fault(): MMIO sptes fault with RSVD and take the MMIO path first."""
    if not vcpu.mmu.root_valid:
        return RET_PF_RETRY
    r = RET_PF_INVALID
    if error_code & PFERR_RSVD:
        r = handle_mmio_page_fault(kvm, vcpu, addr)
        if r == RET_PF_EMULATE:
            return r
    if r == RET_PF_INVALID:  # kvm_mmu_do_page_fault()
        fault = PageFault(addr, error_code & ~PFERR_RSVD)
        assert vcpu.mmu.cpu_role is not None
        stat = kvm.stat
        stat.pf_taken += 1
        if vcpu.mmu.cpu_role.pg:
            r = paging_page_fault(kvm, vcpu, fault)
        else:
            r = direct_page_fault(kvm, vcpu, fault)
        if r == RET_PF_FIXED:
            stat.pf_fixed += 1
        elif r == RET_PF_EMULATE:
            stat.pf_emulate += 1
        elif r == RET_PF_SPURIOUS:
            stat.pf_spurious += 1
    return r


# ---------------------------------------------------------------------- pfn lookup


def kvm_faultin_pfn(kvm: KvmMmu, vcpu: Vcpu, fault: PageFault, access: int) -> int:
    """kvm_faultin_pfn(): snapshot mmu_invalidate_seq, then resolve gfn -> pfn through the
    memslot and the host mapping; no memslot means MMIO."""
    fault.mmu_seq = kvm.mmu_invalidate_seq
    slot = fault.slot
    if slot is not None:
        fault.hva = slot.gfn_to_hva(fault.gfn)
        if kvm.mmu_invalidate_retry_gfn(fault.mmu_seq, fault.hva):
            return RET_PF_RETRY
        fault.pfn = vcpu.phys.host.pfn[fault.hva]
        return RET_PF_CONTINUE
    # kvm_handle_noslot_fault()
    vcpu.cache_mmio_info(fault.addr, fault.gfn, access & S.MMIO_ACCESS_MASK)
    if not kvm.config.enable_mmio_caching:
        return RET_PF_EMULATE
    if fault.gfn >= 1 << (kvm.config.maxphyaddr - PAGE_SHIFT):
        return RET_PF_EMULATE
    fault.pfn = KVM_PFN_NOSLOT
    return RET_PF_CONTINUE


def is_page_fault_stale(kvm: KvmMmu, vcpu: Vcpu, fault: PageFault) -> bool:
    mmu = vcpu.mmu
    sp = kvm.root_to_sp(mmu.root_hpa) if mmu.root_hpa >= 0 else None
    if sp is not None and kvm.is_obsolete_sp(sp):
        return True
    if sp is None and "free_obsolete_roots" in vcpu.requests:
        return True
    return fault.slot is not None and kvm.mmu_invalidate_retry_gfn(fault.mmu_seq, fault.hva)


def page_fault_handle_page_track(kvm: KvmMmu, vcpu: Vcpu, fault: PageFault) -> bool:
    """A present write to a write-tracked gfn is emulated (the upper-level tables stay
    read-only)."""
    if not fault.present or not fault.write:
        return False
    return kvm.kvm_gfn_is_write_tracked(vcpu.smm, fault.gfn)


def shadow_page_table_clear_flood(kvm: KvmMmu, vcpu: Vcpu, addr: int) -> None:
    for sp, _i, _level in shadow_walk(kvm, vcpu, addr):
        sp.write_flooding_count = 0


# ---------------------------------------------------------------------- the two handlers


def paging_page_fault(kvm: KvmMmu, vcpu: Vcpu, fault: PageFault) -> int:
    """FNAME(page_fault)."""
    # KVM's walker sets the leaf's D bit for a write fault as it walks; when the fault is then
    # retried because the guest's tables changed meanwhile, the re-executed write may fault or
    # go elsewhere, and D stays set without a write, which the SDM never allows (§4.8). The
    # model sets D when the fault commits (the kvm.dirty-bit-before-retry mutant: KVM's way).
    w = walk_addr(kvm, vcpu, fault.addr, fault.error_code, vcpu.eflags_ac,
                  defer_dirty=not kvm.bugs.dirty_bit_before_retry)
    if w.dirty_pending:
        assert vcpu.mmu.cpu_role is not None
        fault.walker = w
        fault.gpte_size = 4 if vcpu.mmu.cpu_role.level == 2 else 8
    if not kvm.bugs.mmio_cache_outlives_walk:
        # The walk is the guest's translation now; an MMIO translation cached from older
        # tables must not outlive it (SDM §4.10.4.1: a #PF invalidates the address too). A
        # walk to MMIO caches it afresh below.
        vcpu.clear_mmio_info(fault.addr)
    if not w.ok:
        # The page is not mapped by the guest: let the guest handle it, with the walker's
        # error code (before the walker checked rights, KVM passed on the shadow fault's).
        code = fault.error_code if kvm.bugs.walk_error_code_from_hardware else w.error_code
        vcpu.inject_page_fault(fault.addr, code)
        return RET_PF_RETRY
    kvm.point(Point.WALKED, vcpu)
    fault.gfn = w.gfn
    fault.slot = kvm.slot_for(vcpu.smm, fault.gfn)
    if page_fault_handle_page_track(kvm, vcpu, fault):
        shadow_page_table_clear_flood(kvm, vcpu, fault.addr)
        return RET_PF_EMULATE
    r = kvm_faultin_pfn(kvm, vcpu, fault, w.pte_access)
    # No memslot: the emulator writes through the MMIO info cached from this walk without
    # walking again, so the write is committed here.
    if r == RET_PF_EMULATE and not _commit_dirty(vcpu, fault):
        return RET_PF_RETRY
    if r != RET_PF_CONTINUE:
        return r
    kvm.point(Point.FAULTIN, vcpu)
    role = vcpu.mmu.cpu_role
    assert role is not None
    # CR0.WP=0: a supervisor write to a read-only page makes it a writable kernel page (not
    # for MMIO, whose cached access must stay the guest's).
    if fault.write and not w.pte_access & ACC_W and not role.wp and not fault.user and fault.slot:
        if role.smap and w.pte_access & ACC_U and not kvm.bugs.smap_ac_wp0_conversion:
            # A writable kernel page would hide this user page from SMAP once EFLAGS.AC is
            # clear again (KVM converts it anyway): emulate the write instead.
            return RET_PF_EMULATE
        w.pte_access = (w.pte_access | ACC_W) & ~ACC_U
        if role.smep:
            w.pte_access &= ~ACC_X
    # write_lock(&kvm->mmu_lock): a sequential model needs no lock, only the places where
    # the others may act (kvm.point) and the checks done under it.
    if is_page_fault_stale(kvm, vcpu, fault):
        return RET_PF_RETRY
    if not kvm.make_mmu_pages_available():
        raise VmError("KVM_RUN: -ENOSPC (no shadow page could be freed)")
    return fetch(kvm, vcpu, fault, w)


def direct_page_fault(kvm: KvmMmu, vcpu: Vcpu, fault: PageFault) -> int:
    """nonpaging_page_fault() -> direct_page_fault(): gpa == gva, full access."""
    fault.gfn = (fault.addr & 0xFFFFFFFF) >> PAGE_SHIFT
    fault.slot = kvm.slot_for(vcpu.smm, fault.gfn)
    if page_fault_handle_page_track(kvm, vcpu, fault):
        return RET_PF_EMULATE
    kvm.point(Point.WALKED, vcpu)
    r = kvm_faultin_pfn(kvm, vcpu, fault, ACC_ALL)
    if r != RET_PF_CONTINUE:
        return r
    kvm.point(Point.FAULTIN, vcpu)
    if is_page_fault_stale(kvm, vcpu, fault):  # under mmu_lock
        return RET_PF_RETRY
    if not kvm.make_mmu_pages_available():
        raise VmError("KVM_RUN: -ENOSPC (no shadow page could be freed)")
    return direct_map(kvm, vcpu, fault)


# ---------------------------------------------------------------------- shadow walks


def _index(addr: int, level: int) -> int:
    return (addr >> (PAGE_SHIFT + 9 * (level - 1))) & 511


def gpte_changed(vcpu: Vcpu, w: GuestWalker, level: int) -> bool:
    """FNAME(gpte_changed): re-read the gpte the walk used at ``level``; at level 1 also read
    the aligned group of PTE_PREFETCH_NUM gptes for prefetching."""
    pte_gpa = w.pte_gpa[level - 1]
    assert vcpu.mmu.cpu_role is not None
    esize = 4 if vcpu.mmu.cpu_role.level == 2 else 8
    if level == 1:
        base = pte_gpa & ~(PTE_PREFETCH_NUM * esize - 1)
        ptes = vcpu.phys.read_many(vcpu.smm, base, esize, PTE_PREFETCH_NUM)  # one page
        if ptes is None:
            return True
        w.prefetch_ptes = ptes
        curr = ptes[(pte_gpa - base) // esize]
    else:
        value = vcpu.phys.read(vcpu.smm, pte_gpa, esize)
        if value is None:
            return True
        curr = value
    return curr != w.ptes[level - 1]


def validate_direct_spte(kvm: KvmMmu, sp: ShadowPage, i: int, direct_access: int) -> None:
    """validate_direct_spte(): a read-only direct page made for a clean large gpte must not be
    reused once the gpte is dirty and the leaf access includes W."""
    spte = sp.sptv[i]
    if spte & S.SPTE_MMU_PRESENT and not spte & S.SPTE_PS:
        child = kvm.spte_to_child_sp(spte)
        if child.access == direct_access:
            return
        kvm.drop_parent_pte(child, (sp, i))
        kvm.kvm_flush_remote_tlbs()


def fetch(kvm: KvmMmu, vcpu: Vcpu, fault: PageFault, w: GuestWalker) -> int:
    """FNAME(fetch): indirect shadow pages down to the guest leaf level, direct pages below a
    guest large page, then the leaf spte."""
    mmu = vcpu.mmu
    role = mmu.cpu_role
    assert role is not None
    direct_access = w.pte_access
    top_level = 2 if role.level == 3 else role.level
    if gpte_changed(vcpu, w, top_level):
        return RET_PF_RETRY
    if not mmu.root_valid:
        return RET_PF_RETRY
    if mmu.root_hpa == DUMMY_ROOT:
        # The root gfn may have become visible since the dummy root was loaded.
        vcpu.requests.add("free_obsolete_roots")
        return RET_PF_RETRY

    sp, level = shadow_walk_init(kvm, vcpu, fault.addr)
    if sp is None and mmu.root_hpa == PAE_ROOT and not kvm.bugs.pae_root_entry_stays_invalid:
        # The guest walk went through a PDPTE whose PAE root entry was left invalid because
        # its gfn was outside every memslot when the root was loaded; a memslot created since
        # made it visible. Reload the root and retry, as for a dummy root (KVM WARNs and fails
        # KVM_RUN with -EFAULT: the kvm.pae-root-entry-stays-invalid mutant).
        vcpu.requests.add("free_obsolete_roots")
        return RET_PF_RETRY
    while sp is not None:
        i = _index(fault.addr, level)
        if not sp.direct:
            sp.write_flooding_count = 0
        if level == w.level:
            break
        table_gfn = w.table_gfn[level - 2]
        if kvm.bugs.inherited_access_leaf_level:
            # Before b1bd5cba3306: every intermediate page got the access of all non-leaf
            # levels together, so two parents with different rights share one page.
            access = w.pt_access[w.level - 1]
        else:
            access = w.pt_access[level - 2]
        child = kvm.kvm_mmu_get_child_sp(vcpu, (sp, i), table_gfn, False, access)
        created = child is not None and kvm.created_last
        # The guest needs no flush to make a not-present gpte present (SDM §4.10.4.3), so a
        # table about to be linked must not lead to stale unsync pages: sync them first
        # (65855ed8b034; before it KVM only requested a sync: link-unsync-sp-without-sync).
        if (child is not None and child.unsync_children
                and not kvm.bugs.link_unsync_without_sync):
            kvm.mmu_sync_children(vcpu, child)
        # The table has just been write-protected (if new): re-check the gpte so that a
        # concurrent write between the walk and the protection is not lost.
        changed = gpte_changed(vcpu, w, level - 1)  # also reads the gptes to prefetch
        if changed and not (kvm.bugs.gpte_recheck_only_new and not created):
            return RET_PF_RETRY
        if child is not None:
            kvm.link_shadow_page((sp, i), child)
        sp = kvm.spte_to_child_sp(sp.sptv[i])
        level -= 1
    if sp is None:
        raise VmError("KVM_RUN: -EFAULT (FNAME(fetch) found no shadow root for the address)")

    # kvm_mmu_hugepage_adjust(): the world's memslots are smaller than 2 MiB, so lpage_info
    # disallows every huge mapping (misaligned slot edges) and the goal level is 4K.
    while level > 1:
        i = _index(fault.addr, level)
        base_gfn = fault.gfn & ~((1 << (9 * (level - 1))) - 1)
        if not kvm.bugs.no_validate_direct_spte:
            validate_direct_spte(kvm, sp, i, direct_access)
        child = kvm.kvm_mmu_get_child_sp(vcpu, (sp, i), base_gfn, True, direct_access)
        if child is not None:
            kvm.link_shadow_page((sp, i), child)
        sp = kvm.spte_to_child_sp(sp.sptv[i])
        level -= 1

    i = _index(fault.addr, 1)
    kvm.point(Point.PRE_LEAF, vcpu)
    ret = mmu_set_spte(kvm, vcpu, fault.slot, sp, i, w.pte_access, fault.gfn, fault.pfn, fault)
    if ret == RET_PF_SPURIOUS:
        return ret
    pte_prefetch(kvm, vcpu, w, sp, i)
    return ret


def direct_map(kvm: KvmMmu, vcpu: Vcpu, fault: PageFault) -> int:
    sp, level = shadow_walk_init(kvm, vcpu, fault.addr)
    if sp is None:
        raise VmError("KVM_RUN: -EFAULT (direct_map found no shadow root)")
    while level > 1:
        i = _index(fault.addr, level)
        base_gfn = fault.gfn & ~((1 << (9 * (level - 1))) - 1)
        child = kvm.kvm_mmu_get_child_sp(vcpu, (sp, i), base_gfn, True, ACC_ALL)
        if child is not None:
            kvm.link_shadow_page((sp, i), child)
        sp = kvm.spte_to_child_sp(sp.sptv[i])
        level -= 1
    i = _index(fault.addr, 1)
    kvm.point(Point.PRE_LEAF, vcpu)
    ret = mmu_set_spte(kvm, vcpu, fault.slot, sp, i, ACC_ALL, fault.gfn, fault.pfn, fault)
    if ret == RET_PF_SPURIOUS:
        return ret
    direct_pte_prefetch(kvm, vcpu, sp, i)
    return ret


# ---------------------------------------------------------------------- leaf sptes


def mmu_try_to_unsync_pages(kvm: KvmMmu, as_id: int, gfn: int, can_unsync: bool,
                            prefetch: bool) -> bool:
    """mmu_try_to_unsync_pages(): a writable spte for ``gfn`` is about to be made. A
    write-tracked gfn (an upper-level table) stays write-protected; otherwise every page that
    shadows it goes unsync (they are level-1 pages: upper levels are write-tracked), unless
    KVM is syncing a page (``can_unsync`` false) or prefetching. Returns True when the spte
    must stay read-only. With unsync pages off, any page shadowing the gfn keeps it read-only."""
    if kvm.kvm_gfn_is_write_tracked(as_id, gfn):
        return True
    unsync = kvm.config.unsync
    for sp in kvm.page_hash.get(gfn, ()):
        if sp.direct or kvm.is_obsolete_sp(sp):
            continue
        if not unsync or not can_unsync:
            return True
        if sp.unsync:
            continue
        if prefetch:
            return True
        if sp.level != 1:
            raise ModelError(f"unsyncing {sp!r}, a page above level 1 that is not write-tracked")
        kvm.kvm_unsync_page(sp)
    return False


def make_spte(kvm: KvmMmu, vcpu: Vcpu, sp: ShadowPage, pte_access: int, pfn: int, old: int,
              prefetch: bool, gfn: int, can_unsync: bool = True) -> tuple[int, bool]:
    """make_spte() (spte.c); returns (spte, wrprot)."""
    writable = False
    wrprot = False
    if pte_access & ACC_W:
        # Already writable: write protection is kvm_mmu_create_sp()'s responsibility. Only a
        # present spte can be: an MMIO spte keeps the cached access, W included, in the same
        # bit, and a stale one being replaced says nothing about write protection (KVM asks
        # is_writable_pte() alone: the kvm.mmio-spte-counts-as-writable mutant).
        was_writable = old & S.SPTE_W and (old & S.SPTE_MMU_PRESENT
                                           or kvm.bugs.mmio_spte_counts_as_writable)
        if was_writable:
            writable = True
        elif mmu_try_to_unsync_pages(kvm, sp.smm, gfn, can_unsync, prefetch):
            wrprot = True
            pte_access &= ~ACC_W
        else:
            writable = True
    spte = S.make_leaf_spte(pfn, sp.level, pte_access, writable=writable, prefetch=prefetch)
    return spte, wrprot


def _commit_dirty(vcpu: Vcpu, fault: PageFault | None) -> bool:
    """The write of ``fault`` is about to happen through the translation its walk found: set
    the leaf's D bit the walk left clear (set_pending_dirty()); False when the gpte changed
    meanwhile (retry). Nothing to do for prefetches, direct faults and reads."""
    if fault is None or fault.walker is None or not fault.walker.dirty_pending:
        return True
    return set_pending_dirty(vcpu, fault.walker, fault.gpte_size)


def mmu_set_spte(kvm: KvmMmu, vcpu: Vcpu, slot: Memslot | None, sp: ShadowPage, i: int,
                 pte_access: int, gfn: int, pfn: int, fault: PageFault | None) -> int:
    """mmu_set_spte(): MMIO spte for no-slot pfns; replace a stale spte (flushing); make the
    spte; rmap it. A write fault on a page that had to stay read-only is emulated."""
    prefetch = fault is None or fault.prefetch
    write_fault = fault is not None and fault.write
    old = sp.sptv[i]
    was_rmapped = False
    flush = False
    # Before the 2026 fix an MMIO spte was written over whatever was there: a present spte (a
    # stale one in an unsync page, say) left its rmap entry behind.
    if old & S.SPTE_MMU_PRESENT and not (pfn == KVM_PFN_NOSLOT
                                         and kvm.bugs.mmio_spte_over_present_spte):
        if S.spte_pfn(old) != pfn:
            kvm.drop_spte(sp, i)
            flush = True
            old = 0
        else:
            was_rmapped = True
    if pfn == KVM_PFN_NOSLOT:
        # The emulator writes through the MMIO info this fault cached, without a walk.
        committed = _commit_dirty(vcpu, fault)
        if committed:
            mark_mmio_spte(kvm, vcpu, sp, i, gfn, pte_access)
        if flush:
            kvm.kvm_flush_remote_tlbs_gfn(gfn)
        return RET_PF_EMULATE if committed else RET_PF_RETRY
    spte, wrprot = make_spte(kvm, vcpu, sp, pte_access, pfn, old, prefetch, gfn)
    # The faulting write goes through this spte: only now is its gpte dirty (SDM §4.8). A
    # write that is emulated instead (a write-protected gfn) walks and sets D itself.
    if spte & S.SPTE_W and not _commit_dirty(vcpu, fault):
        if flush:
            kvm.kvm_flush_remote_tlbs_gfn(gfn)
        return RET_PF_RETRY
    ret = RET_PF_FIXED
    if old == spte:
        ret = RET_PF_SPURIOUS
    else:
        sp.sptv[i] = spte
        # mmu_spte_update(): losing MMU-writable needs a flush (the fast path may have made
        # the spte writable behind our back).
        if old & S.SPTE_MMU_WRITABLE and not spte & S.SPTE_MMU_WRITABLE:
            flush = True
        if kvm.trace is not None:  # the detail only for a trace
            kvm.emit("set_spte", sp, f"[{i}] gfn={gfn:#x} spte={spte:#x}")
    if wrprot and write_fault:
        ret = RET_PF_EMULATE
    if flush:
        kvm.kvm_flush_remote_tlbs_gfn(gfn)
    if not was_rmapped:
        kvm.rmap_add(sp, i, gfn, pte_access)
    else:
        sp.set_translation(i, gfn, pte_access)
    return ret


# ---------------------------------------------------------------------- sync


def sync_spte(kvm: KvmMmu, vcpu: Vcpu, sp: ShadowPage, i: int) -> int:
    """FNAME(sync_spte): bring one spte of an unsync page up to date with its gpte, read now.
    An invalid gpte drops the spte, a new frame drops it (the next access faults it in), new
    rights rebuild it as a prefetch that may not unsync anything. Returns 1 when a flush is
    due, 0 when not, -1 when the gpte cannot be read."""
    is32 = sp.has_4_byte_gpte
    esize = 4 if is32 else 8
    # FNAME(get_level1_sp_gpa): a 32-bit guest PT is shadowed by two pages, one per half.
    pte_gpa = (sp.gfn << PAGE_SHIFT) + ((sp.quadrant << 9) + i) * esize if is32 else (
        (sp.gfn << PAGE_SHIFT) + i * esize)
    gpte = vcpu.phys.read(vcpu.smm, pte_gpa, esize)
    if gpte is None:
        return -1
    # FNAME(prefetch_invalid_gpte)
    if gpte & vcpu.mmu.rsvd[0][1] or not gpte & PTE_P or not gpte & PTE_A:
        kvm.drop_spte(sp, i)
        return 1
    gfn = (gpte & (0xFFFFF000 if is32 else S.SPTE_BASE_ADDR_MASK)) >> PAGE_SHIFT
    access = protect_clean_gpte(sp.access & gpte_access(gpte, is32), gpte)
    spte = sp.sptv[i]
    if S.is_mmio_spte(spte):  # sync_mmio_spte()
        # KVM re-marks the spte with today's generation whenever the gpte still names its
        # gfn; a stale one (a memslot update since, which may have made the gfn RAM) must go
        # instead, so that the next access faults and finds out
        # (kvm.sync-mmio-spte-refreshes-generation).
        if gfn != S.get_mmio_spte_gfn(spte) or not (
                check_mmio_spte(kvm, vcpu, spte) or kvm.bugs.sync_mmio_spte_refreshes_generation):
            sp.sptv[i] = 0
        else:
            mark_mmio_spte(kvm, vcpu, sp, i, gfn, access)
        return 0
    if gfn != sp.get_gfn(i):
        kvm.drop_spte(sp, i)
        return 1
    if sp.get_access(i) == access:
        return 0
    sp.set_translation(i, gfn, access)
    new, _ = make_spte(kvm, vcpu, sp, access, S.spte_pfn(spte), spte, True, gfn,
                       can_unsync=False)
    sp.sptv[i] = new
    # mmu_spte_update(): a flush is due when the spte lost MMU-writable.
    return 1 if spte & S.SPTE_MMU_WRITABLE and not new & S.SPTE_MMU_WRITABLE else 0


# ---------------------------------------------------------------------- prefetch


def pte_prefetch(kvm: KvmMmu, vcpu: Vcpu, w: GuestWalker, sp: ShadowPage, i: int) -> None:
    """FNAME(pte_prefetch): map the aligned group of 8 neighbouring gptes read by
    gpte_changed(), stopping at the first that cannot be prefetched."""
    if sp.level > 1 or kvm.mmu_invalidate_in_progress:
        return
    if sp.direct:
        direct_pte_prefetch(kvm, vcpu, sp, i)
        return
    start = i & ~(PTE_PREFETCH_NUM - 1)
    is32 = sp.has_4_byte_gpte
    role = vcpu.mmu.cpu_role
    assert role is not None
    rsvd = vcpu.mmu.rsvd
    for k in range(PTE_PREFETCH_NUM):
        j = start + k
        if j == i or sp.sptv[j] & S.SPTE_MMU_PRESENT:
            continue
        gpte = w.prefetch_ptes[k]
        # FNAME(prefetch_invalid_gpte): only present, accessed, non-reserved gptes.
        if not gpte & PTE_P or not gpte & PTE_A or gpte & rsvd[0][1]:
            kvm.drop_spte(sp, j)
            break
        mask = 0xFFFFF000 if is32 else S.SPTE_BASE_ADDR_MASK
        gfn = (gpte & mask) >> PAGE_SHIFT
        access = protect_clean_gpte(sp.access & gpte_access(gpte, is32), gpte)
        slot = kvm.slot_for(vcpu.smm, gfn)
        if slot is None:
            break
        pfn = vcpu.phys.host.pfn[slot.gfn_to_hva(gfn)]
        mmu_set_spte(kvm, vcpu, slot, sp, j, access, gfn, pfn, None)


def direct_pte_prefetch(kvm: KvmMmu, vcpu: Vcpu, sp: ShadowPage, i: int) -> None:
    """direct_pte_prefetch(): runs of non-present sptes in the aligned group of 8, mapped with
    the page's access while the memslot of the run's first gfn lasts."""
    if sp.level > 1 or kvm.mmu_invalidate_in_progress:
        return
    base = i & ~(PTE_PREFETCH_NUM - 1)
    run_start = -1
    for j in range(base, base + PTE_PREFETCH_NUM + 1):
        at_end = j == base + PTE_PREFETCH_NUM
        if at_end or sp.sptv[j] & S.SPTE_MMU_PRESENT or j == i:
            if run_start >= 0:
                if not _direct_prefetch_many(kvm, vcpu, sp, run_start, j):
                    return
                run_start = -1
        elif run_start < 0:
            run_start = j


def _direct_prefetch_many(kvm: KvmMmu, vcpu: Vcpu, sp: ShadowPage, start: int, end: int
                          ) -> bool:
    gfn = sp.get_gfn(start)
    slot = kvm.slot_for(vcpu.smm, gfn)
    # gfn_to_page_many_atomic() gives nothing when the run leaves the memslot.
    if slot is None or gfn + (end - start) > slot.end_gfn:
        return False
    for k in range(end - start):
        pfn = vcpu.phys.host.pfn[slot.gfn_to_hva(gfn + k)]
        mmu_set_spte(kvm, vcpu, slot, sp, start + k, sp.access, gfn + k, pfn, None)
    return True


__all__ = ["RET_PF_CONTINUE", "PageFault", "kvm_mmu_page_fault"]
