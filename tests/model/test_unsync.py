"""Unsync shadow pages (docs/model.md §7): with unsync pages on, a writable mapping of a
shadowed leaf table lets the guest edit it without an exit; the shadow keeps the old
translation until the guest invalidates it (INVLPG syncs that one spte, a CR3 load or guest
TLB flush syncs the whole page and write-protects it again). Upper-level tables never go
unsync; neither does a table only prefetched into a writable mapping."""

from __future__ import annotations

from guest import AD, LONG_PD, LONG_PT, LONG_ROOT, PW, PWU, Guest, long_mode_guest, map4k, pa

from fuzzmmu.arch.bits import CR4_PGE, PTE_A, PTE_P
from fuzzmmu.model.bugs import BugSet
from fuzzmmu.model.machine import Machine
from fuzzmmu.model.mmu.context import is_unsync_root
from fuzzmmu.model.mmu.internal import MmuConfig

UNSYNC = MmuConfig(unsync=True)
OLD, NEW = 20, 30


def _stale_after_store(g: Guest) -> int:
    """Map VA 0x1000 -> OLD through PT 5 and use it; rewrite the gpte -> NEW by a store."""
    va = map4k(g, 0, 1, OLD, PW | AD)
    g.ram(g.read(0, va), pa(OLD))
    g.pte(0, LONG_PT, 1, pa(NEW) | PW | AD)
    return va


def test_without_unsync_a_store_to_a_shadowed_table_is_intercepted() -> None:
    g = long_mode_guest()
    va = _stale_after_store(g)
    assert not any(sp.unsync for sp in g.sps(LONG_PT))
    assert g.kvm.stat.mmu_unsync == 0
    g.ram(g.read(0, va), pa(NEW))  # the emulated store zapped the spte


def test_a_store_to_an_unsync_table_leaves_the_old_translation_until_invlpg() -> None:
    g = long_mode_guest(config=UNSYNC)
    va = _stale_after_store(g)
    (sp,) = g.sps(LONG_PT, level=1)
    assert sp.unsync and g.kvm.stat.mmu_unsync == 1
    assert g.writable_sptes(LONG_PT)  # the table is mapped writable: no exit on the store
    g.ram(g.read(0, va), pa(OLD))  # stale, as a TLB may be (SDM §4.10.4.3)
    g.expect_done(g.invlpg(0, va))
    g.ram(g.read(0, va), pa(NEW))
    assert sp.unsync  # INVLPG syncs the one spte; the page stays unsync


def test_a_cr3_load_syncs_the_page_and_write_protects_it_again() -> None:
    g = long_mode_guest(config=UNSYNC)
    va = _stale_after_store(g)
    (sp,) = g.sps(LONG_PT, level=1)
    cr3 = g.m.vcpus[0].cr3
    g.expect_done(g.cr3(0, cr3))
    g.ram(g.read(0, va), pa(NEW))
    assert not sp.unsync and g.kvm.stat.mmu_unsync == 0
    assert g.writable_sptes(LONG_PT) == []
    # and every parent on the way forgot it: no unsync children left
    assert all(not p.unsync_children for p in g.sps())


def test_upper_level_tables_stay_write_protected() -> None:
    g = long_mode_guest(config=UNSYNC)
    va = map4k(g, 0, 1, OLD, PW | AD)
    g.ram(g.read(0, va), pa(OLD))
    g.pte(0, LONG_PD, 1, pa(LONG_PT) | PWU | PTE_A)  # a store to the PD: emulated
    assert not any(sp.unsync for sp in g.sps(LONG_PD))
    assert g.writable_sptes(LONG_PD) == []
    assert g.write_track(LONG_PD) == 1


def test_a_new_upper_level_page_zaps_the_unsync_page_of_its_gfn() -> None:
    g = long_mode_guest(config=UNSYNC)
    _stale_after_store(g)
    (sp,) = g.sps(LONG_PT, level=1)
    assert sp.unsync
    # Frame 5 becomes a page directory too: PDPTE 1 -> frame 5 (its entry 1 points at OLD,
    # not a table: use entry 0 -> PT 5 ... the walk just needs a level-2 page of gfn 5).
    g.pte(0, LONG_PT, 0, pa(LONG_PT) | PWU | PTE_A)
    g.pte(0, 3, 1, pa(LONG_PT) | PWU | PTE_A)
    g.read(0, 1 << 30)  # walks PDPTE 1 -> "PD" 5 -> entry 0 -> "PT" 5 -> entry 0
    assert sp not in g.sps(LONG_PT)  # zapped
    assert g.sps(LONG_PT, level=2)


