"""The structural audit (fuzzmmu.oracle.audit): clean on every state the model reaches in
realistic guest/VMM scenarios, and each invariant reported exactly when the state is corrupted
in the way it forbids."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import replace

import numpy as np
import pytest
from auditworld import (
    BIG,
    BIG32,
    BIT32,
    DATA,
    LEAF,
    LONG4,
    MMIO_GFN,
    PAE,
    PAE_PDPT,
    PAE_PT,
    PD,
    PD32,
    PDPT,
    PML4,
    PML4_B,
    PT,
    PT32,
    PWUA,
    Driver,
    R,
    W,
    X,
    bit32_entries,
    build_all_tables,
    dm,
    enter_32bit,
    enter_long4,
    enter_pae,
    long4_entries,
    pae_entries,
    to_real_mode,
    user_va,
)

from fuzzmmu.arch.bits import ACC_U, ACC_W, ACC_X, CR0_WP, PTE_D, PTE_P, PTE_PS, PTE_U, PTE_W
from fuzzmmu.model.bugs import BugSet
from fuzzmmu.model.hardware import walk_shadow_tables
from fuzzmmu.model.machine import Machine
from fuzzmmu.model.mmu import spte as S
from fuzzmmu.model.mmu.context import INVALID_PAGE, PAE_ROOT
from fuzzmmu.model.mmu.internal import MmuConfig
from fuzzmmu.model.mmu.mmu import SlotArch
from fuzzmmu.model.mmu.page import ShadowPage
from fuzzmmu.model.mmu.role import with_access, with_quadrant
from fuzzmmu.oracle.audit import AuditViolation, audit
from fuzzmmu.world.layout import DM_PD64, DM_PT64
from fuzzmmu.world.memslots import Memslot, MemslotChange, MemslotUpdate
from fuzzmmu.world.observe import ObsKind

RAM, MMIO, PF = ObsKind.RAM, ObsKind.MMIO, ObsKind.PF


# ---------------------------------------------------------------------- helpers


def sps(m: Machine, *, gfn: int | None = None, level: int | None = None, smm: int = 0,
        direct: bool | None = None, access: int | None = None, valid: bool = True
        ) -> list[ShadowPage]:
    kvm = m.kvm
    out = []
    for _, sp in sorted(kvm.sp_by_hpfn.items()):
        if valid and kvm.is_obsolete_sp(sp):
            continue
        if gfn is not None and sp.gfn != gfn:
            continue
        if level is not None and sp.level != level:
            continue
        if direct is not None and sp.direct != direct:
            continue
        if access is not None and sp.access != access:
            continue
        if sp.smm != smm:
            continue
        out.append(sp)
    return out


def one_sp(m: Machine, **kw: object) -> ShadowPage:
    found = sps(m, **kw)  # type: ignore[arg-type]
    assert len(found) == 1, found
    return found[0]


def kinds(violations: list[AuditViolation]) -> set[tuple[str, str]]:
    return {(v.invariant, v.kind) for v in violations}


def mmio_sptes(m: Machine) -> list[tuple[ShadowPage, int, int]]:
    out = []
    for _, sp in sorted(m.kvm.sp_by_hpfn.items()):
        for i in np.flatnonzero(sp.spt):
            spte = sp.sptv[int(i)]
            if S.is_mmio_spte(spte):
                out.append((sp, int(i), spte))
    return out


def fingerprint(m: Machine) -> object:
    """Everything the audit could touch, by value."""
    kvm = m.kvm
    key = ShadowPage.__hash__
    pages = tuple(
        (h, sp.gfn, sp.role, sp.level, sp.access, sp.quadrant, sp.smm, sp.direct,
         sp.mmu_valid_gen, sp.spt.tobytes(), tuple(sorted((sp.shadowed or {}).items())),
         tuple(sorted((key(p), i) for p, i in sp.parent_ptes)), sp.root_count, sp.unsync,
         sp.unsync_children, sp.unsync_child_bitmap, sp.write_flooding_count)
        for h, sp in sorted(kvm.sp_by_hpfn.items()))
    arch = tuple(
        (slot, tuple((g, tuple(sorted((key(p), i) for p, i in r)))
                     for g, r in sorted(a.rmap.items())),
         tuple(sorted(a.write_track.items())))
        for slot, a in sorted(kvm.slot_arch.items(), key=lambda kv: repr(kv[0])))
    vcpus = tuple(
        (c.cr0, c.cr3, c.cr4, c.efer, c.smm, c.dead, tuple(sorted(c.tlb.items())),
         tuple(sorted(c.requests)), c.mmu.cpu_role, c.mmu.root_role, c.mmu.root_hpa,
         c.mmu.root_pgd, tuple(c.mmu.pae_root), tuple(c.mmu.prev_roots), tuple(c.mmu.pdptrs),
         c.mmio_gva, c.mmio_gfn, c.mmio_gen, c.mmio_access)
        for c in m.vcpus)
    return (pages, arch, vcpus,
            tuple((g, tuple(key(sp) for sp in b)) for g, b in sorted(kvm.page_hash.items())),
            tuple(key(sp) for sp in kvm.active_mmu_pages), kvm.n_used_mmu_pages,
            kvm.n_max_mmu_pages, kvm.indirect_shadow_pages, kvm.mmu_valid_gen, kvm.next_hpfn,
            kvm.mmu_invalidate_seq, tuple(m.phys.slots.generation),
            tuple(tuple(sorted(s.items())) for s in m.phys.slots.spaces),
            tuple(m.phys.host.pfn), tuple(m.phys.host.spare), m.phys.backing.array.tobytes(),
            m.dead)


# ---------------------------------------------------------------------- scenarios


def test_long_mode_scenario() -> None:
    d = Driver()
    build_all_tables(d)
    enter_long4(d, 0)
    for k in range(11):
        for kind in (R, W, X):
            for cpl in (0, 3):
                d.acc(0, user_va(k), kind, cpl=cpl, value=k)
    assert d.acc(0, user_va(4), W, cpl=3).kind is PF  # read-only
    assert d.acc(0, user_va(8), R).kind is MMIO
    # dirty-bit trick: a read of a clean page maps it read-only, the write upgrades it
    assert d.acc(0, user_va(2) | 8, R).kind is RAM
    assert d.acc(0, user_va(2) | 8, W, value=7).kind is RAM
    # stores to the PT and PD through the direct map are intercepted and emulated
    d.store(0, dm(LONG4, (PT << 12) + 1 * 8), ((DATA + 9) << 12) | LEAF)
    assert d.acc(0, user_va(1), R, cpl=3).addr == (DATA + 9) << 12
    d.store(0, dm(LONG4, (PT << 12) + 1 * 8 + 4), 0, width=4)  # high half
    d.store(0, dm(LONG4, (PT << 12) + 0 * 8 + 6), 0x11, width=4)  # straddles two gptes
    d.store(0, dm(LONG4, (PT << 12) + 3 * 8), 0, width=1)  # clear_bit()-style
    for _ in range(3):  # write flooding zaps the PD's shadow page
        d.store(0, dm(LONG4, (PD << 12) + 2 * 8), (PT << 12) | PWUA)
    for k in range(11):
        d.acc(0, user_va(k), R, cpl=3)
    # a second address space sharing the PDPT without U, and back (prev_roots)
    d.do("write_cr3", 0, PML4_B << 12)
    for k in range(8):
        d.acc(0, user_va(k), R)
        d.acc(0, user_va(k), W, value=1)
    assert d.acc(0, user_va(0), R, cpl=3).kind is PF
    d.do("write_cr3", 0, PML4 << 12)
    assert any(hpa >= 0 for _, hpa in d.m.vcpus[0].mmu.prev_roots)
    d.do("write_cr3", 0, PML4_B << 12)
    # CR0.WP=0: a supervisor write to a read-only page makes it a kernel page
    d.do("write_cr0", 0, d.m.regs(0)[0] & ~CR0_WP)
    assert d.acc(0, user_va(4), W, value=3).kind is RAM
    assert d.acc(0, user_va(4), R, cpl=3).kind is PF  # no U in the PML4_B hierarchy
    d.do("write_cr3", 0, PML4 << 12)
    assert d.acc(0, user_va(4), W, value=3).kind is RAM
    assert d.acc(0, user_va(4), R, cpl=3).kind is RAM  # mapped back as a user page
    d.do("write_cr0", 0, d.m.regs(0)[0] | CR0_WP)
    # the second vCPU on the same tables
    enter_long4(d, 1)
    for k in range(11):
        d.acc(1, user_va(k), R, cpl=3)
        d.acc(0, user_va(k), W, cpl=0, value=k)
    d.do("invlpg", 1, user_va(3))
    d.store(1, dm(LONG4, (PT << 12) + 5 * 8), ((DATA + 5) << 12) | LEAF)
    # the host moves pages; the VMM shrinks the shadow page pool
    d.do("migrate_page", 0, DATA + 7)
    d.do("migrate_page", 0, PT)
    for v in (0, 1):
        for k in range(11):
            d.acc(v, user_va(k), R)
    d.do("shrink", 5)
    d.do("set_max_pages", 16)
    for v in (0, 1):
        for k in range(11):
            d.acc(v, user_va(k), W, value=k)
    d.do("set_max_pages", 2000)
    d.do("zap_all")
    for v in (0, 1):
        d.acc(v, user_va(0), R)
    to_real_mode(d, 0)
    d.acc(0, PT << 12, W, value=0)


def test_pae_scenario() -> None:
    d = Driver()
    build_all_tables(d)
    enter_pae(d, 0)
    for k in range(11):
        for kind in (R, W, X):
            d.acc(0, user_va(k), kind, cpl=3, value=k)
    # the clean 2 MiB page: read-only direct pages, replaced once the guest sets D
    assert d.acc(0, BIG + (DATA << 12), R).kind is RAM
    assert d.acc(0, BIG + ((DATA + 1) << 12), R, cpl=3).kind is RAM
    assert d.acc(0, BIG + (DATA << 12), W, value=5).kind is RAM
    assert d.acc(0, BIG + ((MMIO_GFN + 2) << 12), R).kind is MMIO
    assert d.acc(0, BIG + (PAE_PT << 12), W, value=0).kind is RAM  # the PT, through the big page
    for k in range(4):
        d.acc(0, user_va(k), R)
    # PDPTEs are loaded at CR3 writes only: change one, reload
    d.store(0, dm(PAE, (PAE_PDPT << 12) + 1 * 8), (MMIO_GFN << 12) | PTE_P)
    d.do("write_cr3", 0, PAE_PDPT << 12)
    assert d.m.vcpus[0].mmu.pae_root[1] == 0  # PDPTE outside memslots: no root
    assert d.acc(0, 0x40000000, R).kind is PF
    d.store(0, dm(PAE, (PAE_PDPT << 12) + 1 * 8), 0)
    d.do("write_cr3", 0, PAE_PDPT << 12)
    enter_pae(d, 1, nx=False)
    for k in range(11):
        d.acc(1, user_va(k), R)
        d.acc(1, user_va(k), X, cpl=3)
    d.do("migrate_page", 1, DATA + 1)
    d.do("write_cr4", 0, d.m.regs(0)[2] ^ (1 << 20))  # SMEP
    for k in range(11):
        d.acc(0, user_va(k), X)
    d.do("write_efer", 1, 0x800)
    d.acc(1, user_va(6), X)


def test_32bit_scenario() -> None:
    d = Driver()
    build_all_tables(d)
    enter_32bit(d, 0)
    for k in range(11):
        for kind in (R, W, X):
            d.acc(0, user_va(k), kind, cpl=3, value=k)
    for k in range(4):  # the second quadrant of the guest PT
        d.acc(0, 0x600000 + (k << 12), W, value=k)
    quadrants = {sp.quadrant for sp in sps(d.m, gfn=PT32, level=1)}
    assert quadrants == {0, 1}
    # 4 MiB page: two 2 MiB direct halves
    d.acc(0, BIG32 + ((DATA + 2) << 12), R)
    d.acc(0, BIG32 + 0x200000, R)
    # stores to the PT (each quadrant) and to the PDE mapping it (two shadow PDEs)
    d.store(0, dm(BIT32, (PT32 << 12) + 2 * 4), ((DATA + 3) << 12) | LEAF, width=4)
    d.store(0, dm(BIT32, (PT32 << 12) + 513 * 4), ((DATA + 3) << 12) | LEAF, width=4)
    d.store(0, dm(BIT32, (PD32 << 12) + 1 * 4), (PT32 << 12) | PWUA, width=4)
    d.store(0, dm(BIT32, (PD32 << 12) + 2 * 4), PTE_PS | PWUA, width=4)  # big page clean now
    for k in range(11):
        d.acc(0, user_va(k), R, cpl=3)
    d.acc(0, 0x600000 + (1 << 12), R)
    d.acc(0, BIG32 + ((DATA + 2) << 12), W, value=1)
    # the other vCPU in 32-bit mode without CR0.WP: kernel pages
    enter_32bit(d, 1, wp=False)
    d.acc(1, user_va(4), W, value=9)
    d.acc(1, user_va(4), R, cpl=3)
    d.acc(1, user_va(4), W, value=9)
    d.do("write_cr4", 1, d.m.regs(1)[2] | (1 << 21))  # SMAP
    d.acc(1, user_va(4), R)
    d.acc(1, user_va(4), R, ac=True)
    d.do("migrate_page", 0, PT32)
    d.acc(0, user_va(1), R)
    d.do("shrink", 100)
    d.acc(1, user_va(1), R)


def test_smm_scenario() -> None:
    """SMM has its own address space: SMRAM over the MMIO hole, and the same RAM. Write
    protection of shadowed gfns must cover both."""
    d = Driver()
    build_all_tables(d)
    # In SMM before the tables are shadowed: writable SMM mappings of the PT and the PD.
    d.do("smi", 1)
    for gfn in (PT, PD, PDPT, DATA):
        d.acc(1, gfn << 12, W, value=d.m.phys.read(1, gfn << 12, 8))
    assert d.acc(1, MMIO_GFN << 12, W, value=5).kind is RAM  # SMRAM
    d.do("rsm", 1)
    enter_long4(d, 0)  # shadows PT/PD/PDPT: the SMM sptes lose W too
    for k in range(11):
        d.acc(0, user_va(k), R, cpl=3)
    assert d.acc(0, user_va(8), R).kind is MMIO
    d.do("smi", 1)
    d.acc(1, PT << 12, W, value=d.m.phys.read(1, PT << 12, 8))  # emulated: zaps both spaces
    d.acc(1, (PT << 12) + 8, W, value=((DATA + 11) << 12) | LEAF)
    assert d.acc(0, user_va(1), R).addr == (DATA + 11) << 12
    # paging inside SMM, on the same tables
    enter_long4(d, 1)
    for k in range(11):
        assert d.acc(1, user_va(k), R).kind is not ObsKind.VM_ERROR
    assert d.acc(1, user_va(8), R).kind is RAM  # gfn 48 is SMRAM in SMM
    d.do("migrate_page", 1, MMIO_GFN)
    d.do("rsm", 1)
    d.acc(1, 0x1000, R)
    d.do("smi", 0)
    d.acc(0, 0x1000, W, value=1)
    d.do("rsm", 0)
    for k in range(11):
        d.acc(0, user_va(k), W, value=k)


def test_memslot_scenario() -> None:
    d = Driver()
    build_all_tables(d)
    enter_long4(d, 0)
    assert d.acc(0, user_va(8), R).kind is MMIO
    assert d.acc(0, dm(LONG4, (MMIO_GFN + 3) << 12), R).kind is MMIO
    assert mmio_sptes(d.m)
    # RAM appears in the hole: no zap, the MMIO sptes are merely stale
    d.do("set_memslot", MemslotUpdate(MemslotChange.CREATE, 0, 2, MMIO_GFN, 8, MMIO_GFN))
    assert mmio_sptes(d.m), "the lenient stale-MMIO case must be exercised"
    assert d.acc(0, user_va(8), W, value=1).kind is RAM
    assert d.acc(0, dm(LONG4, (MMIO_GFN + 3) << 12), R).kind is RAM
    # deleting it zaps everything (invalid roots until the vCPUs reload)
    d.do("set_memslot", MemslotUpdate(MemslotChange.DELETE, 0, 2))
    assert any(sp.invalid for sp in d.m.kvm.sp_by_hpfn.values())
    assert d.acc(0, user_va(8), R).kind is MMIO
    # moving the top slot of both spaces away and back
    for as_id in (0, 1):
        d.do("set_memslot", MemslotUpdate(MemslotChange.MOVE, as_id, 1, 100))
    assert d.acc(0, user_va(0), R).kind is RAM
    assert d.acc(0, dm(LONG4, 60 << 12), R).kind is PF  # the direct map's tables moved away
    for as_id in (0, 1):
        d.do("set_memslot", MemslotUpdate(MemslotChange.MOVE, as_id, 1, 56))
    assert d.acc(0, dm(LONG4, 60 << 12), R).kind is RAM
    # CR3 in the MMIO hole: a dummy root until RAM appears there
    d.do("write_cr3", 0, (MMIO_GFN + 1) << 12)
    assert d.acc(0, user_va(0), R).kind is PF
    d.do("set_memslot", MemslotUpdate(MemslotChange.CREATE, 0, 2, MMIO_GFN, 8, MMIO_GFN))
    d.acc(0, user_va(0), R)  # root reloaded from the (empty) RAM page: #PF
    d.do("write_cr3", 0, PML4 << 12)
    assert d.acc(0, user_va(0), R).kind is RAM


def test_memslot_move_to_same_base() -> None:
    """A move to where the slot already is changes nothing (it used to lose the slot's arch
    data: Memslot compared by value, so the new slot's rmaps were freed with the old)."""
    d = Driver()
    build_all_tables(d)
    enter_long4(d, 0)
    d.acc(0, user_va(0), R)
    d.do("set_memslot", MemslotUpdate(MemslotChange.MOVE, 0, 1, 56))
    d.acc(0, dm(LONG4, DM_PT64 << 12), R)
    d.acc(0, dm(LONG4, DM_PD64 << 12), R)


@pytest.mark.parametrize("config", [
    MmuConfig(mmio_gen_bits=1),
    MmuConfig(mmio_gen_bits=2),
    MmuConfig(maxphyaddr=52),
    MmuConfig(pte_write_policy="update"),
    MmuConfig(n_max_mmu_pages=16),
], ids=["gen1", "gen2", "no-mmio-caching", "update-policy", "small-pool"])
def test_config_scenario(config: MmuConfig) -> None:
    d = Driver(Machine(config))
    build_all_tables(d)
    enter_long4(d, 0)
    enter_pae(d, 1)
    for round_ in range(3):
        for k in range(11):
            d.acc(0, user_va(k), R, cpl=3)
            d.acc(1, user_va(k), W, value=k)
            d.acc(1, dm(PAE, (MMIO_GFN + k % 8) << 12), R)
        change = MemslotChange.CREATE if round_ % 2 == 0 else MemslotChange.DELETE
        d.do("set_memslot", MemslotUpdate(change, 0, 2, MMIO_GFN, 8, MMIO_GFN))
        for k in range(8):  # PTE rewrites (prefetched under the update policy)
            d.store(0, dm(LONG4, (PT << 12) + k * 8), ((DATA + (k + round_) % 8) << 12) | LEAF)
            d.store(1, dm(PAE, (PAE_PT << 12) + k * 8), ((DATA + k) << 12) | PWUA)
    if not config.enable_mmio_caching:
        assert not mmio_sptes(d.m)


# ---------------------------------------------------------------------- random programs


def _random_program(seed: int, config: MmuConfig, nops: int) -> Driver:
    rng = random.Random(seed)
    d = Driver(Machine(config))
    build_all_tables(d)
    tables = long4_entries() + pae_entries() + bit32_entries()
    modes = ["long4", "long4b", "pae", "32", "real"]
    cur = ["real", "real"]
    paging = {"long4": LONG4, "long4b": LONG4, "pae": PAE, "32": BIT32}

    def enter(v: int, mode: str) -> None:
        nx, wp = rng.random() < 0.7, rng.random() < 0.8
        if mode == "long4":
            enter_long4(d, v, nx=nx, wp=wp)
        elif mode == "long4b":
            enter_long4(d, v, PML4_B, nx=nx, wp=wp)
        elif mode == "pae":
            enter_pae(d, v, nx=nx, wp=wp)
        elif mode == "32":
            enter_32bit(d, v, wp=wp)
        else:
            to_real_mode(d, v)
        cur[v] = mode

    def gva(v: int) -> int:
        mode = cur[v]
        if mode == "real":
            return rng.randrange(64) << 12
        r = rng.random()
        if r < 0.15:
            return dm(paging[mode], rng.randrange(64) << 12)
        if r < 0.3 and mode == "pae":
            return BIG + (rng.randrange(64) << 12)
        if r < 0.3 and mode == "32":
            return rng.choice([BIG32 + (rng.randrange(64) << 12),
                               0x600000 + (rng.randrange(5) << 12)])
        return user_va(rng.randrange(12))

    for _ in range(nops):
        if d.m.dead:
            break
        v = rng.randrange(2)
        if d.m.vcpus[v].dead:
            v ^= 1
            if d.m.vcpus[v].dead:
                break
        if d.m.vcpus[v].smm and rng.random() < 0.3:
            d.do("rsm", v)
            continue
        r = rng.random()
        if r < 0.08:
            enter(v, rng.choice(modes))
        elif r < 0.45:
            d.acc(v, gva(v), rng.choice([R, W, X]), cpl=rng.choice([0, 3]),
                  value=rng.randrange(1 << 64))
        elif r < 0.6:  # a store to a table entry, maybe modified, maybe misaligned
            gpa, size, value = rng.choice(tables)
            if rng.random() < 0.5:
                value ^= rng.choice([PTE_W, PTE_U, PTE_P, PTE_D, PTE_PS,
                                     rng.randrange(16, 64) << 12,
                                     (1 << 63) if size == 8 else PTE_W])
            off = rng.choice([0, 4, 2, 1]) if rng.random() < 0.2 else 0
            mode = "real" if d.m.vcpus[v].smm or cur[v] == "real" else cur[v]
            va = gpa + off if mode == "real" else dm(paging[mode], gpa + off)
            d.do("access", v, va, W, value=value & ((1 << (8 * size)) - 1), width=size)
        elif r < 0.65:
            d.do("invlpg", v, gva(v))
        elif r < 0.7:
            d.do("smi", v)
        elif r < 0.74:
            cr3 = d.m.regs(v)[1]
            if cur[v] in ("long4", "long4b") and rng.random() < 0.7:
                cr3 = (PML4_B if cr3 == PML4 << 12 else PML4) << 12
            d.do("write_cr3", v, cr3)
        elif r < 0.78:
            d.do("migrate_page", rng.randrange(2), rng.randrange(64))
        elif r < 0.8:
            d.do("zap_all")
        elif r < 0.83:
            d.do("shrink", rng.randrange(1, 10))
        elif r < 0.88:
            r2 = rng.random()
            if r2 < 0.4:
                d.do("set_memslot", MemslotUpdate(MemslotChange.CREATE, 0, 2, MMIO_GFN, 8,
                                                  MMIO_GFN))
            elif r2 < 0.7:
                d.do("set_memslot", MemslotUpdate(MemslotChange.DELETE, 0, 2))
            else:
                as_id = rng.randrange(2)
                base = d.m.phys.slots.spaces[as_id][1].base_gfn
                new = rng.choice([b for b in (56, 64, 100, 120) if b != base])
                d.do("set_memslot", MemslotUpdate(MemslotChange.MOVE, as_id, 1, new))
        elif r < 0.9:
            d.do("set_max_pages", rng.choice([16, 20, 40, 2000]))
        elif r < 0.95:
            d.do("write_cr0", v, d.m.regs(v)[0] ^ CR0_WP)
        elif r < 0.98:
            d.do("write_cr4", v, d.m.regs(v)[2] ^ rng.choice([1 << 20, 1 << 21, 1 << 4, 1 << 7]))
        else:
            d.do("write_efer", v, d.m.regs(v)[3] ^ (1 << 11))
    return d


RANDOM_CONFIGS = {
    "default": MmuConfig(),
    "update": MmuConfig(pte_write_policy="update"),
    "small-pool": MmuConfig(n_max_mmu_pages=16),
    "gen2": MmuConfig(mmio_gen_bits=2),
    "maxphy52": MmuConfig(maxphyaddr=52),
}


@pytest.mark.parametrize("name", sorted(RANDOM_CONFIGS))
@pytest.mark.parametrize("seed", range(8))
def test_random_programs_stay_clean(name: str, seed: int) -> None:
    _random_program(seed, RANDOM_CONFIGS[name], 300)


def test_guest_large_pages_in_long_mode() -> None:
    """2 MiB and 1 GiB guest pages are split into direct shadow pages (never huge sptes)."""
    d = Driver()
    build_all_tables(d)
    d.store(0, (PD << 12) + 3 * 8, PTE_PS | PWUA)  # 2 MiB at gpa 0, clean
    d.store(0, (PDPT << 12) + 1 * 8, PTE_PS | PWUA | PTE_D)  # 1 GiB at gpa 0
    enter_long4(d, 0)
    for gfn in (DATA, DATA + 1, PD, MMIO_GFN, 60):
        for base in (0x600000, 0x40000000):
            for kind in (R, W, X):
                d.acc(0, base + (gfn << 12), kind, cpl=3, value=1)
    d.store(0, dm(LONG4, (PD << 12) + 3 * 8), PTE_PS | PWUA | PTE_D)
    d.acc(0, 0x600000 + (DATA << 12), W, value=3)
    d.store(0, dm(LONG4, (PDPT << 12) + 1 * 8), PTE_PS | PWUA)  # clean again
    d.acc(0, 0x40000000 + (DATA << 12), R)
    d.acc(0, 0x40000000 + (DATA << 12), W, value=3)
    assert any(sp.direct and sp.level == 2 for sp in sps(d.m))
    enter_long4(d, 1, PML4_B)
    d.acc(1, 0x40000000 + (DATA << 12), W, value=3)
    d.do("migrate_page", 0, DATA)
    d.acc(0, 0x40000000 + (DATA << 12), R)


def test_kernel_page_conversion_keeps_other_vcpus_user_view() -> None:
    """CR0.WP=0: a supervisor write turns a read-only user spte into a writable supervisor one
    without a flush (as in KVM); another vCPU's read-only user TLB entry stays, harmlessly."""
    d = Driver()
    build_all_tables(d)
    enter_long4(d, 0, wp=False)
    enter_long4(d, 1, wp=False)
    assert d.acc(1, user_va(4), R, cpl=3).kind is RAM
    assert d.acc(0, user_va(4), W, value=1).kind is RAM
    _pfn, rights = d.m.vcpus[1].tlb[user_va(4) >> 12]
    assert rights & ACC_U and not rights & ACC_W
    assert not walk_shadow_tables(d.m.kvm, d.m.vcpus[1], user_va(4))[1] & ACC_U
    assert d.acc(1, user_va(4), R, cpl=3).kind is RAM
    assert d.acc(1, user_va(4), W, value=2).kind is RAM


# ---------------------------------------------------------------------- the audit itself


def populated() -> Driver:
    """A machine with most kinds of state: long-mode hierarchies with and without U (one of
    them a cached root), a direct real-mode MMIO spte, SMM direct pages (a read-only view of a
    shadowed PT among them), indirect MMIO sptes. Host TLBs are emptied at the end so that
    corruptions of the shadow tables do not also show up as stale TLB entries."""
    d = Driver()
    build_all_tables(d)
    assert d.acc(0, 50 << 12, R).kind is MMIO  # real mode: direct MMIO spte for gfn 50
    d.do("smi", 1)
    d.acc(1, (DATA + 1) << 12, W, value=1)
    d.acc(1, MMIO_GFN << 12, W, value=1)  # SMRAM
    enter_long4(d, 0)
    for k in range(11):
        d.acc(0, user_va(k), R, cpl=3)
    d.acc(0, user_va(0), W, value=1)
    d.acc(1, PT << 12, R)
    d.do("write_cr3", 0, PML4_B << 12)
    for k in range(8):
        d.acc(0, user_va(k), R)
    d.acc(0, user_va(5), W, value=1)
    d.do("write_cr3", 0, PML4 << 12)
    for k in range(11):
        d.acc(0, user_va(k), R, cpl=3)
    assert not audit(d.m)
    for vcpu in d.m.vcpus:
        vcpu.tlb.clear()
    return d


def _pt(m: Machine) -> ShadowPage:
    return one_sp(m, gfn=PT, level=1, direct=False, access=ACC_U | ACC_W | ACC_X)


def _pt_b(m: Machine) -> ShadowPage:
    return one_sp(m, gfn=PT, level=1, direct=False, access=ACC_W | ACC_X)


def _pd(m: Machine) -> ShadowPage:
    return one_sp(m, gfn=PD, level=2, direct=False, access=ACC_U | ACC_W | ACC_X)


def _pdpt(m: Machine) -> ShadowPage:
    return one_sp(m, gfn=PDPT, level=3, direct=False, access=ACC_U | ACC_W | ACC_X)


def _root(m: Machine) -> ShadowPage:
    return m.kvm.sp_by_hpfn[m.vcpus[0].mmu.root_hpa >> 12]


def _smm_direct(m: Machine) -> ShadowPage:
    return one_sp(m, gfn=0, level=1, smm=1, direct=True)


def _slot(m: Machine, as_id: int, gfn: int) -> Memslot:
    slot = m.phys.slots.lookup(as_id, gfn)
    assert slot is not None
    return slot


def _set_role(sp: ShadowPage, role: int) -> None:
    """Change a page's role and keep the cached role fields in step."""
    fresh = ShadowPage(sp.gfn, role, 0, 0)
    sp.role = role
    sp.level, sp.direct, sp.access = fresh.level, fresh.direct, fresh.access
    sp.quadrant, sp.smm, sp.has_4_byte_gpte = fresh.quadrant, fresh.smm, fresh.has_4_byte_gpte


def _or_spte(sp: ShadowPage, i: int, bits: int) -> None:
    sp.sptv[i] = sp.sptv[i] | bits


def _clear_spte(sp: ShadowPage, i: int, bits: int) -> None:
    sp.sptv[i] = sp.sptv[i] & ~bits


def _huge_leaf(m: Machine) -> None:
    pd = _pd(m)
    gfn, acc = DATA + 2, ACC_U | ACC_X
    pd.set_translation(5, gfn, acc)
    pd.sptv[5] = S.make_leaf_spte(m.phys.gfn_to_pfn(0, gfn), 2, acc, writable=False,
                                  prefetch=False)
    m.kvm.slot_arch[_slot(m, 0, gfn)].rmap[gfn].add((pd, 5))


def _leaf_gfn_without_slot(m: Machine) -> None:
    pt = _pt(m)
    m.kvm.slot_arch[_slot(m, 0, DATA + 1)].rmap[DATA + 1].discard((pt, 1))
    pt.set_translation(1, 50, pt.get_access(1))


def _mmio_spte(m: Machine, gfn: int) -> int:
    kvm = m.kvm
    return S.make_mmio_spte(gfn, ACC_W | ACC_U, m.phys.slots.generation[0],
                            kvm.config.mmio_gen_bits)


def _direct_mmio_index(m: Machine) -> tuple[ShadowPage, int]:
    sp = one_sp(m, gfn=0, level=1, smm=0, direct=True)
    assert S.is_mmio_spte(sp.sptv[50])
    return sp, 50


def _zap_all_then(m: Machine) -> None:
    m.zap_all()
    assert not audit(m)


def _forget_invalid_root(m: Machine) -> None:
    _zap_all_then(m)
    root = _root(m)
    assert root.invalid
    m.vcpus[0].mmu.root_hpa = INVALID_PAGE
    root.root_count -= 1


def _populate_invalid_root(m: Machine) -> None:
    _zap_all_then(m)
    root = _root(m)
    root.sptv[3] = _mmio_spte(m, 50)


def _root_to_pdpt(m: Machine) -> None:
    root, pdpt = _root(m), _pdpt(m)
    m.vcpus[0].mmu.root_hpa = pdpt.hpfn << 12
    root.root_count -= 1
    pdpt.root_count += 1


def _swap_root_with_cached(m: Machine) -> None:
    mmu = m.vcpus[0].mmu
    k = next(k for k, (_, hpa) in enumerate(mmu.prev_roots) if hpa >= 0)
    pgd, hpa = mmu.prev_roots[k]
    mmu.prev_roots[k] = (pgd, mmu.root_hpa)
    mmu.root_hpa = hpa


def _pae_leftover(m: Machine) -> None:
    pdpt = _pdpt(m)
    m.vcpus[0].mmu.pae_root[0] = (pdpt.hpfn << 12) | 1
    pdpt.root_count += 1


def _relink(m: Machine, parent: ShadowPage, i: int, child: ShadowPage) -> None:
    """Point parent spte ``i`` at ``child``, keeping every page's parent_ptes consistent."""
    old = parent.sptv[i]
    if old & S.SPTE_MMU_PRESENT:
        m.kvm.sp_by_hpfn[S.spte_pfn(old)].parent_ptes.discard((parent, i))
    parent.sptv[i] = S.make_nonleaf_spte(child.hpfn)
    child.parent_ptes.add((parent, i))


def _nonpaging_root(m: Machine) -> ShadowPage:
    return one_sp(m, gfn=0, level=2, smm=0, direct=True)


def _tlb_entry(m: Machine, k: int, change: object) -> None:
    d = Driver(m)
    d.acc(0, user_va(k), R, cpl=3)
    page = user_va(k) >> 12
    pfn, rights = m.vcpus[0].tlb[page]
    m.vcpus[0].tlb[page] = change(pfn, rights)  # type: ignore[operator]


def _tlb_user_view_on_wp1(m: Machine) -> None:
    """The kernel-page exemption must not cover pages built with CR0.WP=1."""
    d = Driver(m)
    d.acc(0, user_va(5), W, value=1)  # supervisor page, writable spte
    pfn, _rights = m.vcpus[0].tlb[user_va(5) >> 12]
    m.vcpus[0].tlb[user_va(5) >> 12] = (pfn, ACC_U | ACC_X)


CORRUPTIONS = {
    # I2
    "writable-shadowed-gfn": (lambda m: _or_spte(_pt(m), 9, S.SPTE_W | S.SPTE_MMU_WRITABLE),
                              "I2"),
    "writable-shadowed-gfn-other-as": (
        lambda m: _or_spte(_smm_direct(m), PT, S.SPTE_W | S.SPTE_MMU_WRITABLE), "I2"),
    "spte-w-state": (lambda m: _clear_spte(_pt(m), 0, S.SPTE_MMU_WRITABLE), "I2"),
    "unsync-sp": (lambda m: m.kvm.kvm_unsync_page(_pt(m)), "I2"),
    # I3
    "write-track": (lambda m: m.kvm.slot_arch[_slot(m, 0, PD)].write_track.__setitem__(
        PD, m.kvm.slot_arch[_slot(m, 0, PD)].write_track[PD] + 1), "I3"),
    "indirect-shadow-pages": (
        lambda m: setattr(m.kvm, "indirect_shadow_pages", m.kvm.indirect_shadow_pages + 1),
        "I3"),
    "n-used-mmu-pages": (
        lambda m: setattr(m.kvm, "n_used_mmu_pages", m.kvm.n_used_mmu_pages - 1), "I3"),
    "huge-spte": (_huge_leaf, "I3"),
    "slot-arch-missing": (lambda m: m.kvm.slot_arch.pop(_slot(m, 1, MMIO_GFN)), "I3"),
    "slot-arch-stale": (lambda m: m.kvm.slot_arch.__setitem__(Memslot(0, 9, 200, 4, 0),
                                                               SlotArch()), "I3"),
    # I4
    "rmap-missing": (lambda m: m.kvm.slot_arch[_slot(m, 0, DATA)].rmap[DATA].discard(
        (_pt(m), 0)), "I4"),
    "rmap-extra": (lambda m: m.kvm.slot_arch[_slot(m, 0, DATA)].rmap[DATA].add((_pt(m), 11)),
                   "I4"),
    "stale-pfn": (lambda m: _pt(m).sptv.__setitem__(
        1, (_pt(m).sptv[1] & ~S.SPTE_BASE_ADDR_MASK) | (79 << 12)), "I4"),
    "leaf-access": (lambda m: _clear_spte(_pt(m), 1, S.SPTE_U), "I4"),
    "junk-spte": (lambda m: _pt(m).sptv.__setitem__(11, S.SPTE_P | S.SPTE_W), "I4"),
    # I5
    "parent-missing": (lambda m: _pd(m).parent_ptes.discard((_pdpt(m), 0)), "I5"),
    "parent-extra": (lambda m: _pd(m).parent_ptes.add((_pdpt(m), 7)), "I5"),
    "nonleaf-freed-child": (lambda m: _pdpt(m).sptv.__setitem__(
        7, S.make_nonleaf_spte(0xFFFFF)), "I5"),
    "nonleaf-format": (lambda m: _clear_spte(_pdpt(m), 0, S.SPTE_U), "I5"),
    "unsync-children-count": (lambda m: setattr(_pd(m), "unsync_child_bitmap", 1 << 2), "I5"),
    # I6
    "duplicate-key": (lambda m: m.kvm.kvm_mmu_alloc_shadow_page(_smm_direct(m).gfn,
                                                                 _smm_direct(m).role), "I6"),
    "child-quadrant": (lambda m: _set_role(_pt(m), with_quadrant(_pt(m).role, 1)), "I6"),
    "child-access": (lambda m: _set_role(_pdpt(m), with_access(_pdpt(m).role, 0)), "I6"),
    "child-level": (lambda m: _relink(m, _pdpt(m), 0, _pt(m)), "I6"),
    "direct-gfn": (lambda m: _relink(m, _nonpaging_root(m), 1,
                                     one_sp(m, gfn=0, level=1, smm=0, direct=True)), "I6"),
    "child-role-bits": (lambda m: _set_role(_pt(m), _pt(m).role ^ (1 << 12)), "I6"),
    "leaf-exceeds-role": (lambda m: (_or_spte(_pt_b(m), 0, S.SPTE_U), _pt_b(m).set_translation(
        0, DATA, _pt_b(m).get_access(0) | ACC_U)), "I6"),
    "hash-missing": (lambda m: m.kvm.page_hash[PT].remove(_pt(m)), "I6"),
    "hash-freed": (lambda m: m.kvm.page_hash[PT].append(
        ShadowPage(PT, _pt(m).role, 0x7FFFFFF, m.kvm.mmu_valid_gen)), "I6"),
    "role-fields": (lambda m: setattr(_root(m), "quadrant", 1), "I6"),
    "hash-bucket": (lambda m: (m.kvm.page_hash[PD].append(_pt(m)),
                               m.kvm.page_hash[PT].remove(_pt(m))), "I6"),
    "hash-duplicate": (lambda m: m.kvm.page_hash[PT].append(_pt(m)), "I6"),
    # I7
    "mmio-shadows-ram": (lambda m: _pt(m).sptv.__setitem__(8, _mmio_spte(m, DATA)), "I7"),
    "mmio-gfn": (lambda m: _direct_mmio_index(m)[0].sptv.__setitem__(50, _mmio_spte(m, 51)),
                 "I7"),
    "present-no-memslot": (_leaf_gfn_without_slot, "I7"),
    # I8
    "root-count": (lambda m: setattr(_root(m), "root_count", 2), "I8"),
    "root-freed": (lambda m: m.vcpus[0].mmu.prev_roots.__setitem__(1, (0x7000, 0x7FFFF000)),
                   "I8"),
    "invalid-not-freed": (_forget_invalid_root, "I8"),
    "obsolete-not-zapped": (lambda m: setattr(
        m.kvm.sp_by_hpfn[next(h for _, h in m.vcpus[0].mmu.prev_roots if h >= 0) >> 12],
        "mmu_valid_gen", m.kvm.mmu_valid_gen ^ 1), "I8"),
    "invalid-sp-populated": (_populate_invalid_root, "I8"),
    "active-list": (lambda m: m.kvm.active_mmu_pages.pop(_pt(m)), "I8"),
    "stale-context": (lambda m: setattr(m.vcpus[0], "cr0", m.vcpus[0].cr0 ^ CR0_WP), "I8"),
    "root-role": (_root_to_pdpt, "I8"),
    "root-gfn": (_swap_root_with_cached, "I8"),
    "root-pgd": (lambda m: setattr(m.vcpus[0].mmu, "root_pgd", m.vcpus[0].mmu.root_pgd | 8),
                 "I8"),
    "pae-root-leftover": (_pae_leftover, "I8"),
    "prev-root-special": (lambda m: m.vcpus[0].mmu.prev_roots.__setitem__(2, (0, PAE_ROOT)),
                          "I8"),
    # I9
    "tlb-rights": (lambda m: _tlb_entry(m, 4, lambda pfn, r: (pfn, r | ACC_W)), "I9"),
    "tlb-pfn": (lambda m: _tlb_entry(m, 1, lambda pfn, r: (pfn + 1, r)), "I9"),
    "tlb-unmapped": (lambda m: m.vcpus[0].tlb.__setitem__(0x12345, (DATA, ACC_X)), "I9"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corruption_is_reported(kind: str) -> None:
    m = populated().m
    corrupt, invariant = CORRUPTIONS[kind]
    corrupt(m)
    violations = audit(m)
    assert kinds(violations) == {(invariant, kind)}, "\n".join(map(str, violations))
    assert all(v.message for v in violations)


def _unsync_machine() -> Machine:
    """``populated()``, then pages may go unsync (the state is the same: none is yet)."""
    m = populated().m
    m.kvm.config = replace(m.kvm.config, unsync=True)
    assert not audit(m)
    return m


def test_an_unsync_leaf_with_its_parents_marked_is_sound() -> None:
    m = _unsync_machine()
    m.kvm.kvm_unsync_page(_pt(m))
    assert all(psp.unsync_child_bitmap >> i & 1 for psp, i in _pt(m).parent_ptes)
    assert audit(m) == []


def test_an_unsync_leaf_whose_parents_do_not_know_it() -> None:
    m = _unsync_machine()
    _pt(m).unsync = True
    assert kinds(audit(m)) == {("I5", "unsync-bit-missing")}


def test_an_unsync_upper_level_page() -> None:
    m = _unsync_machine()
    m.kvm.kvm_unsync_page(_pd(m))
    assert kinds(audit(m)) == {("I2", "unsync-not-leaf"), ("I2", "unsync-write-tracked")}


def test_kernel_page_exemption_is_narrow() -> None:
    m = populated().m
    _tlb_user_view_on_wp1(m)
    assert kinds(audit(m)) == {("I9", "tlb-rights")}
    # the same stale view after a WP=0 conversion is tolerated, but not with W in it
    d = Driver()
    build_all_tables(d)
    enter_long4(d, 0, wp=False)
    enter_long4(d, 1, wp=False)
    d.acc(1, user_va(4), R, cpl=3)
    d.acc(0, user_va(4), W, value=1)
    page = user_va(4) >> 12
    pfn, rights = d.m.vcpus[1].tlb[page]
    d.m.vcpus[1].tlb[page] = (pfn, rights | ACC_W)
    assert kinds(audit(d.m)) == {("I9", "tlb-rights")}


def test_mmio_spte_with_caching_disabled_is_reported() -> None:
    d = Driver(Machine(MmuConfig(maxphyaddr=52)))
    build_all_tables(d)
    enter_long4(d, 0)
    d.acc(0, user_va(0), R)
    assert d.acc(0, user_va(8), R).kind is MMIO
    assert not mmio_sptes(d.m)
    pt = _pt(d.m)
    pt.sptv[8] = S.make_mmio_spte(MMIO_GFN, 0, d.m.phys.slots.generation[0], 19)
    assert kinds(audit(d.m)) == {("I7", "mmio-caching-disabled")}


def test_audit_reads_only() -> None:
    m = populated().m
    m.zap_all()  # invalid roots, pending requests
    before = fingerprint(m)
    assert audit(m) == []
    assert fingerprint(m) == before
    # and on a broken state, where every check has work to do
    d = populated()
    m = d.m
    d.acc(0, user_va(3), W, value=5)
    d.acc(1, (DATA + 2) << 12, R)
    for kind in ("rmap-extra", "parent-extra", "tlb-unmapped", "hash-freed", "root-freed",
                 "mmio-shadows-ram", "write-track", "stale-pfn"):
        CORRUPTIONS[kind][0](m)
    broken = fingerprint(m)
    first = audit(m)
    assert len(first) >= 8
    assert fingerprint(m) == broken
    assert audit(m) == first


def test_audit_is_deterministic() -> None:
    runs = []
    for _ in range(2):
        m = populated().m
        for kind in ("rmap-missing", "parent-missing", "write-track", "duplicate-key",
                     "root-count", "leaf-access"):
            CORRUPTIONS[kind][0](m)
        runs.append([str(v) for v in audit(m)])
    assert runs[0] == runs[1]
    assert len(runs[0]) >= 6


def test_violation_is_a_frozen_value() -> None:
    v = AuditViolation("I2", "unsync-sp", "msg")
    assert v == AuditViolation("I2", "unsync-sp", "msg")
    assert str(v) == "I2 unsync-sp: msg"
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.kind = "x"  # type: ignore[misc]


# ---------------------------------------------------------------------- historical bugs


def test_audit_sees_wp_one_address_space() -> None:
    """wp-all-address-spaces (0f38453cdb2e): a writable SMM mapping of a gfn that becomes a
    page table survives its shadowing."""
    m = Machine(bugs=BugSet(["wp-all-address-spaces"]))
    d = Driver(m)
    build_all_tables(d)
    d.do("smi", 1)
    d.acc(1, PT << 12, W, value=m.phys.read(1, PT << 12, 8))
    d.do("rsm", 1)
    m.write_cr3(0, PML4 << 12)
    m.write_cr4(0, 1 << 5)
    m.write_efer(0, 1 << 8)
    m.write_cr0(0, (1 << 31) | 1)
    m.access(0, user_va(0), R)
    assert ("I2", "writable-shadowed-gfn-other-as") in kinds(audit(m))


def test_audit_sees_local_flush_only() -> None:
    """no-remote-flush-on-permission-reduction (kvm-28): another vCPU keeps using a zapped
    translation."""
    m = Machine(bugs=BugSet(["no-remote-flush-on-permission-reduction"]))
    d = Driver(m)
    build_all_tables(d)
    enter_long4(d, 0)
    enter_long4(d, 1)
    d.acc(1, user_va(0), W, value=1)
    m.access(0, dm(LONG4, PT << 12), W, value=((DATA + 9) << 12) | LEAF)
    assert ("I9", "tlb-unmapped") in kinds(audit(m))


def test_audit_sees_update_ignoring_role_access() -> None:
    """emulated-pte-update-ignores-role-access (41074d07c78b): the update path installs U
    although the parent entries deny it."""
    m = Machine(MmuConfig(pte_write_policy="update"),
                BugSet(["emulated-pte-update-ignores-role-access"]))
    d = Driver(m)
    build_all_tables(d)
    enter_long4(d, 0, PML4_B)
    d.acc(0, user_va(0), R)
    m.access(0, dm(LONG4, PT << 12), W, value=((DATA + 1) << 12) | LEAF)
    assert ("I6", "leaf-exceeds-role") in kinds(audit(m))


def test_gpte_recheck_mutant_runs() -> None:
    """stale-gpte-revalidation-skipped skips gpte_changed() for an already linked PT, which is
    also what reads the gptes to prefetch (pte_prefetch() used to index an empty list)."""
    d = Driver(Machine(bugs=BugSet(["stale-gpte-revalidation-skipped"])))
    build_all_tables(d)
    enter_long4(d, 0)
    d.acc(0, user_va(9), R)  # links the PT; prefetch stops at the MMIO gpte 8
    d.acc(0, user_va(10), R)  # the PT is linked already: prefetch reads gptes 8-15
    # (acc() asserts each read reached RAM); nothing was changed under the walk, so skipping
    # the re-check leaves the shadow state sound
    assert audit(d.m) == []


def test_audit_sees_direct_sp_reused_after_dirty() -> None:
    """direct-sp-dirty-write-corruption (9e7b0e7fba45): the read-only direct page made for a
    clean large gpte is reused once the gpte is dirty, and gets writable sptes its role
    denies."""
    m = Machine(bugs=BugSet(["direct-sp-dirty-write-corruption"]))
    d = Driver(m)
    build_all_tables(d)
    enter_pae(d, 0)
    d.acc(0, BIG + (DATA << 12), R)
    m.access(0, BIG + (DATA << 12), W, value=1)
    assert ("I4", "leaf-access") in kinds(audit(m))
