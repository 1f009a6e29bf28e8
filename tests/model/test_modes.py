"""Every guest paging mode through the shadow MMU (docs/model.md §2 roots, §3 walk, §4 fetch):
paging off, 32-bit with 4 KiB and 4 MiB (PSE) pages, PAE from the PDPTRs cached at CR3 load,
4-level with 2 MiB and 1 GiB pages shadowed by direct pages of 4 KiB sptes."""

from __future__ import annotations

from guest import AD, BIT32, LONG4, PAE, PW, PWU, Guest, pa

from fuzzmmu.arch.bits import PFERR_P, PFERR_RSVD, PTE_A, PTE_PS
from fuzzmmu.model.mmu import spte as S
from fuzzmmu.world.observe import ObsKind, mmio_read_value


def test_paging_off_is_identity_through_direct_roots():
    g = Guest()
    g.ok(g.write(0, pa(5, 0x18), 0x1122334455667788))
    obs = g.read(0, pa(5, 0x18))
    g.ram(obs, pa(5, 0x18))
    assert obs.value == 0x1122334455667788
    # nonpaging: four direct level-2 roots of 1 GiB each, gfn i << 18 (mmu_alloc_direct_roots)
    roots = g.roots(0)
    assert [sp.gfn for sp in roots] == [0, 1 << 18, 2 << 18, 3 << 18]
    assert all(sp.direct and sp.level == 2 for sp in roots)
    leaf_sp = g.leaf_sp(0, pa(5))
    assert leaf_sp.direct and leaf_sp.level == 1 and leaf_sp.gfn == 0
    assert S.spte_pfn(g.leaf(0, pa(5))) == 5
    # nothing is shadowed, nothing write-tracked
    assert g.kvm.indirect_shadow_pages == 0
    # the MMIO hole is an exit to the VMM
    obs = g.read(0, pa(50, 0x10), width=4)
    assert obs.kind is ObsKind.MMIO and obs.addr == pa(50, 0x10)
    assert obs.value == mmio_read_value(pa(50, 0x10), 4)


def test_32bit_4k_pages_and_quadrants():
    g = Guest()
    g.paging(0, BIT32, 2)
    # PDE 1 (VA 4 MiB..8 MiB) -> PT in frame 3; PTE 5 -> frame 10, PTE 600 -> frame 11
    g.pte(0, 2, 1, pa(3) | PWU)
    g.pte(0, 3, 5, pa(10) | PWU | AD)
    g.pte(0, 3, 600, pa(11) | PWU | AD)
    g.poke(pa(10, 0x10), 0xAAAA)
    g.poke(pa(11, 0x20), 0xBBBB)
    va_lo = (1 << 22) | (5 << 12) | 0x10
    va_hi = (1 << 22) | (600 << 12) | 0x20
    obs = g.read(0, va_lo)
    g.ram(obs, pa(10, 0x10))
    assert obs.value == 0xAAAA
    obs = g.read(0, va_hi)
    g.ram(obs, pa(11, 0x20))
    assert obs.value == 0xBBBB
    # the guest PD is shadowed by four level-2 roots (quadrants 0..3, all gfn 2)
    roots = g.roots(0)
    assert [(sp.gfn, sp.quadrant, sp.level) for sp in roots] == [(2, q, 2) for q in range(4)]
    assert all(sp.has_4_byte_gpte and not sp.direct for sp in roots)
    # the guest PT (4 MiB) is shadowed by two 2 MiB level-1 pages, quadrant = VA bit 21
    pts = g.sps(3, level=1)
    assert sorted(sp.quadrant for sp in pts) == [0, 1]
    assert g.leaf_sp(0, va_lo).quadrant == 0
    assert g.leaf_sp(0, va_hi).quadrant == 1
    # guest PTE 600 lives in quadrant 1 at spte 600 - 512
    path = g.path(0, va_hi)
    assert path[-1][1] == 600 - 512
    # guest PDE 1 is shadowed by shadow PDEs 2 and 3 of quadrant 0: VA bit 21 chose 2 or 3
    assert (path[0][0].quadrant, path[0][1]) == (0, 3)
    assert (g.path(0, va_lo)[0][1]) == 2
    # A/D: the walk set A on the PDE it used
    assert g.peek(pa(2, 4), 4) & PTE_A


