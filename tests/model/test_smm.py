"""SMM (docs/model.md §10, §5 SMM): SMM has its own roots and shadow pages (role.smm) and address
space (SMRAM at gfns 48-55), SMI and RSM reset the MMU context, RSM reloads PAE PDPTEs, and a
guest page table is write-protected in both address spaces, so an SMM store to a non-SMM page
table is intercepted (0f38453cdb2e)."""

from __future__ import annotations

from guest import AD, LONG_PD, LONG_PT, PAE, PW, PWU, Guest, long_mode_guest, map4k, pa

from fuzzmmu.model.mmu import spte as S
from fuzzmmu.model.mmu.context import INVALID_PAGE
from fuzzmmu.world.layout import SMRAM_HVA
from fuzzmmu.world.observe import ObsKind

DATA = 20


def test_smm_address_space_and_roots():
    g = long_mode_guest()
    va = map4k(g, 0, 1, DATA, PW | AD)
    g.ram(g.read(0, va), pa(DATA))
    normal_root = g.roots(0)[0]
    assert normal_root.root_count == 1
    g.expect_done(g.smi(0))
    # SMI: paging off, CR4/EFER cleared; the old root is released
    assert g.m.regs(0)[4] == 1
    assert normal_root.root_count == 0
    obs = g.read(0, pa(48, 8))  # SMRAM is RAM in SMM (host pages 64..71)
    assert obs.kind is ObsKind.RAM and obs.addr == pa(SMRAM_HVA, 8)
    roots = g.roots(0)
    assert roots and all(sp.smm == 1 and sp.direct for sp in roots)
    # vCPU 1, outside SMM, sees the MMIO hole at the same gpa
    g.expect_done(g.cr0(1, 1))
    assert g.read(1, pa(48, 8)).kind is ObsKind.MMIO
    # RSM: back to 4-level paging with the normal root (found again in the hash)
    g.expect_done(g.rsm(0))
    assert g.m.regs(0)[4] == 0
    g.ram(g.read(0, va), pa(DATA))
    assert g.roots(0) == [normal_root]
    assert all(sp.smm == 0 for sp in g.roots(0))
    assert g.rsm(0).kind is ObsKind.UD


def test_smm_store_to_non_smm_page_table_is_intercepted():
    g = long_mode_guest()
    va = map4k(g, 0, 1, DATA, PW | AD)
    g.ram(g.read(0, va), pa(DATA))
    g.expect_done(g.smi(1))
    # vCPU 1 in SMM (paging off) rewrites gpte 1 of the PT: the store must be emulated so
    # that vCPU 0's spte for it is zapped
    g.ok(g.write(1, pa(LONG_PT, 8), pa(DATA + 1) | PW | AD))
    assert g.writable_sptes(LONG_PT) == []
    assert not g.leaf(0, va) & S.SPTE_MMU_PRESENT
    g.ram(g.read(0, va), pa(DATA + 1))
    # an upper-level table (write-tracked in address space 0) too
    va2 = 1 << 21  # PDE 1, not present yet
    g.pf(g.read(0, va2), va2, 0)
    g.ok(g.write(1, pa(LONG_PD, 8), pa(LONG_PT) | PWU | AD))
    assert g.writable_sptes(LONG_PD) == []
    g.ram(g.read(0, va2 + (1 << 12)), pa(DATA + 1))


def test_shadowing_write_protects_both_address_spaces():
    """vCPU 1 (SMM) holds a writable mapping of a frame; vCPU 0 then starts using the frame as
    a page table: the SMM spte must lose W and vCPU 1's next store must be intercepted."""
    g = long_mode_guest()
    g.expect_done(g.smi(1))
    table = 7
    g.ok(g.write(1, pa(table, 8), 0))
    smm_spte = g.leaf(1, pa(table))
    assert smm_spte & S.SPTE_W
    # vCPU 0: PDE 1 -> PT in frame 7, entry 1 -> DATA
    g.pte(0, LONG_PD, 1, pa(table) | PWU | AD)
    g.pte(0, table, 1, pa(DATA) | PW | AD)
    va = (1 << 21) | (1 << 12)
    g.ram(g.read(0, va), pa(DATA))
    assert g.sps(table, level=1, smm=0)
    assert not g.leaf(1, pa(table)) & S.SPTE_W, "SMM spte still writable"
    assert g.writable_sptes(table) == []
    # vCPU 1's store is intercepted and zaps vCPU 0's spte
    g.ok(g.write(1, pa(table, 8), pa(DATA + 2) | PW | AD))
    g.ram(g.read(0, va), pa(DATA + 2))


def test_smm_guest_tables_are_separate_shadow_pages():
    """The same guest tables used in and out of SMM get pages of different roles, and a store
    from outside SMM zaps the SMM page's spte too (gfn lookups span both spaces)."""
    g = long_mode_guest()
    va = map4k(g, 0, 1, DATA, PW | AD)
    g.ram(g.read(0, va), pa(DATA))
    g.expect_done(g.smi(1))
    long_mode_guest(v=1, guest=g)  # vCPU 1 turns on the same 4-level paging inside SMM
    g.ram(g.read(1, va), pa(DATA))
    pts = g.sps(LONG_PT, level=1)
    assert sorted(sp.smm for sp in pts) == [0, 1]
    smm_leaf = g.leaf_sp(1, va)
    assert smm_leaf.smm == 1
    g.pte(0, LONG_PT, 1, pa(DATA + 3) | PW | AD)
    assert not g.leaf(1, va) & S.SPTE_MMU_PRESENT
    g.ram(g.read(1, va), pa(DATA + 3))
    g.ram(g.read(0, va), pa(DATA + 3))


def test_rsm_reloads_pae_pdptes():
    g = Guest()
    # PAE: PDPT 4 (PDPTE 0 -> PD 5 -> PT 6 -> frame 11), alternative PD 7 -> PT 8 -> frame 12
    g.pte(0, 4, 0, pa(5) | 1)
    g.pte(0, 5, 0, pa(6) | PWU)
    g.pte(0, 6, 1, pa(11) | PWU | AD)
    g.pte(0, 7, 0, pa(8) | PWU)
    g.pte(0, 8, 1, pa(12) | PWU | AD)
    g.paging(0, PAE, 4)
    g.ram(g.read(0, 1 << 12), pa(11))
    pae_roots = g.roots(0)
    g.expect_done(g.smi(0))
    assert all(sp.root_count == 0 for sp in pae_roots)
    g.ok(g.write(0, pa(4), pa(7) | 1))  # SMM handler edits PDPTE 0 in memory
    g.expect_done(g.rsm(0))
    assert g.m.vcpus[0].mmu.pdptrs[0] == pa(7) | 1
    g.ram(g.read(0, 1 << 12), pa(12))
    assert [sp.gfn for sp in g.roots(0)] == [7, 62]


def test_smi_and_rsm_reset_the_mmu_context():
    g = long_mode_guest()
    va = map4k(g, 0, 1, DATA, PW | AD)
    g.ram(g.read(0, va), pa(DATA))
    vcpu = g.m.vcpus[0]
    role_before = vcpu.mmu.root_role
    g.expect_done(g.smi(0))
    assert vcpu.mmu.root_hpa == INVALID_PAGE  # roots unloaded until the next entry
    assert vcpu.mmu.cpu_role is not None and not vcpu.mmu.cpu_role.pg
    assert vcpu.mmu.root_role >> 24 == 1
    g.expect_done(g.rsm(0))
    assert vcpu.mmu.root_role == role_before
    # the translation made before SMI still works and is rebuilt from the hash
    g.ram(g.read(0, va), pa(DATA))
