"""Emulated guest stores to write-protected page tables (docs/model.md §6, kvm_mmu_track_write): the
written sptes are zapped; a misaligned store zaps the whole shadow page (a 1-byte aligned one
does not); a 32-bit PDE store zaps both shadow PDEs; write flooding zaps upper-level pages."""

from __future__ import annotations

import pytest
from guest import AD, BIT32, LONG_PD, LONG_PT, PW, PWU, Guest, long_mode_guest, map4k, pa

from fuzzmmu.arch.bits import PTE_A
from fuzzmmu.model.mmu import spte as S

DATA = 20


def _shadowed_pt(g: Guest) -> tuple[int, int, int]:
    """Map PT entries 1, 2 and 7 and fault all three in; return their VAs."""
    vas = [map4k(g, 0, i, DATA + i, PW | AD) for i in (1, 2, 7)]
    for i, va in zip((1, 2, 7), vas, strict=True):
        g.ram(g.read(0, va), pa(DATA + i))
    return vas[0], vas[1], vas[2]


def _present(g: Guest, va: int) -> bool:
    return bool(g.leaf(0, va) & S.SPTE_MMU_PRESENT)


@pytest.mark.parametrize(("offset", "width", "why"), [
    (1 * 8 + 4, 8, "8-byte store at offset 4 of a gpte, across gptes 1 and 2"),
    (1 * 8 + 6, 4, "4-byte store across gptes 1 and 2"),
    (1 * 8, 2, "2-byte store (shorter than a gpte fragment)"),
    (1 * 8 + 3, 1, "1-byte store not at the start of a gpte"),
])
def test_misaligned_store_zaps_whole_shadow_page(offset: int, width: int, why: str):
    g = long_mode_guest()
    va1, va2, va7 = _shadowed_pt(g)
    pt_sp = g.leaf_sp(0, va7)
    assert pt_sp.gfn == LONG_PT
    # store back the bytes that are there: the guest tables do not change
    gpa = pa(LONG_PT, offset)
    g.pte(0, LONG_PT, 0, g.peek(gpa, width), width, byte_offset=offset)
    assert pt_sp.invalid, f"{why}: the shadow page must be zapped"
    assert pt_sp not in g.sps(LONG_PT)
    assert not _present(g, va7), "an unrelated spte of the zapped page is gone too"
    # everything is rebuilt on demand
    for i, va in ((1, va1), (2, va2), (7, va7)):
        g.ram(g.read(0, va), pa(DATA + i))
    assert g.leaf_sp(0, va7) is not pt_sp


def test_one_byte_aligned_store_zaps_only_that_spte():
    """Linux's clear_bit() on a gpte is an `andb` on its first byte: not misaligned."""
    g = long_mode_guest()
    va1, va2, va7 = _shadowed_pt(g)
    pt_sp = g.leaf_sp(0, va7)
    low = g.peek(pa(LONG_PT, 1 * 8), 1)
    g.pte(0, LONG_PT, 1, low & ~PTE_A, 1)  # clear A of gpte 1
    assert not pt_sp.invalid
    assert pt_sp in g.sps(LONG_PT)
    assert not _present(g, va1)
    assert _present(g, va2) and _present(g, va7)
    # the next access re-walks and sets A again
    g.ram(g.read(0, va1), pa(DATA + 1))
    assert g.peek(pa(LONG_PT, 8)) & PTE_A


@pytest.mark.parametrize(("offset", "width"), [(2 * 8, 8), (2 * 8, 4), (2 * 8 + 4, 4)])
def test_aligned_store_zaps_only_the_written_spte(offset: int, width: int):
    g = long_mode_guest()
    va1, va2, va7 = _shadowed_pt(g)
    pt_sp = g.leaf_sp(0, va7)
    g.pte(0, LONG_PT, 0, g.peek(pa(LONG_PT, offset), width), width, byte_offset=offset)
    assert not pt_sp.invalid
    assert not _present(g, va2)
    assert _present(g, va1) and _present(g, va7)


def test_store_changing_a_gpte_is_seen_at_once():
    g = long_mode_guest()
    _va1, va2, _va7 = _shadowed_pt(g)
    g.pte(0, LONG_PT, 2, pa(DATA + 10) | PW | AD)
    g.ram(g.read(0, va2), pa(DATA + 10))
    g.pte(0, LONG_PT, 2, 0)
    g.pf(g.read(0, va2), va2, 0)


def test_32bit_misaligned_store_zaps_page():
    g = Guest()
    g.paging(0, BIT32, 2)
    g.pte(0, 2, 1, pa(3) | PWU)
    g.pte(0, 3, 5, pa(10) | PWU | AD)
    g.pte(0, 3, 6, pa(11) | PWU | AD)
    va5, va6 = (1 << 22) | (5 << 12), (1 << 22) | (6 << 12)
    g.ram(g.read(0, va5), pa(10))
    g.ram(g.read(0, va6), pa(11))
    pt_sp = g.leaf_sp(0, va5)
    g.pte(0, 3, 5, g.peek(pa(3, 5 * 4 + 2), 4), 4, byte_offset=2)  # across gptes 5 and 6
    assert pt_sp.invalid
    g.ram(g.read(0, va6), pa(11))