def test_32bit_pse_4m_page_is_two_direct_halves():
    g = Guest()
    g.paging(0, BIT32, 2, pse=True)
    # PDE 2: a 4 MiB page at gpa 0 (VA 8 MiB..12 MiB)
    g.pte(0, 2, 2, pa(0) | PWU | AD | PTE_PS)
    g.poke(pa(7, 0x30), 0x7777)
    va = (2 << 22) + pa(7, 0x30)
    obs = g.read(0, va)
    g.ram(obs, pa(7, 0x30))
    assert obs.value == 0x7777
    # the upper 2 MiB half maps gfn 0x200 + n: not RAM, an MMIO exit at the right gpa
    obs = g.read(0, va + (1 << 21), width=4)
    assert obs.kind is ObsKind.MMIO and obs.addr == (1 << 21) + pa(7, 0x30)
    # each half is its own direct level-1 page with 4K sptes, with quadrant = VA bit 21
    lo, hi = g.leaf_sp(0, va), g.leaf_sp(0, va + (1 << 21))
    assert lo.direct and hi.direct and lo.level == hi.level == 1
    assert (lo.gfn, lo.quadrant) == (0, 0)
    assert (hi.gfn, hi.quadrant) == (0x200, 1)
    assert lo.has_4_byte_gpte and hi.has_4_byte_gpte
    # they hang off shadow PDEs 4 and 5 of the quadrant-0 root
    assert g.path(0, va)[0][1] == 4 and g.path(0, va + (1 << 21))[0][1] == 5
    spte = g.leaf(0, va)
    assert S.spte_pfn(spte) == 7 and not spte & S.SPTE_PS
    # without CR4.PSE the same PDE points at a page table (frame 0) instead
    g2 = Guest()
    g2.paging(0, BIT32, 2, pse=False)
    g2.pte(0, 2, 2, pa(0) | PWU | AD | PTE_PS)
    g2.poke(pa(0, 7 * 4), pa(9) | PWU | AD, 4)  # entry 7 of the "PT" in frame 0
    g2.ram(g2.read(0, (2 << 22) + pa(7, 0x30)), pa(9, 0x30))


def test_32bit_pse36_and_reserved_pde_bits():
    """PSE-36: PDE bits 13..16 are gpa bits 32..35 (KVM assumes PSE-36); bits 17..21 of a
    4 MiB PDE are reserved."""
    g = Guest()
    g.paging(0, BIT32, 2, pse=True)
    g.pte(0, 2, 2, pa(0) | PWU | AD | PTE_PS | (1 << 13))
    obs = g.read(0, (2 << 22) + pa(7, 8), width=4)
    assert obs.kind is ObsKind.MMIO and obs.addr == (1 << 32) + pa(7, 8)
    g.pte(0, 2, 3, pa(0) | PWU | PTE_PS | (1 << 17))  # A=0
    va = (3 << 22) + pa(7, 8)
    g.pf(g.read(0, va, width=4), va, PFERR_RSVD | PFERR_P)
    assert not g.peek(pa(2, 3 * 4), 4) & PTE_A, "no A bit on a failing walk"


def _pae_tables(g: Guest) -> None:
    """With paging off: PDPT in frame 4 (PDPTE 0 -> PD 5, PDE 0 -> PT 6, PTE 1 -> frame 11), an
    alternative PD 7 (PDE 0 -> PT 8, PTE 1 -> frame 12)."""
    g.pte(0, 4, 0, pa(5) | 1)
    g.pte(0, 5, 0, pa(6) | PWU)
    g.pte(0, 6, 1, pa(11) | PWU | AD)
    g.pte(0, 7, 0, pa(8) | PWU)
    g.pte(0, 8, 1, pa(12) | PWU | AD)
    g.poke(pa(11), 0x1111)
    g.poke(pa(12), 0x2222)


def test_pae_uses_pdptrs_cached_at_cr3_load():
    g = Guest()
    _pae_tables(g)
    g.paging(0, PAE, 4)
    va = 1 << 12
    obs = g.read(0, va)
    g.ram(obs, pa(11))
    assert obs.value == 0x1111
    # PDPTEs take no part in A/D: the PDPTE in memory is untouched, the PDE got A
    assert g.peek(pa(4)) == pa(5) | 1
    assert g.peek(pa(5)) & PTE_A
    # roots: one level-2 page per present PDPTE (0 and the direct map's 3), quadrant 0
    assert [(sp.gfn, sp.level, sp.quadrant) for sp in g.roots(0)] == [(5, 2, 0), (62, 2, 0)]
    assert g.m.vcpus[0].mmu.pae_root[1] == 0 and g.m.vcpus[0].mmu.pae_root[2] == 0
    # the guest redirects PDPTE 0 in memory: no effect until the next CR3 load
    g.pte(0, 4, 0, pa(7) | 1)
    g.invlpg(0, va)
    obs = g.read(0, va)
    g.ram(obs, pa(11))
    assert obs.value == 0x1111
    assert g.m.vcpus[0].mmu.pdptrs[0] == pa(5) | 1
    # reloading CR3 (same value) reloads the PDPTRs
    g.expect_done(g.cr3(0, pa(4)))
    obs = g.read(0, va)
    g.ram(obs, pa(12))
    assert obs.value == 0x2222
    assert [sp.gfn for sp in g.roots(0)] == [7, 62]
    # a not-present PDPTE makes its 1 GiB fault (P=0), with no root behind it
    g.pf(g.read(0, 2 << 30), 2 << 30, 0)
    # the PDPT itself is not shadowed: nothing write-tracks frame 4
    assert g.sps(4) == []


