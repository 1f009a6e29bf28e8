"""Zapping and limits (docs/model.md §9): kvm_mmu_zap_all_fast with roots in use (invalid roots are
kept until the last vCPU releases them), the shrinker, KVM_SET_NR_MMU_PAGES with many shadow
pages, and memslot delete/move (everything zapped; a deleted slot's gfns become MMIO)."""

from __future__ import annotations

from guest import AD, LONG_PD, PW, PWU, Guest, long_mode_guest, map4k, pa

from fuzzmmu.arch.bits import PTE_A
from fuzzmmu.model.mmu import spte as S
from fuzzmmu.world.memslots import MemslotChange, MemslotUpdate
from fuzzmmu.world.observe import ObsKind

DATA = 40
N_TABLES = 24  # PTs in frames 6..29, PDE k -> PT 6+k, PT entry 0 -> DATA


def _many_tables(g: Guest) -> list[int]:
    vas = []
    for k in range(N_TABLES):
        g.pte(0, LONG_PD, k, pa(6 + k) | PWU | PTE_A)
        g.pte(0, 6 + k, 0, pa(DATA) | PW | AD)
        vas.append(k << 21)
    return vas


def _two_vcpus() -> Guest:
    g = long_mode_guest()
    long_mode_guest(v=1, guest=g)
    return g


def test_zap_all_keeps_invalid_roots_until_released():
    g = _two_vcpus()
    va = map4k(g, 0, 1, DATA, PW | AD)
    for v in (0, 1):
        g.ram(g.read(v, va), pa(DATA))
    root = g.roots(0)[0]
    assert g.roots(1) == [root] and root.root_count == 2
    others = [sp for sp in g.sps() if sp is not root and not sp.root_count]
    used = g.kvm.n_used_mmu_pages
    g.expect_done(g.zap_all())
    # the root is invalid and empty, but still allocated; everything else is freed
    assert root.invalid and root.root_count == 2
    assert root.hpfn in g.kvm.sp_by_hpfn
    assert not any(root.sptv[i] for i in range(512))
    assert root not in g.kvm.active_mmu_pages
    assert all(sp.hpfn not in g.kvm.sp_by_hpfn for sp in others)
    roots_in_use = sum(1 for sp in g.kvm.sp_by_hpfn.values() if sp.root_count)
    assert g.kvm.n_used_mmu_pages == roots_in_use < used
    assert g.sps() == []  # nothing is visible to lookups
    # every vCPU's TLB was flushed; both have a request to drop obsolete roots
    assert all(not c.tlb for c in g.m.vcpus)
    assert all("free_obsolete_roots" in c.requests for c in g.m.vcpus)
    # vCPU 0 re-enters: it drops its reference and builds a new root
    g.ram(g.read(0, va), pa(DATA))
    assert root.root_count == 1 and root.hpfn in g.kvm.sp_by_hpfn
    new_root = g.roots(0)[0]
    assert new_root is not root and not new_root.invalid
    # vCPU 1 re-enters: the last reference goes and the invalid root is freed
    g.ram(g.read(1, va), pa(DATA))
    assert root.root_count == 0 and root.hpfn not in g.kvm.sp_by_hpfn
    assert g.roots(1) == [new_root]
    assert g.kvm.n_used_mmu_pages == len(g.kvm.sp_by_hpfn)


def test_zap_all_with_guest_paging_off_and_pae_roots():
    g = Guest()
    g.ok(g.read(0, pa(3)))
    roots = g.roots(0)
    g.expect_done(g.zap_all())
    assert all(sp.invalid for sp in roots)
    g.ok(g.read(0, pa(3)))
    assert all(sp.hpfn not in g.kvm.sp_by_hpfn for sp in roots)
    assert not any(sp.invalid for sp in g.roots(0))


def test_shrink_zaps_oldest_non_root_pages():
    g = long_mode_guest()
    vas = _many_tables(g)
    for va in vas:
        g.ram(g.read(0, va), pa(DATA))
    before = g.sps()
    used = g.kvm.n_used_mmu_pages
    assert used == len(before) > N_TABLES
    roots = g.roots(0)
    g.expect_done(g.shrink(10))
    assert g.kvm.n_used_mmu_pages == used - 10
    zapped = [sp for sp in before if sp.invalid]
    assert len(zapped) == 10
    assert not any(sp.invalid for sp in roots)
    # the oldest go first (FIFO of creation), skipping roots
    candidates = [sp for sp in g.kvm.active_mmu_pages if not sp.root_count]
    assert all(z.hpfn < c.hpfn for z in zapped for c in candidates)
    # write tracking follows
    for sp in zapped:
        if sp.level > 1 and not sp.direct:
            assert g.write_track(sp.gfn) == sum(
                1 for o in g.sps(sp.gfn) if o.level > 1 and not o.direct)
    for va in vas:
        g.ram(g.read(0, va), pa(DATA))