def test_32bit_pde_store_zaps_both_shadow_pdes():
    g = Guest()
    g.paging(0, BIT32, 2)
    # PDE 257 (quadrant 1, shadow PDEs 2 and 3) and PDE 1 (quadrant 0, the same indices)
    for pde in (1, 257):
        g.pte(0, 2, pde, pa(3) | PWU)
    g.pte(0, 3, 5, pa(10) | PWU | AD)
    g.pte(0, 3, 512 + 5, pa(11) | PWU | AD)
    g.pte(0, 6, 5, pa(12) | PWU | AD)
    g.pte(0, 6, 512 + 5, pa(13) | PWU | AD)
    lo = (257 << 22) | (5 << 12)
    hi = lo | (1 << 21)
    q0_lo, q0_hi = (1 << 22) | (5 << 12), (1 << 22) | (1 << 21) | (5 << 12)
    for va, frame in ((lo, 10), (hi, 11), (q0_lo, 10), (q0_hi, 11)):
        g.ram(g.read(0, va), pa(frame))
    roots = g.roots(0)
    assert roots[1].quadrant == 1
    assert roots[1].sptv[2] & S.SPTE_MMU_PRESENT and roots[1].sptv[3] & S.SPTE_MMU_PRESENT
    # the guest moves PDE 257 to the PT in frame 6
    g.pte(0, 2, 257, pa(6) | PWU)
    assert not roots[1].sptv[2] & S.SPTE_MMU_PRESENT, "shadow PDE 2*(257%256) not zapped"
    assert not roots[1].sptv[3] & S.SPTE_MMU_PRESENT, "shadow PDE 2*(257%256)+1 not zapped"
    # the other quadrants' pages are untouched
    assert roots[0].sptv[2] & S.SPTE_MMU_PRESENT and roots[0].sptv[3] & S.SPTE_MMU_PRESENT
    # both halves follow the new PDE
    g.ram(g.read(0, lo), pa(12))
    g.ram(g.read(0, hi), pa(13))
    g.ram(g.read(0, q0_lo), pa(10))
    g.ram(g.read(0, q0_hi), pa(11))


def test_32bit_pt_store_zaps_spte_in_its_quadrant_only():
    g = Guest()
    g.paging(0, BIT32, 2)
    g.pte(0, 2, 1, pa(3) | PWU)
    g.pte(0, 3, 5, pa(10) | PWU | AD)
    g.pte(0, 3, 512 + 5, pa(11) | PWU | AD)
    lo, hi = (1 << 22) | (5 << 12), (1 << 22) | ((512 + 5) << 12)
    g.ram(g.read(0, lo), pa(10))
    g.ram(g.read(0, hi), pa(11))
    g.pte(0, 3, 512 + 5, pa(12) | PWU | AD)
    assert g.leaf(0, lo) & S.SPTE_MMU_PRESENT, "the alias in the other quadrant was zapped"
    assert not g.leaf(0, hi) & S.SPTE_MMU_PRESENT
    g.ram(g.read(0, hi), pa(12))


# ---------------------------------------------------------------------- write flooding


def test_write_flooding_zaps_upper_level_page():
    g = long_mode_guest()
    va = map4k(g, 0, 1, DATA, PW | AD)
    g.ram(g.read(0, va), pa(DATA))
    pd_sp = g.sps(LONG_PD, level=2)[0]
    assert pd_sp.write_flooding_count == 0
    for n, idx in enumerate((100, 101), start=1):
        g.pte(0, LONG_PD, idx, 0)
        assert pd_sp.write_flooding_count == n and not pd_sp.invalid
    g.pte(0, LONG_PD, 102, 0)
    assert pd_sp.invalid, "third emulated write without a fault walk must zap the PD page"
    assert g.write_track(LONG_PD) == 0
    # the guest still works
    g.ram(g.read(0, va), pa(DATA))
    assert g.write_track(LONG_PD) == 1


def test_fault_walk_resets_the_flood_count():
    g = long_mode_guest()
    vas = [map4k(g, 0, i, DATA + i, PW | AD) for i in range(1, 5)]
    g.ram(g.read(0, vas[0]), pa(DATA + 1))
    pd_sp = g.sps(LONG_PD, level=2)[0]
    for k in range(3):
        g.pte(0, LONG_PD, 100 + k, 0)
        g.pte(0, LONG_PD, 200 + k, 0)
        assert pd_sp.write_flooding_count == 2
        g.ram(g.read(0, vas[k + 1]), pa(DATA + k + 2))  # a fault walk through the PD
        assert pd_sp.write_flooding_count == 0
    assert not pd_sp.invalid


def test_level1_pages_are_exempt_from_flooding():
    g = long_mode_guest()
    va = map4k(g, 0, 1, DATA, PW | AD)
    g.ram(g.read(0, va), pa(DATA))
    pt_sp = g.leaf_sp(0, va)
    for k in range(6):
        g.pte(0, LONG_PT, 300 + k, 0)
    assert not pt_sp.invalid
    assert g.leaf(0, va) & S.SPTE_MMU_PRESENT
