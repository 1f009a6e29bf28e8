"""The guest walk as the guest sees it through the shadow MMU (docs/model.md §3 walk, §4 fault):
A/D bits set only on success, the dirty-bit trick, U/S, R/W with CR0.WP=1 and the CR0.WP=0
kernel-page conversion, NX with EFER.NXE, SMEP, SMAP with EFLAGS.AC, and the #PF error codes."""

from __future__ import annotations

import pytest
from guest import AD, LONG_PD, LONG_PT, PW, PWU, Guest, long_mode_guest, map4k, pa

from fuzzmmu.arch.bits import (
    CR4_SMAP,
    CR4_SMEP,
    EFER_NXE,
    PFERR_FETCH,
    PFERR_P,
    PFERR_RSVD,
    PFERR_U,
    PFERR_W,
    PTE_A,
    PTE_D,
    PTE_NX,
    PTE_PS,
    PTE_U,
)
from fuzzmmu.model.mmu import spte as S

DATA = 20  # a data frame


def _upper(g: Guest) -> list[int]:
    return [g.peek(pa(f)) for f in (2, 3, 4)]


# ---------------------------------------------------------------------- A/D bits


def test_accessed_bits_only_on_successful_walk():
    g = long_mode_guest(upper=PWU)  # upper entries without A
    va = map4k(g, 0, 7, DATA, PW)  # supervisor page, A=0, D=0
    # a user read fails the permission check: no A bit anywhere
    g.pf(g.read(0, va, cpl=3), va, PFERR_P | PFERR_U)
    assert not any(e & PTE_A for e in _upper(g))
    assert not g.peek(pa(LONG_PT, 7 * 8)) & (PTE_A | PTE_D)
    # a failed write (not-present leaf elsewhere) sets nothing either
    g.pf(g.write(0, 8 << 12, 1), 8 << 12, PFERR_W)
    assert not any(e & PTE_A for e in _upper(g))
    # the supervisor read succeeds: A on every level, no D
    g.ram(g.read(0, va), pa(DATA))
    assert all(e & PTE_A for e in _upper(g))
    assert g.peek(pa(LONG_PT, 7 * 8)) & (PTE_A | PTE_D) == PTE_A
    assert not any(e & PTE_D for e in _upper(g))
    # a write sets D on the leaf only
    g.ram(g.write(0, va, 5), pa(DATA))
    assert g.peek(pa(LONG_PT, 7 * 8)) & (PTE_A | PTE_D) == PTE_A | PTE_D
    assert not any(e & PTE_D for e in _upper(g))


def test_dirty_bit_trick_read_only_spte_then_upgrade():
    g = long_mode_guest()
    va = map4k(g, 0, 7, DATA, PW | PTE_A)  # writable, clean
    g.ram(g.read(0, va), pa(DATA))
    sp, i, _level = g.path(0, va)[-1]
    spte = sp.sptv[i]
    assert S.spte_pfn(spte) == DATA
    assert not spte & (S.SPTE_W | S.SPTE_MMU_WRITABLE), "clean gpte must give a read-only spte"
    assert not g.peek(pa(LONG_PT, 7 * 8)) & PTE_D
    # first write: faults, the walk sets D, the same spte becomes writable
    g.ram(g.write(0, va, 0xD1), pa(DATA))
    assert g.peek(pa(LONG_PT, 7 * 8)) & PTE_D
    sp2, i2, _level = g.path(0, va)[-1]
    assert (sp2, i2) == (sp, i)
    assert sp.sptv[i] & S.SPTE_W and sp.sptv[i] & S.SPTE_D
    assert g.peek(pa(DATA)) == 0xD1
    # a second write does not fault into KVM: the spte is unchanged
    before = sp.sptv[i]
    g.ram(g.write(0, va, 0xD2), pa(DATA))
    assert sp.sptv[i] == before


def test_dirty_bit_trick_on_large_page_drops_read_only_direct_page():
    """validate_direct_spte: a direct page made for a clean 2 MiB gpte is read-only; once the
    guest page is dirty it must not be reused (it is unlinked and a writable one built)."""
    g = long_mode_guest()
    g.pte(0, LONG_PD, 1, pa(0) | PW | PTE_PS)  # clean 2 MiB page at gpa 0, A=0
    va = (1 << 21) + pa(DATA, 8)
    g.ram(g.read(0, va), pa(DATA, 8))
    assert g.peek(pa(LONG_PD, 8)) & (PTE_A | PTE_D) == PTE_A
    ro = g.leaf_sp(0, va)
    assert ro.direct and not ro.access & 2  # ACC_W
    assert not g.leaf(0, va) & S.SPTE_W
    g.ram(g.write(0, va, 3), pa(DATA, 8))
    assert g.peek(pa(LONG_PD, 8)) & PTE_D
    rw = g.leaf_sp(0, va)
    assert rw is not ro and rw.direct and rw.access & 2
    assert g.leaf(0, va) & S.SPTE_W
    assert not ro.parent_ptes, "the read-only direct page must be unlinked"