def test_small_page_limit_recycles_pages():
    g = _two_vcpus()
    vas = _many_tables(g)
    for va in vas:
        g.ram(g.read(0, va), pa(DATA))
    assert g.kvm.n_used_mmu_pages > 16
    g.expect_done(g.set_max_pages(16))
    assert g.kvm.n_used_mmu_pages <= 16
    assert g.set_max_pages(8).kind is ObsKind.REJECTED
    for rnd in range(3):
        for k, va in enumerate(vas):
            v = (rnd + k) % 2
            obs = g.write(v, va + 8 * k, k) if k % 3 == 0 else g.read(v, va + 8 * k)
            g.ram(obs, pa(DATA, 8 * k))
            # soft limit: make_mmu_pages_available() keeps a few pages free before a fault
            assert g.kvm.n_used_mmu_pages <= 16 + 4, g.kvm.n_used_mmu_pages
    for k in range(N_TABLES):
        if k % 3 == 0:
            assert g.peek(pa(DATA, 8 * k)) == k
    # tables still in use stay write-protected
    for sp in g.sps():
        if not sp.direct:
            assert g.writable_sptes(sp.gfn) == []


def test_memslot_delete_zaps_everything_and_gfns_become_mmio():
    g = _two_vcpus()
    g.expect_done(g.set_memslot(MemslotUpdate(MemslotChange.CREATE, 0, 2, 48, 2, 64)))
    va = map4k(g, 0, 1, 48, PW | AD)
    data = map4k(g, 0, 2, DATA, PW | AD)
    g.ram(g.write(0, va, 0x48), pa(48))
    g.ram(g.read(1, data), pa(DATA))
    before = g.sps()
    g.expect_done(g.set_memslot(MemslotUpdate(MemslotChange.DELETE, 0, 2)))
    assert all(g.kvm.is_obsolete_sp(sp) for sp in before)
    assert g.sps() == []
    obs = g.read(0, va, width=4)
    assert obs.kind is ObsKind.MMIO and obs.addr == pa(48)
    assert S.is_mmio_spte(g.leaf(0, va))
    g.ram(g.read(1, data), pa(DATA))
    g.ram(g.read(0, data), pa(DATA))


def test_memslot_move_zaps_everything_and_moves_contents():
    g = long_mode_guest()
    g.expect_done(g.set_memslot(MemslotUpdate(MemslotChange.CREATE, 0, 2, 48, 2, 64)))
    va = map4k(g, 0, 1, 48, PW | AD)
    g.ram(g.write(0, va + 8, 0x4848), pa(48, 8))
    before = g.sps()
    g.expect_done(g.set_memslot(MemslotUpdate(MemslotChange.MOVE, 0, 2, 100)))
    assert all(g.kvm.is_obsolete_sp(sp) for sp in before)
    obs = g.read(0, va + 8, width=4)
    assert obs.kind is ObsKind.MMIO and obs.addr == pa(48, 8)
    moved = map4k(g, 0, 3, 100, PW | AD)
    obs = g.read(0, moved + 8)
    g.ram(obs, pa(100, 8))
    assert obs.value == 0x4848


def test_memslot_delete_of_a_page_table_slot():
    """The guest's page table lives in a slot that is deleted: everything is zapped and the
    walk through the now unbacked table faults (not-present #PF, KVM's choice)."""
    g = long_mode_guest()
    g.expect_done(g.set_memslot(MemslotUpdate(MemslotChange.CREATE, 0, 2, 48, 2, 64)))
    g.pte(0, LONG_PD, 1, pa(48) | PWU | PTE_A)
    g.pte(0, 48, 3, pa(DATA) | PW | AD)
    va = (1 << 21) | (3 << 12)
    g.ram(g.read(0, va), pa(DATA))
    assert g.sps(48, level=1)
    g.expect_done(g.set_memslot(MemslotUpdate(MemslotChange.DELETE, 0, 2)))
    assert g.sps(48) == []
    g.pf(g.read(0, va), va, 0)
    assert g.kvm.indirect_shadow_pages == len(
        [sp for sp in g.sps() if not sp.direct])


def test_memslot_move_to_same_base_is_a_no_op():
    """__kvm_set_memory_region() returns 0 without doing anything for a "move" to the slot's
    current base gfn (same npages and flags). (Regression: the model once zapped, and lost the
    slot's rmaps because the old and new Memslot compared equal.)"""
    g = Guest()
    g.expect_done(g.set_memslot(MemslotUpdate(MemslotChange.CREATE, 0, 2, 100, 2, 64)))
    g.ok(g.write(0, pa(100, 8), 0x64))
    before = g.sps()
    g.expect_done(g.set_memslot(MemslotUpdate(MemslotChange.MOVE, 0, 2, 100)))
    slot = g.m.phys.slots.lookup(0, 100)
    assert slot in g.kvm.slot_arch, "the slot lost its rmaps and write-track counters"
    obs = g.read(0, pa(100, 8))
    g.ram(obs, pa(100, 8))
    assert obs.value == 0x64
    g.ram(g.read(0, pa(101)), pa(101))
    assert not any(g.kvm.is_obsolete_sp(sp) for sp in before), "KVM changes nothing"