def test_pae_reserved_pdpte_is_gp_at_cr3_load():
    g = Guest()
    _pae_tables(g)
    g.paging(0, PAE, 4)
    g.pte(0, 4, 1, pa(5) | 1 | (1 << 5))  # bit 5 is reserved in a PAE PDPTE
    assert g.cr3(0, pa(4)).kind is ObsKind.GP
    # CR3 is unchanged and the old PDPTRs still work
    g.ram(g.read(0, 1 << 12), pa(11))


def _long_tables(g: Guest) -> None:
    """4-level, root 2: PML4E 0 -> PDPT 3; PDPTE 0 -> PD 4; PDE 1: 2 MiB page at gpa 0;
    PDE 2 -> PT 5 (4K); PDPTE 1: 1 GiB page at gpa 0."""
    g.pte(0, 2, 0, pa(3) | PWU | PTE_A)
    g.pte(0, 3, 0, pa(4) | PWU | PTE_A)
    g.pte(0, 4, 1, pa(0) | PWU | AD | PTE_PS)
    g.pte(0, 4, 2, pa(5) | PWU | PTE_A)
    g.pte(0, 5, 3, pa(13) | PWU | AD)
    g.pte(0, 3, 1, pa(0) | PWU | AD | PTE_PS)


def test_4level_4k_2m_and_1g_pages():
    g = Guest()
    g.paging(0, LONG4, 2)
    _long_tables(g)
    g.poke(pa(9, 0x40), 0x9999)
    g.poke(pa(13, 0x8), 0x1313)
    # 4 KiB
    va_4k = (2 << 21) | (3 << 12) | 0x8
    obs = g.read(0, va_4k)
    g.ram(obs, pa(13, 0x8))
    assert obs.value == 0x1313
    pt = g.leaf_sp(0, va_4k)
    assert not pt.direct and pt.gfn == 5 and pt.level == 1
    # 2 MiB: split into a direct level-1 page of 4K sptes (gfn = 2 MiB-aligned frame)
    va_2m = (1 << 21) + pa(9, 0x40)
    obs = g.read(0, va_2m)
    g.ram(obs, pa(9, 0x40))
    assert obs.value == 0x9999
    path = g.path(0, va_2m)
    assert [(sp.level, sp.direct, sp.gfn) for sp, _i, _l in path] == [
        (4, False, 2), (3, False, 3), (2, False, 4), (1, True, 0)]
    spte = g.leaf(0, va_2m)
    assert S.spte_pfn(spte) == 9 and not spte & S.SPTE_PS
    # 1 GiB: a direct level-2 page, then a direct level-1 page
    va_1g = (1 << 30) + pa(9, 0x40)
    obs = g.read(0, va_1g)
    g.ram(obs, pa(9, 0x40))
    path = g.path(0, va_1g)
    assert [(sp.level, sp.direct, sp.gfn) for sp, _i, _l in path] == [
        (4, False, 2), (3, False, 3), (2, True, 0), (1, True, 0)]
    assert S.spte_pfn(g.leaf(0, va_1g)) == 9
    # inside the 1 GiB page beyond RAM: MMIO
    obs = g.read(0, (1 << 30) + (5 << 21), width=2)
    assert obs.kind is ObsKind.MMIO and obs.addr == 5 << 21
    # write tracking: upper-level guest tables (PML4, PDPT, PD) are tracked, the PT is not
    assert [g.write_track(f) for f in (2, 3, 4, 5)] == [1, 1, 1, 0]
    # every shadowed table is write-protected
    for f in (2, 3, 4, 5):
        assert g.writable_sptes(f) == []


