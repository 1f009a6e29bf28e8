"""The VM-wide shadow MMU state and the shadow-page life cycle (KVM's mmu.c and page_track.c).

Lookup by (gfn, role) through a gfn-keyed hash that sees every role and both address spaces;
creation accounts the page (write tracking, write protection); linking keeps parent_ptes; leaf
sptes are kept in per-memslot rmaps; zapping unlinks children and parents and defers freeing
to a commit that flushes remote TLBs first. Function names are KVM's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from fuzzmmu.model.bugs import BugSet
from fuzzmmu.model.mmu import spte as S
from fuzzmmu.model.mmu.internal import MmuConfig, ModelError, Point
from fuzzmmu.model.mmu.page import ShadowPage
from fuzzmmu.model.mmu.role import INVALID, with_access, with_direct, with_level, with_quadrant
from fuzzmmu.model.mmu.stats import MmuStats
from fuzzmmu.model.mmu.trace import Event

if TYPE_CHECKING:
    from fuzzmmu.model.x86 import Vcpu
    from fuzzmmu.world.memslots import Memslot, Memslots

Sptep = tuple[ShadowPage, int]

KVM_MIN_FREE_MMU_PAGES = 5
KVM_REFILL_PAGES = 25
SP_HPFN_BASE = 0x100000  # host frames of shadow page tables, far from guest RAM frames


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
        for slot in memslots.all_slots():
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
        """link_shadow_page(): install the non-leaf spte and record the parent link."""
        psp, i = parent
        if psp.sptv[i] & S.SPTE_MMU_PRESENT:  # only a large leaf can be here: drop it
            self.drop_spte(psp, i)
            self.kvm_flush_remote_tlbs()
        psp.sptv[i] = S.make_nonleaf_spte(child.hpfn)
        child.parent_ptes.add(parent)

    # ------------------------------------------------------------------ get / create

    def kvm_mmu_find_shadow_page(self, gfn: int, role: int) -> ShadowPage | None:
        for sp in self.page_hash.get(gfn, ()):
            if self.is_obsolete_sp(sp):
                continue
            if sp.role != role:
                continue
            # unsync pages and write flooding only concern indirect pages; unsync is not
            # modelled yet, so a found indirect page is in sync.
            if not sp.direct:
                sp.write_flooding_count = 0
            return sp
        return None

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

    def kvm_mmu_get_shadow_page(self, gfn: int, role: int) -> ShadowPage:
        sp = self.kvm_mmu_find_shadow_page(gfn, role)
        self.created_last = sp is None
        if sp is None:
            self.stat.mmu_cache_miss += 1
            sp = self.kvm_mmu_alloc_shadow_page(gfn, role)
        return sp

    def kvm_mmu_get_child_sp(self, parent: Sptep, gfn: int, direct: bool, access: int
                             ) -> ShadowPage | None:
        """kvm_mmu_get_child_sp(): None stands for -EEXIST (a present non-leaf is reused as
        is, without re-checking its role)."""
        psp, i = parent
        spte = psp.sptv[i]
        if spte & S.SPTE_MMU_PRESENT and not spte & S.SPTE_PS:
            return None
        return self.kvm_mmu_get_shadow_page(gfn, kvm_mmu_child_role(psp, i, direct, access))

    # ------------------------------------------------------------------ zapping

    def kvm_mmu_prepare_zap_page(self, sp: ShadowPage, invalid_list: list[ShadowPage]) -> bool:
        """__kvm_mmu_prepare_zap_page(); returns whether the active list changed beyond sp."""
        self.emit("zap_sp", sp)
        self.stat.mmu_shadow_zapped += 1
        zapped_children = False
        for i in np.flatnonzero(sp.spt).tolist():
            zapped_children |= self.mmu_page_zap_pte(sp, i)
        for parent in sorted(sp.parent_ptes, key=_sptep_key):
            self.drop_parent_pte(sp, parent)
        if not sp.invalid and sp.has_gptes():
            self.unaccount_shadowed(sp)
        sp.unsync = False
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


def _sptep_key(sptep: Sptep) -> tuple[int, int]:
    return (sptep[0].hpfn, sptep[1])