# ---------------------------------------------------------------------- U/S and R/W


def test_user_supervisor_and_error_codes():
    g = long_mode_guest()
    sup = map4k(g, 0, 1, DATA, PW | AD)
    usr_ro = map4k(g, 0, 2, DATA + 1, PTE_U | 1 | AD)
    # not present: P=0, with W/U from the access
    g.pf(g.read(0, 9 << 12), 9 << 12, 0)
    g.pf(g.write(0, 9 << 12, 1, cpl=3), 9 << 12, PFERR_W | PFERR_U)
    # user access to a supervisor page
    g.pf(g.read(0, sup, cpl=3), sup, PFERR_P | PFERR_U)
    g.pf(g.write(0, sup, 1, cpl=3), sup, PFERR_P | PFERR_W | PFERR_U)
    g.ram(g.read(0, sup), pa(DATA))
    # read-only user page, CR0.WP=1: writes fault for both CPLs
    g.ram(g.read(0, usr_ro, cpl=3), pa(DATA + 1))
    g.pf(g.write(0, usr_ro, 1, cpl=3), usr_ro, PFERR_P | PFERR_W | PFERR_U)
    g.pf(g.write(0, usr_ro, 1), usr_ro, PFERR_P | PFERR_W)
    assert g.peek(pa(DATA + 1)) == 0
    # an upper-level entry without U or W restricts the whole subtree
    g.pte(0, LONG_PD, 0, pa(LONG_PT) | PW | PTE_A)  # PDE: supervisor
    g.invlpg(0, usr_ro)
    g.pf(g.read(0, usr_ro, cpl=3), usr_ro, PFERR_P | PFERR_U)


def test_cr0_wp0_conversion_kernel_page_and_back():
    g = long_mode_guest(wp=False)
    va = map4k(g, 0, 3, DATA, PTE_U | 1 | AD)  # user, read-only
    # supervisor write with WP=0 succeeds: the spte becomes a writable kernel page
    g.ram(g.write(0, va, 0x55), pa(DATA))
    assert g.peek(pa(DATA)) == 0x55
    spte = g.leaf(0, va)
    assert spte & S.SPTE_W and not spte & S.SPTE_U
    # the guest gpte is unchanged (still read-only, D was already set)
    assert g.peek(pa(LONG_PT, 3 * 8)) == pa(DATA) | PTE_U | 1 | AD
    # a user write still faults
    g.pf(g.write(0, va, 1, cpl=3), va, PFERR_P | PFERR_W | PFERR_U)
    # a user read maps it back as a user, read-only page
    g.ram(g.read(0, va, cpl=3), pa(DATA))
    spte = g.leaf(0, va)
    assert spte & S.SPTE_U and not spte & S.SPTE_W
    # and the next supervisor write converts it again
    g.ram(g.write(0, va, 0x66), pa(DATA))
    spte = g.leaf(0, va)
    assert spte & S.SPTE_W and not spte & S.SPTE_U
    assert g.peek(pa(DATA)) == 0x66


def test_cr0_wp_change_uses_other_shadow_pages():
    """Pages built with WP=0 (with converted kernel sptes) are not reused under WP=1."""
    g = long_mode_guest(wp=False)
    va = map4k(g, 0, 3, DATA, PTE_U | 1 | AD)
    g.ram(g.write(0, va, 0x55), pa(DATA))
    wp0_leaf = g.leaf_sp(0, va)
    cr0 = g.m.vcpus[0].cr0
    g.expect_done(g.cr0(0, cr0 | (1 << 16)))
    g.pf(g.write(0, va, 1), va, PFERR_P | PFERR_W)
    assert g.leaf_sp(0, va) is not wp0_leaf
    assert g.peek(pa(DATA)) == 0x55


def test_cr0_wp0_conversion_with_smep_removes_exec():
    g = long_mode_guest(wp=False, cr4=CR4_SMEP)
    va = map4k(g, 0, 3, DATA, PTE_U | 1 | AD)
    g.ram(g.write(0, va, 0x55), pa(DATA))
    spte = g.leaf(0, va)
    assert spte & S.SPTE_W and not spte & S.SPTE_U and spte & S.SPTE_NX
    # the guest still sees a user page: a supervisor fetch is an SMEP fault
    g.pf(g.fetch(0, va), va, PFERR_P | PFERR_FETCH)
    # a user fetch is allowed by the guest tables
    g.ram(g.fetch(0, va, cpl=3), pa(DATA))


# ---------------------------------------------------------------------- NX, SMEP, SMAP