def test_4level_large_page_covering_its_own_tables_is_still_write_protected():
    """The 2 MiB guest page at gpa 0 maps the guest's own page tables (frames 2-5): the direct
    sptes for those frames must be read-only, and a store through it is emulated."""
    g = Guest()
    g.paging(0, LONG4, 2)
    _long_tables(g)
    g.read(0, (2 << 21) | (3 << 12))  # shadow PT 5
    va = (1 << 21) + pa(5, 3 * 8)  # PTE 3 of PT 5 through the 2 MiB page
    obs = g.write(0, va, pa(14) | PWU | AD)
    g.ram(obs, pa(5, 3 * 8))
    assert g.writable_sptes(5) == []
    # the shadow spte of the old PTE was zapped by the emulated write: the new one is used
    g.ram(g.read(0, (2 << 21) | (3 << 12)), pa(14))
    # a plain data frame in the same 2 MiB page is writable
    g.ok(g.write(0, (1 << 21) + pa(20), 1))
    assert S.SPTE_W & g.leaf(0, (1 << 21) + pa(20))


def test_switching_modes_keeps_shadow_pages_for_reuse():
    """A mode change resets the MMU context but does not zap: pages of the old role stay in
    the hash and are found again when the role recurs (docs/model.md §2 mode changes)."""
    g = Guest()
    g.paging(0, BIT32, 2)
    g.pte(0, 2, 1, pa(3) | PW)
    g.pte(0, 3, 5, pa(10) | PW | AD)
    g.ram(g.read(0, (1 << 22) | (5 << 12)), pa(10))
    before = {sp.hpfn for sp in g.sps(3, level=1)}
    g.expect_done(g.cr0(0, 1))  # paging off
    assert {sp.hpfn for sp in g.sps(3, level=1)} == before
    g.expect_done(g.cr0(0, 1 | (1 << 31) | (1 << 16)))
    g.ram(g.read(0, (1 << 22) | (5 << 12)), pa(10))
    assert {sp.hpfn for sp in g.sps(3, level=1)} == before


def test_cr3_switch_reuses_cached_roots():
    """fast_pgd_switch: 4-level roots are kept in prev_roots and found again by (pgd, role)."""
    g = Guest()
    g.paging(0, LONG4, 2)
    _long_tables(g)
    # a second root in frame 6 sharing the PDPT
    g.pte(0, 6, 511, g.peek(pa(2, 511 * 8)))
    g.pte(0, 6, 0, pa(3) | PWU | PTE_A)
    va = (2 << 21) | (3 << 12)
    g.ram(g.read(0, va), pa(13))
    root_a = g.roots(0)[0]
    g.expect_done(g.cr3(0, pa(6)))
    g.ram(g.read(0, va), pa(13))
    root_b = g.roots(0)[0]
    assert root_b is not root_a and root_b.gfn == 6
    assert root_a.root_count == 1  # held by prev_roots
    g.expect_done(g.cr3(0, pa(2)))
    assert g.roots(0) == [root_a]
    assert root_b.root_count == 1
    g.ram(g.read(0, va), pa(13))
    # the PDPT below both roots is one shadow page with two parents
    pdpt = g.sps(3, level=3)
    assert len(pdpt) == 1 and len(pdpt[0].parent_ptes) == 2


def test_cr3_outside_memslots_gets_dummy_root_until_memslot_appears():
    """A root gfn without a memslot gets a dummy root; every access faults (the walk cannot
    read the root table). Once a memslot makes the gfn RAM, the root is rebuilt."""
    from fuzzmmu.model.mmu.context import DUMMY_ROOT
    from fuzzmmu.world.memslots import MemslotChange, MemslotUpdate

    g = Guest()
    # the guest's root table in gfn 50 (MMIO hole); the host page behind the future memslot
    # (host page 66, SMRAM's in address space 1) already holds it
    g.poke(pa(50), pa(3) | PWU | PTE_A, as_id=1)
    g.pte(0, 3, 0, pa(4) | PWU | PTE_A)
    g.pte(0, 4, 2, pa(5) | PWU | PTE_A)
    g.pte(0, 5, 3, pa(13) | PWU | AD)
    g.paging(0, LONG4, 50, link=False)
    va = (2 << 21) | (3 << 12)
    g.pf(g.read(0, va), va, 0)
    assert g.m.vcpus[0].mmu.root_hpa == DUMMY_ROOT
    assert g.sps(50) == []
    g.expect_done(g.set_memslot(MemslotUpdate(MemslotChange.CREATE, 0, 2, 48, 8, 64)))
    g.ram(g.read(0, va), pa(13))
    assert [sp.gfn for sp in g.roots(0)] == [50]
