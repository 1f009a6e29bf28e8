"""The VM-wide shadow MMU state and the shadow-page life cycle (KVM's mmu.c and page_track.c).

Lookup by (gfn, role) through a gfn-keyed hash that sees every role and both address spaces;
creation accounts the page (write tracking, write protection); linking keeps parent_ptes; leaf
sptes are kept in per-memslot rmaps; zapping unlinks children and parents and defers freeing
to a commit that flushes remote TLBs first. Function names are KVM's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from fuzzmmu.model.bugs import BugSet
from fuzzmmu.model.mmu import spte as S
from fuzzmmu.model.mmu.internal import MmuConfig, ModelError, Point
from fuzzmmu.model.mmu.page import SPTES_PER_PAGE, ShadowPage
from fuzzmmu.model.mmu.role import (
    ACCESS_MASK,
    INVALID,
    LEVEL_MASK,
    QUADRANT_MASK,
    with_access,
    with_direct,
    with_level,
    with_quadrant,
)
from fuzzmmu.model.mmu.stats import MmuStats
from fuzzmmu.model.mmu.trace import Event

if TYPE_CHECKING:
    from fuzzmmu.model.x86 import Vcpu
    from fuzzmmu.world.memslots import Memslot, Memslots

Sptep = tuple[ShadowPage, int]

KVM_MIN_FREE_MMU_PAGES: Final = 5
KVM_REFILL_PAGES: Final = 25
SP_HPFN_BASE: Final = 0x100000  # host frames of shadow page tables, far from guest RAM frames
_EMPTY_SPT: Final = bytes(8 * SPTES_PER_PAGE)


class SlotArch:
    """struct kvm_arch_memory_slot: rmaps of 4K leaf sptes and the write-track counters."""

    __slots__ = ("rmap", "write_track")

    def __init__(self) -> None:
        self.rmap: dict[int, set[Sptep]] = {}
        self.write_track: dict[int, int] = {}


class KvmMmu:
    """kvm->arch's MMU state plus the operations on shadow pages."""

    def __init__(self, memslots: Memslots, config: MmuConfig, bugs: BugSet,
                 trace: Callable[[Event], None] | None = None) -> None:
        self.memslots = memslots
        self.config = config
        self.bugs = bugs
        self.trace = trace
        self.vcpus: list[Vcpu] = []
        self.stat = MmuStats()
        self.page_hash: dict[int, list[ShadowPage]] = {}
        self.active_mmu_pages: dict[ShadowPage, None] = {}  # insertion order: oldest first
        self.sp_by_hpfn: dict[int, ShadowPage] = {}
        self.next_hpfn = SP_HPFN_BASE
        self.n_used_mmu_pages = 0
        self.n_max_mmu_pages = config.n_max_mmu_pages
        self.mmu_valid_gen = 0
        self.indirect_shadow_pages = 0
        self.slot_arch: dict[Memslot, SlotArch] = {}
        self.mmu_invalidate_seq = 0
        self.mmu_invalidate_in_progress = 0
        self.mmu_invalidate_range: tuple[int, int] = (0, 0)  # hva range being invalidated
        self.hook: Callable[[Point, Vcpu | None], None] | None = None
        self.created_last = False  # whether the last kvm_mmu_get_shadow_page created the page
        self.current_vcpu: Vcpu | None = None  # the vCPU whose exit KVM is handling
        # FNAME(sync_spte) (KVM's mmu->sync_spte): the machine installs the fault path's,
        # which rebuilds sptes from gptes as prefetch does.
        self.sync_spte: Callable[[KvmMmu, Vcpu, ShadowPage, int], int] = _no_sync
        for space in memslots.spaces:  # (nothing iterates slot_arch: no order needed)
            for slot in space.values():
                self.slot_arch[slot] = SlotArch()

    # ------------------------------------------------------------------ helpers

    def emit(self, name: str, sp: ShadowPage | None = None, detail: str = "") -> None:
        if self.trace is not None:
            self.trace(Event(name, sp, detail))

    def point(self, where: Point, vcpu: Vcpu | None = None) -> None:
        """A concurrency point: the executor may run another operation here."""
        if self.hook is not None:
            self.hook(where, vcpu)

    def is_obsolete_sp(self, sp: ShadowPage) -> bool:
        return bool(sp.role & INVALID) or sp.mmu_valid_gen != self.mmu_valid_gen

    def slot_for(self, as_id: int, gfn: int) -> Memslot | None:
        return self.memslots.lookup(as_id, gfn)

    def arch(self, slot: Memslot) -> SlotArch:
        return self.slot_arch[slot]

    def spte_to_child_sp(self, spte: int) -> ShadowPage:
        sp = self.sp_by_hpfn.get(S.spte_pfn(spte))
        if sp is None:
            raise ModelError(f"non-leaf spte {spte:#x} points at a freed shadow page")
        return sp

    def root_to_sp(self, hpa: int) -> ShadowPage | None:
        return self.sp_by_hpfn.get(hpa >> 12)

    # ------------------------------------------------------------------ TLB flushes

    def kvm_flush_remote_tlbs(self) -> None:
        """kvm_flush_remote_tlbs(): every vCPU drops its TLB; the IPI waits for them, so in a
        sequential model the flush is immediate. Before kvm-28 only the vCPU that reduced
        the permissions flushed."""
        self.emit("flush_remote_tlbs")
        self.stat.remote_tlb_flush += 1
        if self.bugs.local_flush_only and self.current_vcpu is not None:
            self.current_vcpu.tlb.clear()
            return
        for vcpu in self.vcpus:
            vcpu.tlb.clear()

    def kvm_flush_remote_tlbs_gfn(self, gfn: int) -> None:
        self.kvm_flush_remote_tlbs()

    def kvm_make_all_cpus_request(self, req: str) -> None:
        for vcpu in self.vcpus:
            vcpu.requests.add(req)

    # ------------------------------------------------------------------ write tracking

    def kvm_gfn_is_write_tracked(self, as_id: int, gfn: int) -> bool:
        """kvm_gfn_is_write_tracked(): since 0f38453cdb2e every address space is consulted.
        (Called for every writable spte made: the memslot lookups are inlined.)"""
        arch = self.slot_arch
        if self.bugs.wp_one_address_space:
            slot = self.memslots.by_gfn[as_id].get(gfn)
            return slot is not None and gfn in arch[slot].write_track
        for space in self.memslots.by_gfn:
            slot = space.get(gfn)
            if slot is not None and gfn in arch[slot].write_track:  # counts are never 0
                return True
        return False

    def kvm_mmu_slot_gfn_write_protect(self, slot: Memslot, gfn: int) -> bool:
        """rmap_write_protect(pt_protect=true) over the 4K rmap of ``gfn`` in ``slot``."""
        flush = False
        rmap = self.slot_arch[slot].rmap.get(gfn)
        if rmap:
            for sp, i in sorted(rmap, key=_sptep_key):
                old = sp.sptv[i]
                if old & (S.SPTE_W | S.SPTE_MMU_WRITABLE):
                    sp.sptv[i] = S.wrprotect_spte(old)
                    flush = True
        return flush

    def write_protect_gfn_everywhere(self, sp: ShadowPage) -> bool:
        """Write-protect a newly shadowed gfn. The fix for the wp-all-address-spaces bug: every
        memslot mapping the gfn, in every address space (else a writable spte made through
        the other space's rmap survives)."""
        if self.bugs.wp_one_address_space:
            spaces: range | tuple[int, ...] = (sp.smm,)
        else:
            spaces = range(len(self.memslots.spaces))
        flush = False
        for as_id in spaces:
            slot = self.memslots.lookup(as_id, sp.gfn)
            if slot is not None:
                flush |= self.kvm_mmu_slot_gfn_write_protect(slot, sp.gfn)
        return flush

    def account_shadowed(self, sp: ShadowPage) -> None:
        """account_shadowed(): count the page; upper levels are write-tracked; the gfn is
        write-protected (and remote TLBs flushed if a writable spte lost W)."""
        self.indirect_shadow_pages += 1
        slot = self.memslots.lookup(sp.smm, sp.gfn)
        if slot is None:
            raise ModelError(f"shadowing gfn {sp.gfn:#x} outside every memslot")
        if sp.level > 1:
            track = self.slot_arch[slot].write_track
            track[sp.gfn] = track.get(sp.gfn, 0) + 1
        if self.write_protect_gfn_everywhere(sp):
            self.kvm_flush_remote_tlbs_gfn(sp.gfn)

    def unaccount_shadowed(self, sp: ShadowPage) -> None:
        self.indirect_shadow_pages -= 1
        if sp.level > 1:
            slot = self.memslots.lookup(sp.smm, sp.gfn)
            if slot is None:
                raise ModelError(f"unaccounting gfn {sp.gfn:#x} outside every memslot")
            track = self.slot_arch[slot].write_track
            count = track.get(sp.gfn, 0) - 1
            if count < 0:
                raise ModelError(f"write-track count of gfn {sp.gfn:#x} went negative")
            if count:
                track[sp.gfn] = count
            else:
                track.pop(sp.gfn, None)

    # ------------------------------------------------------------------ rmap

    def rmap_add(self, sp: ShadowPage, i: int, gfn: int, access: int) -> None:
        if sp.shadowed is not None:
            sp.shadowed[i] = (gfn << 3) | access  # set_translation(), inline
        slot = self.memslots.by_gfn[sp.smm].get(gfn)
        if slot is None:
            raise ModelError(f"rmap_add for gfn {gfn:#x} outside every memslot")
        rmaps = self.slot_arch[slot].rmap
        rmap = rmaps.get(gfn)
        if rmap is None:
            rmaps[gfn] = {(sp, i)}
        else:
            rmap.add((sp, i))

    def rmap_remove(self, sp: ShadowPage, i: int) -> None:
        gfn = sp.get_gfn(i)
        slot = self.memslots.by_gfn[sp.smm].get(gfn)
        rmaps = self.slot_arch[slot].rmap if slot is not None else None
        rmap = rmaps.get(gfn) if rmaps is not None else None
        if rmaps is None or rmap is None or (sp, i) not in rmap:
            raise ModelError(f"rmap_remove: spte {sp!r}[{i}] for gfn {gfn:#x} not in rmap")
        rmap.discard((sp, i))
        if not rmap:
            del rmaps[gfn]

    def drop_spte(self, sp: ShadowPage, i: int) -> None:
        """drop_spte(): clear a leaf spte and remove it from its rmap."""
        old = sp.sptv[i]
        sp.sptv[i] = 0
        if old & S.SPTE_MMU_PRESENT:
            self.rmap_remove(sp, i)

    # ------------------------------------------------------------------ parent links

    def drop_parent_pte(self, child: ShadowPage, parent: Sptep) -> None:
        child.parent_ptes.discard(parent)
        parent[0].sptv[parent[1]] = 0

    def mmu_page_zap_pte(self, sp: ShadowPage, i: int) -> bool:
        """mmu_page_zap_pte(): returns whether a present spte was zapped."""
        spte = sp.sptv[i]
        if spte & S.SPTE_MMU_PRESENT:
            if S.is_last_spte(spte, sp.level):
                self.drop_spte(sp, i)
            else:
                self.drop_parent_pte(self.spte_to_child_sp(spte), (sp, i))
            return True
        if S.is_mmio_spte(spte):
            sp.sptv[i] = 0
        return False

    def link_shadow_page(self, parent: Sptep, child: ShadowPage) -> None:
        """link_shadow_page(): install the non-leaf spte and record the parent link; a child
        that is unsync or leads to unsync pages marks its new parent too."""
        psp, i = parent
        if psp.sptv[i] & S.SPTE_MMU_PRESENT:  # only a large leaf can be here: drop it
            self.drop_spte(psp, i)
            self.kvm_flush_remote_tlbs()
        psp.sptv[i] = S.make_nonleaf_spte(child.hpfn)
        child.parent_ptes.add(parent)
        if child.unsync_children or child.unsync:
            self.mark_unsync(parent)

    # ------------------------------------------------------------------ unsync bookkeeping

    def kvm_unsync_page(self, sp: ShadowPage) -> None:
        """kvm_unsync_page(): the guest may now write the table without an exit."""
        self.emit("unsync_page", sp)
        self.stat.mmu_unsync += 1
        sp.unsync = True
        self.kvm_mmu_mark_parents_unsync(sp)

    def kvm_mmu_mark_parents_unsync(self, sp: ShadowPage) -> None:
        for parent in sorted(sp.parent_ptes, key=_sptep_key):
            self.mark_unsync(parent)

    def mark_unsync(self, parent: Sptep) -> None:
        """mark_unsync(): set the parent spte's bit; the grandparents only learn of it when
        the parent's first unsync child appears."""
        psp, i = parent
        if psp.unsync_child_bitmap >> i & 1:
            return
        psp.unsync_child_bitmap |= 1 << i
        psp.unsync_children += 1
        if psp.unsync_children == 1:
            self.kvm_mmu_mark_parents_unsync(psp)

    def clear_unsync_child_bit(self, sp: ShadowPage, i: int) -> None:
        sp.unsync_children -= 1
        if sp.unsync_children < 0:
            raise ModelError(f"unsync_children of {sp!r} went negative")
        sp.unsync_child_bitmap &= ~(1 << i)

    def kvm_sync_page_check(self, vcpu: Vcpu, sp: ShadowPage) -> bool:
        """kvm_sync_page_check(): a page is synced only by a vCPU whose paging mode built it
        (roles equal but for level, access, quadrant): gptes are never read in another
        format."""
        ignore = LEVEL_MASK | ACCESS_MASK | QUADRANT_MASK
        return not sp.direct and not (sp.role ^ vcpu.mmu.root_role) & ~ignore

    def kvm_sync_spte(self, vcpu: Vcpu, sp: ShadowPage, i: int) -> int:
        """kvm_sync_spte(): >0 a flush is due, 0 nothing to do, <0 the spte is broken."""
        if not sp.sptv[i]:
            return 0
        return self.sync_spte(self, vcpu, sp, i)

    def kvm_sync_page(self, vcpu: Vcpu, sp: ShadowPage, invalid_list: list[ShadowPage]) -> int:
        """kvm_sync_page(): every spte from its gpte; a page that cannot be synced is zapped
        (returns <0); >0 when a flush is due."""
        ret = 0
        if not self.kvm_sync_page_check(vcpu, sp):
            ret = -1
        else:
            for i in sp.spt.nonzero()[0].tolist():
                ret |= self.sync_spte(self, vcpu, sp, i)  # a -1 among them makes it -1
        if ret < 0:
            self.kvm_mmu_prepare_zap_page(sp, invalid_list)
        return ret

    def kvm_vcpu_write_protect_gfn(self, vcpu: Vcpu, gfn: int) -> bool:
        """Write-protect a gfn whose unsync page is being synced: in every address space, as
        account_shadowed() does since 0f38453cdb2e (a writable spte left in the other space
        would let the guest edit the page, in sync again, without KVM seeing it). KVM's
        kvm_vcpu_write_protect_gfn() goes through the vCPU's own address space only
        (kvm.resync-wp-one-address-space)."""
        if self.bugs.resync_wp_one_address_space:
            slot = self.memslots.lookup(vcpu.smm, gfn)
            return slot is not None and self.kvm_mmu_slot_gfn_write_protect(slot, gfn)
        flush = False
        for as_id in range(len(self.memslots.spaces)):
            slot = self.memslots.lookup(as_id, gfn)
            if slot is not None:
                flush |= self.kvm_mmu_slot_gfn_write_protect(slot, gfn)
        return flush

    def kvm_mmu_remote_flush_or_zap(self, invalid_list: list[ShadowPage], remote_flush: bool
                                    ) -> None:
        if invalid_list:
            self.kvm_mmu_commit_zap_page(invalid_list)
        elif remote_flush:
            self.kvm_flush_remote_tlbs()

    def mmu_sync_children(self, vcpu: Vcpu, parent: ShadowPage) -> None:
        """mmu_sync_children(): write-protect every unsync page below ``parent`` again (one
        remote flush if any spte lost W), then sync each and mark it in sync."""
        invalid: list[ShadowPage] = []
        flush = False
        while True:
            leaves = self.mmu_unsync_walk(parent)
            if not leaves:
                break
            protected = False
            for sp, _path in leaves:
                protected |= self.kvm_vcpu_write_protect_gfn(vcpu, sp.gfn)
            if protected:
                self.kvm_mmu_remote_flush_or_zap(invalid, True)
                flush = False
            for sp, path in leaves:
                self.kvm_unlink_unsync_page(sp)
                flush |= self.kvm_sync_page(vcpu, sp, invalid) > 0
                self.mmu_pages_clear_parents(path)
        self.kvm_mmu_remote_flush_or_zap(invalid, flush)

    def kvm_unlink_unsync_page(self, sp: ShadowPage) -> None:
        """kvm_unlink_unsync_page(): the page is in sync again (or going away); its parents'
        bits are cleared by the walks that find them stale."""
        sp.unsync = False
        self.stat.mmu_unsync -= 1

    # ------------------------------------------------------------------ get / create

    def kvm_mmu_find_shadow_page(self, gfn: int, role: int, vcpu: Vcpu | None
                                 ) -> ShadowPage | None:
        invalid: list[ShadowPage] = []  # pages leave the hash only at the commit below
        found = None
        for sp in self.page_hash.get(gfn, ()):
            if self.is_obsolete_sp(sp):
                continue
            if sp.role != role:
                # A new upper-level page for the gfn will be write-tracked: an unsync page of
                # it must go (the guest has most likely reused the frame).
                if role & LEVEL_MASK > 1 and sp.unsync:
                    self.kvm_mmu_prepare_zap_page(sp, invalid)
                continue
            if sp.direct:  # unsync pages and write flooding only concern indirect pages
                found = sp
                break
            if sp.unsync:
                if vcpu is None:
                    raise ModelError(f"found unsync {sp!r} without a vCPU to sync it")
                # Stale but good: bring its sptes up to date without write-protecting it or
                # marking it sync (that waits for the guest's TLB flush); a failed sync zaps
                # it and a new page is made.
                ret = self.kvm_sync_page(vcpu, sp, invalid)
                if ret < 0:
                    break
                if ret > 0:
                    self.kvm_flush_remote_tlbs()
            sp.write_flooding_count = 0
            found = sp
            break
        self.kvm_mmu_commit_zap_page(invalid)
        return found

    def kvm_mmu_alloc_shadow_page(self, gfn: int, role: int) -> ShadowPage:
        sp = ShadowPage(gfn, role, self.next_hpfn, self.mmu_valid_gen)
        self.next_hpfn += 1
        self.sp_by_hpfn[sp.hpfn] = sp
        self.active_mmu_pages[sp] = None
        self.n_used_mmu_pages += 1
        self.page_hash.setdefault(gfn, []).append(sp)
        self.emit("create_sp", sp)
        if not sp.direct:  # sp_has_gptes()
            self.account_shadowed(sp)
        return sp

    def kvm_mmu_get_shadow_page(self, gfn: int, role: int, vcpu: Vcpu | None = None
                                ) -> ShadowPage:
        sp = self.kvm_mmu_find_shadow_page(gfn, role, vcpu)
        self.created_last = sp is None
        if sp is None:
            self.stat.mmu_cache_miss += 1
            sp = self.kvm_mmu_alloc_shadow_page(gfn, role)
        return sp

    def kvm_mmu_get_child_sp(self, vcpu: Vcpu, parent: Sptep, gfn: int, direct: bool,
                             access: int) -> ShadowPage | None:
        """kvm_mmu_get_child_sp(): None stands for -EEXIST (a present non-leaf is reused as
        is, without re-checking its role)."""
        psp, i = parent
        spte = psp.sptv[i]
        if spte & S.SPTE_MMU_PRESENT and not spte & S.SPTE_PS:
            return None
        return self.kvm_mmu_get_shadow_page(gfn, kvm_mmu_child_role(psp, i, direct, access),
                                            vcpu)

    # ------------------------------------------------------------------ zapping

    def kvm_mmu_prepare_zap_page(self, sp: ShadowPage, invalid_list: list[ShadowPage]) -> bool:
        """__kvm_mmu_prepare_zap_page(); returns whether the active list changed beyond sp.
        The unsync pages below an upper-level page go first (mmu_zap_unsync_children()):
        nothing would sync them once this page no longer leads to them."""
        self.emit("zap_sp", sp)
        self.stat.mmu_shadow_zapped += 1
        zapped_children = bool(self.mmu_zap_unsync_children(sp, invalid_list))
        # (most zapped pages hold no spte: comparing the bytes is cheaper than nonzero())
        if sp.sptv.tobytes() != _EMPTY_SPT:
            for i in sp.spt.nonzero()[0].tolist():
                zapped_children |= self.mmu_page_zap_pte(sp, i)
        for parent in sorted(sp.parent_ptes, key=_sptep_key):
            self.drop_parent_pte(sp, parent)
        if not sp.invalid and sp.has_gptes():
            self.unaccount_shadowed(sp)
        if sp.unsync:
            self.kvm_unlink_unsync_page(sp)
        zapped_root = False
        if not sp.root_count:
            invalid_list.append(sp)
            self.active_mmu_pages.pop(sp, None)
            self.n_used_mmu_pages -= 1
        else:
            self.active_mmu_pages.pop(sp, None)
            zapped_root = not self.is_obsolete_sp(sp)
        sp.role |= INVALID
        if zapped_root:
            self.kvm_make_all_cpus_request("free_obsolete_roots")
        return zapped_children

    def mmu_zap_unsync_children(self, parent: ShadowPage, invalid_list: list[ShadowPage]
                                ) -> int:
        """mmu_zap_unsync_children(): zap every unsync page below ``parent``."""
        if parent.level == 1:
            return 0
        zapped = 0
        while True:
            leaves = self.mmu_unsync_walk(parent)
            if not leaves:
                return zapped
            for sp, path in leaves:
                self.kvm_mmu_prepare_zap_page(sp, invalid_list)
                self.mmu_pages_clear_parents(path)
                zapped += 1

    def mmu_unsync_walk(self, parent: ShadowPage) -> list[tuple[ShadowPage, list[Sptep]]]:
        """mmu_unsync_walk(): the unsync pages below ``parent`` (each once), each with the
        path of parent sptes that leads to it from ``parent``, clearing the bits that turn
        out stale on the way."""
        out: list[tuple[ShadowPage, list[Sptep]]] = []
        if parent.unsync_children:
            self._unsync_walk(parent, [], out, set())
        return out

    def _unsync_walk(self, sp: ShadowPage, path: list[Sptep],
                     out: list[tuple[ShadowPage, list[Sptep]]], seen: set[ShadowPage]) -> int:
        """__mmu_unsync_walk(): how many unsync leaves lie below ``sp``."""
        found = 0
        bitmap = sp.unsync_child_bitmap
        while bitmap:
            low = bitmap & -bitmap
            bitmap ^= low
            i = low.bit_length() - 1
            ent = sp.sptv[i]
            if not ent & S.SPTE_MMU_PRESENT or ent & S.SPTE_PS:
                self.clear_unsync_child_bit(sp, i)
                continue
            child = self.spte_to_child_sp(ent)
            if child.unsync_children:
                n = self._unsync_walk(child, [*path, (sp, i)], out, seen)
                if not n:
                    self.clear_unsync_child_bit(sp, i)
                found += n
            elif child.unsync:
                found += 1
                if child not in seen:  # mmu_pages_add() keeps a page once per batch
                    seen.add(child)
                    out.append((child, [*path, (sp, i)]))
            else:
                self.clear_unsync_child_bit(sp, i)
        return found

    def mmu_pages_clear_parents(self, path: list[Sptep]) -> None:
        """mmu_pages_clear_parents(): after a leaf is dealt with, clear its bit in its parent,
        and the parent's in the grandparent when that was the parent's last, and so on."""
        for psp, i in reversed(path):
            if not psp.unsync_child_bitmap >> i & 1:
                return  # already cleared through another path
            self.clear_unsync_child_bit(psp, i)
            if psp.unsync_children:
                return

    def kvm_mmu_free_shadow_page(self, sp: ShadowPage) -> None:
        bucket = self.page_hash[sp.gfn]
        bucket.remove(sp)
        if not bucket:
            del self.page_hash[sp.gfn]
        del self.sp_by_hpfn[sp.hpfn]

    def kvm_mmu_commit_zap_page(self, invalid_list: list[ShadowPage]) -> None:
        if not invalid_list:
            return
        self.kvm_flush_remote_tlbs()
        for sp in invalid_list:
            if not sp.invalid or sp.root_count:
                raise ModelError(f"freeing {sp!r} with root_count {sp.root_count}")
            self.kvm_mmu_free_shadow_page(sp)
        invalid_list.clear()

    def kvm_mmu_zap_oldest_mmu_pages(self, nr_to_zap: int) -> int:
        invalid: list[ShadowPage] = []
        total = 0
        restart = True
        while restart:
            restart = False
            for sp in list(self.active_mmu_pages):
                if sp.root_count or sp not in self.active_mmu_pages:
                    continue
                unstable = self.kvm_mmu_prepare_zap_page(sp, invalid)
                total += 1
                if total >= nr_to_zap:
                    break
                if unstable:
                    restart = True
                    break
        self.kvm_mmu_commit_zap_page(invalid)
        self.stat.mmu_recycled += total
        return total

    def kvm_mmu_available_pages(self) -> int:
        return max(self.n_max_mmu_pages - self.n_used_mmu_pages, 0)

    def make_mmu_pages_available(self) -> bool:
        """make_mmu_pages_available(); False stands for -ENOSPC."""
        avail = self.kvm_mmu_available_pages()
        if avail >= KVM_MIN_FREE_MMU_PAGES:
            return True
        self.kvm_mmu_zap_oldest_mmu_pages(KVM_REFILL_PAGES - avail)
        return self.kvm_mmu_available_pages() > 0

    def kvm_mmu_change_mmu_pages(self, goal: int) -> None:
        """KVM_SET_NR_MMU_PAGES."""
        if self.n_used_mmu_pages > goal:
            self.kvm_mmu_zap_oldest_mmu_pages(self.n_used_mmu_pages - goal)
            goal = self.n_used_mmu_pages
        self.n_max_mmu_pages = goal

    def kvm_mmu_zap_all_fast(self) -> None:
        """Obsolete every shadow page by toggling mmu_valid_gen, make every vCPU drop its
        roots, then zap the obsolete pages oldest first (they sit at the old end of the FIFO)."""
        self.emit("zap_all_fast")
        self.mmu_valid_gen ^= 1
        self.kvm_make_all_cpus_request("free_obsolete_roots")
        invalid: list[ShadowPage] = []
        restart = True
        while restart:
            restart = False
            for sp in list(self.active_mmu_pages):
                if sp not in self.active_mmu_pages:
                    continue
                if not self.is_obsolete_sp(sp):
                    break
                if self.kvm_mmu_prepare_zap_page(sp, invalid):
                    restart = True
                    break
        self.kvm_mmu_commit_zap_page(invalid)

    # ------------------------------------------------------------------ MMU notifier

    def kvm_unmap_gfn_range(self, slot: Memslot, gfn: int) -> bool:
        """kvm_zap_rmap() for one gfn of ``slot``: drop every 4K leaf mapping it."""
        rmap = self.slot_arch[slot].rmap.get(gfn)
        if not rmap:
            return False
        for sp, i in sorted(rmap, key=_sptep_key):
            self.drop_spte(sp, i)
        return True

    def invalidate_range_start(self, hva: int) -> None:
        """kvm_mmu_notifier_invalidate_range_start() for one host page: mark the invalidation
        in progress, then zap every gfn mapping it in every address space and flush."""
        self.mmu_invalidate_in_progress += 1
        self.mmu_invalidate_range = (hva, hva + 1)
        flush = False
        for slot in self.memslots.all_slots():
            if slot.hva <= hva < slot.hva + slot.npages:
                flush |= self.kvm_unmap_gfn_range(slot, slot.base_gfn + hva - slot.hva)
        if flush:
            self.kvm_flush_remote_tlbs()

    def invalidate_range_end(self) -> None:
        self.mmu_invalidate_seq += 1
        self.mmu_invalidate_in_progress -= 1

    def mmu_invalidate_retry_gfn(self, mmu_seq: int, hva: int) -> bool:
        if self.mmu_invalidate_in_progress:
            lo, hi = self.mmu_invalidate_range
            if lo <= hva < hi:
                return True
        return self.mmu_invalidate_seq != mmu_seq

    # ------------------------------------------------------------------ memslots

    def kvm_arch_prepare_memory_region(self, new: Memslot) -> None:
        self.slot_arch[new] = SlotArch()

    def kvm_arch_free_memslot(self, old: Memslot) -> None:
        arch = self.slot_arch.pop(old)
        if any(arch.rmap.values()) or any(arch.write_track.values()):
            raise ModelError(f"memslot {old} freed while sptes or write tracks remain")


def kvm_mmu_child_role(parent: ShadowPage, index: int, direct: bool, access: int) -> int:
    """kvm_mmu_child_role(): the parent's role one level down, with the given access; a
    4-byte-gpte child (a guest PT) takes quadrant = low bit of the parent spte index (VA
    bit 21), since one 4 MiB guest PT is shadowed by two 2 MiB shadow PTs."""
    role = with_direct(with_access(with_level(parent.role, parent.level - 1), access), direct)
    if parent.has_4_byte_gpte:
        role = with_quadrant(role, index & 1)
    return role


def _no_sync(kvm: KvmMmu, vcpu: Vcpu, sp: ShadowPage, i: int) -> int:
    raise ModelError(f"{sp!r} is unsync, but nothing can sync it")


def _sptep_key(sptep: Sptep) -> tuple[int, int]:
    return (sptep[0].hpfn, sptep[1])