def test_nx_with_efer_nxe():
    g = long_mode_guest(efer=EFER_NXE)
    nx = map4k(g, 0, 4, DATA, PWU | AD | PTE_NX)
    x = map4k(g, 0, 5, DATA + 1, PWU | AD)
    g.ram(g.read(0, nx), pa(DATA))
    g.pf(g.fetch(0, nx), nx, PFERR_P | PFERR_FETCH)
    g.pf(g.fetch(0, nx, cpl=3), nx, PFERR_P | PFERR_FETCH | PFERR_U)
    g.ram(g.fetch(0, x), pa(DATA + 1))
    assert g.leaf(0, nx) & S.SPTE_NX
    # NX on an upper level applies to the whole subtree
    g.pte(0, LONG_PD, 0, pa(LONG_PT) | PWU | PTE_A | PTE_NX)
    g.invlpg(0, x)
    g.pf(g.fetch(0, x), x, PFERR_P | PFERR_FETCH)
    # a not-present fetch carries I/D too (EFER.NXE)
    g.pf(g.fetch(0, 9 << 12), 9 << 12, PFERR_FETCH)


def test_nx_bit_without_nxe_is_reserved():
    g = long_mode_guest()
    va = map4k(g, 0, 4, DATA, PWU | AD | PTE_NX)
    g.pf(g.read(0, va), va, PFERR_RSVD | PFERR_P)
    # no I/D bit in the error code without NXE/SMEP
    g.pf(g.fetch(0, va), va, PFERR_RSVD | PFERR_P)
    # not-present fetch without NXE: no I/D
    g.pf(g.fetch(0, 9 << 12), 9 << 12, 0)


def test_nx_toggle_does_not_reuse_pages_of_the_other_setting():
    g = long_mode_guest(efer=EFER_NXE)
    va = map4k(g, 0, 4, DATA, PWU | AD | PTE_NX)
    g.ram(g.read(0, va), pa(DATA))
    efer = g.m.vcpus[0].efer
    g.expect_done(g.efer(0, efer & ~EFER_NXE))
    g.pf(g.read(0, va), va, PFERR_RSVD | PFERR_P)


def test_smep():
    g = long_mode_guest(cr4=CR4_SMEP)
    usr = map4k(g, 0, 4, DATA, PWU | AD)
    sup = map4k(g, 0, 5, DATA + 1, PW | AD)
    g.pf(g.fetch(0, usr), usr, PFERR_P | PFERR_FETCH)
    g.ram(g.fetch(0, usr, cpl=3), pa(DATA))
    g.ram(g.fetch(0, sup), pa(DATA + 1))
    # data accesses to user pages are fine for the supervisor under SMEP alone
    g.ram(g.read(0, usr), pa(DATA))
    g.ram(g.write(0, usr, 1), pa(DATA))


@pytest.mark.parametrize("kind", ["read", "write"])
def test_smap_and_eflags_ac(kind: str):
    g = long_mode_guest(cr4=CR4_SMAP)
    usr = map4k(g, 0, 4, DATA, PWU | AD)
    code = PFERR_P | (PFERR_W if kind == "write" else 0)

    def go(ac: bool):
        if kind == "read":
            return g.read(0, usr, ac=ac)
        return g.write(0, usr, 7, ac=ac)

    g.pf(go(False), usr, code)
    g.ram(go(True), pa(DATA))
    g.pf(go(False), usr, code)  # a translation cached with AC=1 does not leak to AC=0
    g.ram(g.read(0, usr, cpl=3), pa(DATA))
    # SMAP never blocks fetches: SMEP does
    g.ram(g.fetch(0, usr), pa(DATA))


def test_smap_role_bit_separates_wp0_converted_pages():
    """A page converted under WP=0 with SMAP off (U cleared) must not be reused once SMAP is
    on (smap_andnot_wp)."""
    g = long_mode_guest(wp=False)
    va = map4k(g, 0, 3, DATA, PTE_U | 1 | AD)
    g.ram(g.write(0, va, 0x55), pa(DATA))
    cr4 = g.m.vcpus[0].cr4
    g.expect_done(g.cr4(0, cr4 | CR4_SMAP))
    g.pf(g.write(0, va, 0x77), va, PFERR_P | PFERR_W)
    g.pf(g.read(0, va), va, PFERR_P)
    assert g.peek(pa(DATA)) == 0x55


def test_smap_wp0_conversion_with_ac_does_not_leak_to_ac0_accesses():
    g = long_mode_guest(wp=False, cr4=CR4_SMAP)
    va = map4k(g, 0, 3, DATA, PTE_U | 1 | AD)  # user, read-only
    g.ram(g.write(0, va, 0x55, ac=True), pa(DATA))  # allowed: WP=0 and AC=1
    g.pf(g.read(0, va), va, PFERR_P)  # SMAP, AC=0
    g.pf(g.write(0, va, 0x66), va, PFERR_P | PFERR_W)
    assert g.peek(pa(DATA)) == 0x55