def _link_unsync_scenario(bugs: BugSet) -> tuple[Guest, int]:
    """The scenario of 65855ed8b034: PD 4 -> PT 5, PT 5 goes unsync and gpte 2 changes
    without a flush; then a not-present PDPTE is made to point at PD 4 (no flush needed for
    that) and the new path is used: first through gpte 1 (the fault links PD 4), then gpte 2,
    which the linked page already maps."""
    g = long_mode_guest(Machine(UNSYNC, bugs))
    for index in (1, 2):
        g.ram(g.read(0, map4k(g, 0, index, OLD, PW | AD)), pa(OLD))
    g.pte(0, LONG_PT, 2, pa(NEW) | PW | AD)
    assert g.sps(LONG_PT, level=1)[0].unsync
    g.pte(0, 3, 1, pa(LONG_PD) | PWU | PTE_A)  # PDPTE 1 -> PD 4: a second way to PT 5
    g.ram(g.read(0, (1 << 30) | 0x1000), pa(OLD))
    return g, (1 << 30) | 0x2000


def test_a_table_with_unsync_children_is_synced_before_it_is_linked() -> None:
    g, va2 = _link_unsync_scenario(BugSet())
    g.ram(g.read(0, va2), pa(NEW))


def test_link_unsync_sp_without_sync_mutant_shows_the_stale_translation() -> None:
    g, va2 = _link_unsync_scenario(BugSet(["link-unsync-sp-without-sync"]))
    g.ram(g.read(0, va2), pa(OLD))


def _not_present_pf_scenario(bugs: BugSet) -> tuple[Guest, int]:
    """A read-only mapping goes stale in an unsync page (its gpte cleared); a write faults
    (the spte is read-only), KVM's walk finds the gpte not present and injects #PF(W)."""
    g = Guest(Machine(UNSYNC, bugs))
    long_mode_guest(guest=g)
    va = map4k(g, 0, 1, OLD, PTE_P | PTE_A)
    g.ram(g.read(0, va), pa(OLD))
    map4k(g, 0, 2, OLD, PW | AD)  # gfn 5 goes unsync through this store
    assert g.sps(LONG_PT, level=1)[0].unsync
    g.pte(0, LONG_PT, 1, 0)
    g.pf(g.write(0, va, 1), va, 0x2)
    return g, va


def test_an_injected_not_present_fault_invalidates_the_address() -> None:
    g, va = _not_present_pf_scenario(BugSet())
    g.pf(g.read(0, va), va, 0)  # SDM §4.10.4.1: the #PF dropped the translation


def test_not_present_pf_keeps_unsync_spte_mutant_reads_through_it() -> None:
    g, va = _not_present_pf_scenario(BugSet(["kvm.not-present-pf-keeps-unsync-spte"]))
    g.ram(g.read(0, va), pa(OLD))


def test_root_level_store_of_an_unsync_guest_is_emulated() -> None:
    g = long_mode_guest(config=UNSYNC)
    g.pte(0, LONG_ROOT, 1, 0)
    assert g.write_track(LONG_ROOT) == 1
    assert not any(sp.unsync for sp in g.sps())


def test_a_guest_tlb_flush_syncs_the_page_and_frees_cached_unsync_roots() -> None:
    g = long_mode_guest(config=UNSYNC)
    va = _stale_after_store(g)
    (sp,) = g.sps(LONG_PT, level=1)
    c = g.m.vcpus[0]
    g.expect_done(g.cr4(0, c.cr4 | CR4_PGE))  # toggling PGE flushes the guest's TLB
    g.ram(g.read(0, va), pa(NEW))
    assert not sp.unsync
    assert all(not is_unsync_root(g.kvm, hpa) for _pgd, hpa in c.mmu.prev_roots)
