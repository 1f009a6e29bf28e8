"""Prefetch on the fault path (docs/model.md §4 Prefetch): FNAME(pte_prefetch) maps the aligned
group of 8 neighbouring gptes (present, accessed, not reserved; stopping at the first that
cannot be prefetched), prefetched sptes carry no A bit; direct pages use __direct_pte_prefetch."""

from __future__ import annotations

from guest import AD, LONG_PD, LONG_PT, PW, Guest, long_mode_guest, map4k, pa

from fuzzmmu.arch.bits import PTE_A, PTE_PS
from fuzzmmu.model.bugs import BugSet
from fuzzmmu.model.machine import Machine
from fuzzmmu.model.mmu import spte as S
from fuzzmmu.world.memslots import MemslotChange, MemslotUpdate
from fuzzmmu.world.observe import ObsKind

DATA = 20


def test_indirect_prefetch_of_accessed_neighbours():
    g = long_mode_guest()
    # group 0..7 of PT 5: A set on 0, 2 (clean) and 4; none on 3
    map4k(g, 0, 0, DATA, PW | AD)
    va1 = map4k(g, 0, 1, DATA + 1, PW | AD)
    map4k(g, 0, 2, DATA + 2, PW | PTE_A)
    map4k(g, 0, 3, DATA + 3, PW)
    map4k(g, 0, 4, DATA + 4, PW | AD)
    g.ram(g.read(0, va1), pa(DATA + 1))
    sp = g.leaf_sp(0, va1)
    assert sp.gfn == LONG_PT
    s0, s1, s2, s3, s4 = (int(sp.sptv[i]) for i in range(5))
    assert S.spte_pfn(s0) == DATA and s0 & S.SPTE_MMU_PRESENT and not s0 & S.SPTE_A
    assert s0 & S.SPTE_W  # dirty gpte, gfn not shadowed
    assert s1 & S.SPTE_A  # the faulting one
    assert S.spte_pfn(s2) == DATA + 2 and not s2 & S.SPTE_W  # clean: read-only
    assert not s3 and not s4, "prefetch stops at the first gpte without A"
    # the prefetched translations are right, and the guest's A/D bits follow real accesses
    g.ram(g.write(0, 2 << 12, 1), pa(DATA + 2))
    assert g.peek(pa(LONG_PT, 2 * 8)) & (PTE_A | (1 << 6)) == PTE_A | (1 << 6)


def test_indirect_prefetch_stops_at_mmio_gfn():
    g = long_mode_guest()
    map4k(g, 0, 0, 50, PW | AD)  # MMIO hole
    va1 = map4k(g, 0, 1, DATA + 1, PW | AD)
    map4k(g, 0, 2, DATA + 2, PW | AD)
    g.ram(g.read(0, 2 << 12), pa(DATA + 2))  # fault on 2: 0 is tried first and stops it
    sp = g.leaf_sp(0, va1)
    assert not sp.sptv[0] and not sp.sptv[1]
    assert g.read(0, 0).kind is ObsKind.MMIO


def test_direct_prefetch_in_large_page():
    g = long_mode_guest()
    g.pte(0, LONG_PD, 1, pa(0) | PW | AD | PTE_PS)
    va = (1 << 21) + pa(9)
    g.ram(g.read(0, va), pa(9))
    sp = g.leaf_sp(0, va)
    assert sp.direct
    for i in range(8, 16):
        spte = int(sp.sptv[i])
        assert spte & S.SPTE_MMU_PRESENT and S.spte_pfn(spte) == i
        assert bool(spte & S.SPTE_A) == (i == 9)
    assert not sp.sptv[7] and not sp.sptv[16]


def test_direct_prefetch_stops_at_slot_end_in_the_world():
    """Paging off: the group 40..47 ends at the MMIO hole; 48..55 is never prefetched."""
    g = Guest()
    g.ok(g.read(0, pa(41)))
    sp = g.leaf_sp(0, pa(41))
    assert all(sp.sptv[i] & S.SPTE_MMU_PRESENT for i in range(40, 48))
    assert not any(sp.sptv[i] for i in range(48, 56))


def test_direct_prefetch_run_past_slot_end_prefetches_nothing():
    g = Guest()
    g.expect_done(g.set_memslot(MemslotUpdate(MemslotChange.CREATE, 0, 2, 97, 2, 64)))
    obs = g.read(0, pa(96))  # MMIO; then the run 97..103 starts in the 2-page slot
    assert obs.kind is ObsKind.MMIO
    sp = g.leaf_sp(0, pa(96))
    assert not sp.sptv[97] and not sp.sptv[98]


def test_stale_gpte_mutant_faults_through_existing_pt_without_crashing():
    bugs = BugSet(["stale-gpte-revalidation-skipped"])
    g = long_mode_guest(guest=Guest(Machine(bugs=bugs), audit=False))
    va1 = map4k(g, 0, 1, DATA, PW | AD)
    va2 = map4k(g, 0, 2, DATA + 1, PW | AD)
    g.ram(g.read(0, va1), pa(DATA))  # creates PT 5's shadow page
    g.invlpg(0, va2)
    g.pte(0, LONG_PT, 2, pa(DATA + 2) | PW | AD)
    g.ram(g.read(0, va2), pa(DATA + 2))  # through the existing page
