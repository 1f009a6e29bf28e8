"""Exhaustive check of the walker against a permission / error-code formula written here from
the architecture (SDM Vol. 3A §4.6 access rights, §4.7 error code, §4.8 A/D), not the walker.

Enumerated: PDE x PTE flag combinations (P, W, U, NX for 8-byte entries, PS, one reserved bit)
x CR0.WP x EFER.NXE x CR4.SMEP x CR4.SMAP x EFLAGS.AC x access kind (read / write / fetch, by
user, supervisor and implicit-supervisor code), for 4-level, PAE and 32-bit guests; plus the
protection-key rules for 4-level guests. The levels above the PDE are fully permissive.
Bare section numbers in the comments (§N) are of docs/x86-paging.md.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from ptbuild import BIT32, FRAME, FRAME_4M, LONG4, LONG5, PAE, PWU, Tables, table_gpa

from fuzzmmu.arch import Access, CpuState, walk
from fuzzmmu.arch.bits import (
    ACC_U,
    ACC_W,
    ACC_X,
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_LA57,
    CR4_PAE,
    CR4_PKE,
    CR4_PSE,
    CR4_SMAP,
    CR4_SMEP,
    EFER_LME,
    EFER_NXE,
    PFERR_FETCH,
    PFERR_P,
    PFERR_PK,
    PFERR_RSVD,
    PFERR_U,
    PFERR_W,
    PTE_A,
    PTE_D,
    PTE_NX,
    PTE_P,
    PTE_PS,
    PTE_U,
    PTE_W,
)

ACCESSES = [
    Access(),                                # supervisor read
    Access(write=True),                      # supervisor write
    Access(fetch=True),                      # supervisor fetch
    Access(user=True),                       # user read
    Access(user=True, write=True),           # user write
    Access(user=True, fetch=True),           # user fetch
    Access(implicit=True),                   # implicit supervisor read
    Access(implicit=True, write=True, user=True),  # implicit supervisor write (user ignored)
]

RSV_NONLEAF = 1 << 51   # bits 51:M reserved (M = 40)
RSV_LEAF_2M = 1 << 13   # bits 20:13 of a 2 MiB PDE
RSV_PTE = 1 << 45       # bits 51:M
RSV_PSE = 1 << 21       # bit 21 of a 4 MiB PDE (always reserved)


@dataclass(frozen=True)
class Cpu:
    wp: bool
    nxe: bool
    smep: bool
    smap: bool
    ac: bool
    pse: bool = False
    pke: bool = False
    pkru: int = 0


@dataclass(frozen=True)
class Entry:
    """What the formula needs to know about one entry of the walk."""

    p: bool
    w: bool
    u: bool
    nx: bool       # XD bit (8-byte entries only)
    rsvd: bool     # some reserved bit other than bit 63 is set
    leaf: bool
    key: int = 0


def expected(mode, entries: list[Entry], cpu: Cpu, acc: Access):
    """(ok, error_code, rights, leaf_index) from the spec; leaf_index = entries walked - 1."""
    user = acc.user and not acc.implicit
    fetch_reported = acc.fetch and (cpu.smep or (cpu.nxe and mode != BIT32))   # §7 I/D
    access_bits = ((PFERR_W if acc.write else 0) | (PFERR_U if user else 0)
                   | (PFERR_FETCH if fetch_reported else 0))
    u = w = x = True
    for i, e in enumerate(entries):
        if not e.p:                                              # §7: P=0 stops the walk
            return False, access_bits, 0, i
        if e.rsvd or (e.nx and not cpu.nxe):                     # §4/§5: bit 63 without NXE
            return False, PFERR_P | PFERR_RSVD | access_bits, 0, i
        u, w = u and e.u, w and e.w                              # §6: AND of U/S and R/W
        x = x and not (e.nx and cpu.nxe)                         # §6: OR of XD
        if e.leaf:
            break
    rights = (ACC_U if u else 0) | (ACC_W if w else 0) | (ACC_X if x else 0)
    if acc.fetch:                                                # §6 table
        allowed = x and (u if user else not (cpu.smep and u))
    elif user:
        allowed = u and (w or not acc.write)
    else:
        allowed = not (cpu.smap and u and (acc.implicit or not cpu.ac))
        if acc.write and cpu.wp and not w:
            allowed = False
    pk = False
    if cpu.pke and mode in (LONG4, LONG5) and not acc.fetch and u:     # §6 protection keys
        ad = cpu.pkru >> (2 * e.key) & 1
        wd = cpu.pkru >> (2 * e.key + 1) & 1
        pk = bool(ad) or (bool(wd) and acc.write and (user or cpu.wp))
    if allowed and not pk:
        return True, 0, rights, i
    return False, PFERR_P | access_bits | (PFERR_PK if pk else 0), rights, i


def make_cpu(mode, t: Tables, c: Cpu) -> CpuState:
    cr0 = CR0_PG | CR0_PE | (CR0_WP if c.wp else 0)
    cr4 = ((CR4_SMEP if c.smep else 0) | (CR4_SMAP if c.smap else 0)
           | (CR4_PSE if c.pse else 0) | (CR4_PKE if c.pke else 0))
    efer = EFER_NXE if c.nxe else 0
    if mode == BIT32:
        return CpuState(cr0=cr0, cr3=t.cr3, cr4=cr4, efer=efer, eflags_ac=c.ac, pkru=c.pkru)
    if mode == PAE:
        regs = tuple(table_gpa(2) | PTE_P for _ in range(4))
        return CpuState(cr0=cr0, cr3=t.cr3, cr4=cr4 | CR4_PAE, efer=efer, pdptrs=regs,
                        eflags_ac=c.ac, pkru=c.pkru)
    la57 = CR4_LA57 if mode == LONG5 else 0
    return CpuState(cr0=cr0, cr3=t.cr3, cr4=cr4 | CR4_PAE | la57, efer=efer | EFER_LME,
                    eflags_ac=c.ac, pkru=c.pkru)


def flag_bits(p, w, u, nx=False) -> int:
    return (PTE_P if p else 0) | (PTE_W if w else 0) | (PTE_U if u else 0) | (PTE_NX if nx else 0)


def check_walk(t: Tables, cpu_state: CpuState, acc: Access, exp, entry_gpas, values, gpa_ok,
               ctx, levels) -> None:
    """Walk with A/D updates and compare result and memory with the expectation.

    ``levels[i]`` is the paging level of the i-th entry of the walk (WalkResult.level: the
    leaf level on success, the level where the walk stopped on a fault)."""
    ok, code, rights, stop_i = exp
    leaf_i = stop_i
    res = walk(t.mem, cpu_state, t.gva, acc)
    after = [t.mem.read(g, t.esize) for g in entry_gpas]
    assert res.level == levels[stop_i], (ctx, res, levels[stop_i])
    if ok:
        assert res.ok and res.error_code == 0 and res.gpa == gpa_ok and res.rights == rights, (
            ctx, res, hex(gpa_ok), rights)
        for i, (old, new) in enumerate(zip(values, after, strict=True)):
            if i > leaf_i:
                assert new == old, (ctx, "entry below the leaf changed", i)
                continue
            want = old | PTE_A | (PTE_D if acc.write and i == leaf_i else 0)
            assert new == want, (ctx, i, hex(old), hex(new), hex(want))
        for g, v in zip(entry_gpas, values, strict=True):   # restore for the next walk
            t.mem.write(g, t.esize, v)
    else:
        assert not res.ok and res.gpa is None and res.error_code == code, (
            ctx, res, f"expected error code {code:#x}")
        if not code & PFERR_P:
            assert res.rights == 0, (ctx, res, "not-present fault reports rights")
        # (rights on protection faults: see test_walker_modes.py::
        # test_rights_on_protection_fault_per_walkresult_docstring)
        assert after == values, (ctx, "memory changed on a fault")


def _cpus(**extra):
    for wp, nxe, smep, smap, ac in itertools.product((False, True), repeat=5):
        yield Cpu(wp=wp, nxe=nxe, smep=smep, smap=smap, ac=ac, **extra)


@pytest.mark.parametrize("mode", [LONG4, PAE, LONG5])
def test_exhaustive_8byte_pde_pte(mode):
    t = Tables(mode)
    t.chain()
    upper = [lvl for lvl in range(t.top, 2, -1) if mode != PAE]
    upper_entries = [Entry(True, True, True, False, False, False) for _ in upper]
    pde_gpa, pte_gpa = t.entry_gpa(2), t.entry_gpa(1)
    upper_gpas = [t.entry_gpa(lvl) for lvl in upper]
    upper_vals = [t.get(lvl) for lvl in upper]
    cpus = [(c, make_cpu(mode, t, c)) for c in _cpus()]
    n = 0
    for p1, w1, u1, nx1, r1, ps in itertools.product((False, True), repeat=6):
        if ps:
            pde = FRAME[2] | PTE_PS | flag_bits(p1, w1, u1, nx1) | (RSV_LEAF_2M if r1 else 0)
            pte_choices = [None]
        else:
            pde = table_gpa(1) | flag_bits(p1, w1, u1, nx1) | (RSV_NONLEAF if r1 else 0)
            pte_choices = list(itertools.product((False, True), repeat=5))
        pde_e = Entry(p1, w1, u1, nx1, r1, ps)
        for pte_flags in pte_choices:
            t.mem.write(pde_gpa, 8, pde)
            entries = [*upper_entries, pde_e]
            if pte_flags is None:
                pte = 0
                gpa_ok = FRAME[2] | (t.gva & 0x1FFFFF)
            else:
                p2, w2, u2, nx2, r2 = pte_flags
                pte = FRAME[1] | flag_bits(p2, w2, u2, nx2) | (RSV_PTE if r2 else 0)
                entries.append(Entry(p2, w2, u2, nx2, r2, True))
                gpa_ok = FRAME[1] | (t.gva & 0xFFF)
            t.mem.write(pte_gpa, 8, pte)
            gpas = [*upper_gpas, pde_gpa, pte_gpa]
            levels = [*upper, 2, 1]
            values = [*upper_vals, pde, pte]
            for c, cpu_state in cpus:
                for acc in ACCESSES:
                    exp = expected(mode, entries, c, acc)
                    check_walk(t, cpu_state, acc, exp, gpas, values, gpa_ok,
                               (mode.label, hex(pde), hex(pte), c, acc), levels)
                    n += 1
    assert n == (32 * 32 + 32) * 32 * len(ACCESSES)


def test_exhaustive_32bit_pde_pte():
    mode = BIT32
    t = Tables(mode)
    t.chain()
    pde_gpa, pte_gpa = t.entry_gpa(2), t.entry_gpa(1)
    cpus = [(c, make_cpu(mode, t, c)) for pse in (False, True) for c in _cpus(pse=pse)]
    n = 0
    for p1, w1, u1, ps, r1 in itertools.product((False, True), repeat=5):
        if r1 and not ps:
            continue  # without PS, bit 21 is an address bit: covered below with PS=1, PSE=0
        pde_large = FRAME_4M | PTE_PS | flag_bits(p1, w1, u1) | (RSV_PSE if r1 else 0)
        pde_table = table_gpa(1) | flag_bits(p1, w1, u1) | (PTE_PS if ps else 0) \
            | (RSV_PSE if r1 else 0)
        for p2, w2, u2, pat in itertools.product((False, True), repeat=4):
            pte = FRAME[1] | flag_bits(p2, w2, u2) | (PTE_PS if pat else 0)  # bit 7 = PAT
            for c, cpu_state in cpus:
                large = ps and c.pse
                if large:
                    pde = pde_large
                    entries = [Entry(p1, w1, u1, False, r1, True)]
                    gpa_ok = FRAME_4M | (t.gva & 0x3FFFFF)
                else:
                    # PS ignored without CR4.PSE (§2). Bit 21 set: the page table is at
                    # 0x201000, outside the 16 pages of memory, so it reads as not present.
                    pde = pde_table
                    entries = [Entry(p1, w1, u1, False, False, False),
                               Entry(p2 and not r1, w2, u2, False, False, True)]
                    gpa_ok = FRAME[1] | (t.gva & 0xFFF)
                t.mem.write(pde_gpa, 4, pde)
                t.mem.write(pte_gpa, 4, pte)
                for acc in ACCESSES:
                    exp = expected(mode, entries, c, acc)
                    check_walk(t, cpu_state, acc, exp, [pde_gpa, pte_gpa], [pde, pte], gpa_ok,
                               ("32bit", hex(pde), hex(pte), c, acc), [2, 1])
                    n += 1
    assert n == (16 + 8) * 16 * 64 * len(ACCESSES)


def test_exhaustive_protection_keys_4level():
    """PDE U/W x PTE P/W/U x key restrictions x WP x SMAP x AC x access, 4-level, PKE=1."""
    mode = LONG4
    t = Tables(mode)
    t.chain()
    key = 6
    pde_gpa, pte_gpa = t.entry_gpa(2), t.entry_gpa(1)
    gpas = [t.entry_gpa(4), t.entry_gpa(3), pde_gpa, pte_gpa]
    top = [t.get(4), t.get(3)]
    pkrus = [0, 1 << 2 * key, 2 << 2 * key, 3 << 2 * key, 0xFFFFFFFF & ~(3 << 2 * key)]
    n = 0
    for w1, u1, p2, w2, u2 in itertools.product((False, True), repeat=5):
        pde = table_gpa(1) | flag_bits(True, w1, u1) | (0xF << 59)  # non-leaf key: ignored
        pte = FRAME[1] | flag_bits(p2, w2, u2) | (key << 59)
        t.mem.write(pde_gpa, 8, pde)
        t.mem.write(pte_gpa, 8, pte)
        entries = [Entry(True, True, True, False, False, False)] * 2 + [
            Entry(True, w1, u1, False, False, False), Entry(p2, w2, u2, False, False, True, key)]
        for pkru, wp, smap, ac, smep in itertools.product(pkrus, *[(False, True)] * 4):
            c = Cpu(wp=wp, nxe=True, smep=smep, smap=smap, ac=ac, pke=True, pkru=pkru)
            cpu_state = make_cpu(mode, t, c)
            for acc in ACCESSES:
                exp = expected(mode, entries, c, acc)
                check_walk(t, cpu_state, acc, exp, gpas, [*top, pde, pte],
                           FRAME[1] | (t.gva & 0xFFF), ("pk", hex(pde), hex(pte), c, acc),
                           [4, 3, 2, 1])
                n += 1
    assert n == 32 * 5 * 16 * len(ACCESSES)


def test_formula_sanity():
    """The formula itself, on a few hand-checked cases from the spec's tables."""
    e = [Entry(True, True, True, False, False, True)]
    sup = Cpu(wp=True, nxe=False, smep=False, smap=False, ac=False)
    assert expected(LONG4, e, sup, Access(fetch=True))[:2] == (True, 0)
    smep = Cpu(wp=True, nxe=False, smep=True, smap=False, ac=False)
    assert expected(LONG4, e, smep, Access(fetch=True))[:2] == (False, PFERR_P | PFERR_FETCH)
    nxe32 = Cpu(wp=True, nxe=True, smep=False, smap=False, ac=False)
    missing = [Entry(False, True, True, False, False, True)]
    assert expected(BIT32, missing, nxe32, Access(fetch=True, user=True))[:2] == (False, PFERR_U)
    assert expected(PAE, missing, nxe32, Access(fetch=True, user=True))[:2] == (
        False, PFERR_U | PFERR_FETCH)
    smap_ac = Cpu(wp=True, nxe=False, smep=False, smap=True, ac=True)
    assert expected(LONG4, e, smap_ac, Access(write=True))[0]
    assert not expected(LONG4, e, smap_ac, Access(implicit=True))[0]
    ro = [Entry(True, False, True, False, False, True)]
    nowp = Cpu(wp=False, nxe=False, smep=False, smap=False, ac=False)
    assert expected(LONG4, ro, nowp, Access(write=True))[0]
    assert not expected(LONG4, ro, nowp, Access(write=True, user=True))[0]
    pk = Cpu(wp=False, nxe=False, smep=False, smap=False, ac=False, pke=True, pkru=2)
    assert expected(LONG4, ro, pk, Access(write=True))[0]   # WD, WP=0: supervisor may write
    assert expected(LONG4, ro, pk, Access(write=True, user=True))[:2] == (
        False, PFERR_P | PFERR_W | PFERR_U | PFERR_PK)
    assert PWU == PTE_P | PTE_W | PTE_U
