"""Hypothesis property tests of the architectural walker.

The properties follow from the architecture (SDM Vol. 3A ch. 4; section numbers are of
docs/x86-paging.md): permission bits only restrict (§6), the frame comes from the leaf and the
page size (§10 step 4), A/D bits are written only on success and only into the entries of the
walk (§8), and the walk is a pure function of memory and CPU state apart from those A/D writes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ptbuild import (
    BIT32,
    FRAME_4M,
    LONG4,
    LONG5,
    PAE,
    PAGING_MODES,
    Tables,
    index,
    page_size,
    table_gpa,
    top_level,
)

from fuzzmmu.arch import Access, CpuState, load_pdptrs, walk, walk_trace
from fuzzmmu.arch.bits import (
    ACC_U,
    ACC_W,
    ACC_X,
    CR0_WP,
    CR4_PKE,
    CR4_SMAP,
    CR4_SMEP,
    PFERR_FETCH,
    PFERR_P,
    PFERR_PK,
    PFERR_RSVD,
    PFERR_U,
    PFERR_W,
    PTE_A,
    PTE_D,
    PTE_G,
    PTE_NX,
    PTE_P,
    PTE_PCD,
    PTE_PS,
    PTE_PWT,
    PTE_U,
    PTE_W,
    bits,
)
from fuzzmmu.world.memory import GuestMemory

SETTINGS = settings(max_examples=250, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
ALL_PFERR = PFERR_P | PFERR_W | PFERR_U | PFERR_RSVD | PFERR_FETCH | PFERR_PK

# ---------------------------------------------------------------------------------------------
# Strategies


def _likely(p_true_in_10: int):
    return st.integers(0, 9).map(lambda v: v < p_true_in_10)


accesses = st.builds(
    lambda kind, user, implicit: Access(write=kind == "w", fetch=kind == "x", user=user,
                                        implicit=implicit and kind != "x"),
    st.sampled_from("rwx"), st.booleans(), _likely(2))


def gvas(mode):
    if mode in (BIT32, PAE):
        return st.integers(0, (1 << 32) - 1)
    width = 48 if mode == LONG4 else 57

    def canon(v):
        return v | (((1 << 64) - 1) ^ ((1 << width) - 1)) if v >> (width - 1) & 1 else v

    return st.integers(0, (1 << width) - 1).map(canon)


def leaves(mode):
    return {BIT32: (1, 2), PAE: (1, 2), LONG4: (1, 2, 3), LONG5: (1, 2, 3)}[mode]


def reserved_bit_choices(mode, level, leaf, maxphyaddr):
    """Bits that are reserved for sure in an entry of ``level`` (§2-§5)."""
    if mode == BIT32:
        return [21] if level == leaf == 2 else []
    out = []
    if maxphyaddr < 52:
        out += [maxphyaddr, 51]
    if mode == PAE:
        out += [52, 58, 62]
    if level == leaf == 2:
        out += [13, 20]
    if level == leaf == 3:
        out += [13, 29]
    if mode in (LONG4, LONG5) and level >= 4:
        out += [7]
    return out


def ignored_bit_choices(mode, level, leaf, pke):
    """Bits that are ignored (never affect the result) in an entry of ``level``."""
    out = [9, 10, 11, 3, 4]  # software bits, PWT, PCD
    if level > leaf and mode != BIT32:
        out += [8]   # G in a non-leaf entry (Intel)
    if level > leaf and mode == BIT32:
        out += [8]
    if mode in (LONG4, LONG5):
        out += [52, 55, 58]
        if not pke or level > leaf:
            out += [59, 62]
    if mode == PAE and level == 3:
        out = [9, 10, 11, 3, 4]
    return out


@dataclass
class Case:
    t: Tables
    cpu: CpuState
    acc: Access
    leaf: int
    expect_gpa: int
    levels: list[int]          # levels with an in-memory entry, top down (PAE: no PDPTE)
    noisy: set[int]            # levels given a reserved bit

    @property
    def mode(self):
        return self.t.mode


@st.composite
def cases(draw, modes=PAGING_MODES):
    mode = draw(st.sampled_from(modes))
    maxphyaddr = draw(st.sampled_from([32, 36, 40, 46, 52] if mode == BIT32 else [36, 40, 46, 52]))
    pse = draw(st.booleans()) if mode == BIT32 else False
    pke = draw(st.booleans()) if mode in (LONG4, LONG5) else False
    gva = draw(gvas(mode))
    leaf = draw(st.sampled_from(leaves(mode)))
    nxe = draw(st.booleans())
    # Keep a good share of walks successful: most cases have no reserved bit at all.
    noise_rate = draw(st.sampled_from([0, 0, 0, 3]))
    t = Tables(mode, gva)
    top = top_level(mode)
    flags, extra, noisy = {}, {}, set()
    for level in range(top, leaf - 1, -1):
        if mode == PAE and level == 3:
            flags[3] = PTE_P if draw(_likely(9)) else 0
            extra[3] = draw(st.sampled_from([0, PTE_PWT, PTE_PCD | bits(11, 9)]))
            continue
        f = ((PTE_P if draw(st.integers(0, 19)) else 0) | (PTE_W if draw(_likely(8)) else 0)
             | (PTE_U if draw(_likely(8)) else 0) | (PTE_A if draw(st.booleans()) else 0)
             | (PTE_D if draw(st.booleans()) else 0))
        e = 0
        if mode != BIT32 and draw(st.integers(0, 19)) < (4 if nxe else 1):
            e |= PTE_NX
        for b in draw(st.lists(st.sampled_from(ignored_bit_choices(mode, level, leaf, pke)),
                               max_size=3)):
            e |= 1 << b
        if level == leaf and level == 1 and draw(st.booleans()):
            e |= PTE_G | (1 << 7)  # G, and PAT in a 4 KiB PTE
        if level == leaf and mode in (LONG4, LONG5) and pke:
            e |= draw(st.integers(0, 15)) << 59
        rsv = reserved_bit_choices(mode, level, leaf, maxphyaddr)
        if rsv and draw(_likely(noise_rate)):
            e |= 1 << draw(st.sampled_from(rsv))
            noisy.add(level)
        flags[level], extra[level] = f, e
    size = page_size(mode, leaf)
    if mode == BIT32:
        frame = draw(st.integers(0, (1 << 32) // size - 1)) * size
    else:
        frame = draw(st.integers(0, (1 << maxphyaddr) // size - 1)) * size
    if mode == BIT32 and leaf == 2:
        frame = frame or FRAME_4M
    expect_gpa = t.chain(leaf=leaf, flags=flags, extra=extra, frame=frame)
    kw = {
        "wp": draw(st.booleans()), "nxe": nxe, "smep": draw(_likely(4)),
        "smap": draw(_likely(4)), "eflags_ac": draw(st.booleans()), "pse": pse, "pke": pke,
        "pkru": draw(st.sampled_from([0, 0xFFFFFFFF, 0x55555555, 0xAAAAAAAA]) | st.integers(
            0, (1 << 32) - 1)),
        "maxphyaddr": maxphyaddr,
    }
    if mode == BIT32:
        kw["pse36_width"] = draw(st.sampled_from([32, 36, 40]))
    cpu = t.cpu(**kw)
    levels = list(range(2 if mode == PAE else top, leaf - 1, -1))
    return Case(t, cpu, draw(accesses), leaf, expect_gpa, levels, noisy)


def _snapshot(c: Case) -> dict[int, int]:
    return {lvl: c.t.get(lvl) for lvl in c.levels}


def _is_user(acc: Access) -> bool:
    return acc.user and not acc.implicit


# ---------------------------------------------------------------------------------------------
# Properties on translation chains built by the test


@SETTINGS
@given(cases())
def test_success_matches_leaf_and_page_size(c: Case):
    res = walk(c.t.mem, c.cpu, c.t.gva, c.acc, set_ad=False)
    if not res.ok:
        return
    assert res.level == c.leaf
    assert res.gpa == c.expect_gpa
    assert res.gpa % page_size(c.mode, c.leaf) == c.t.gva % page_size(c.mode, c.leaf)
    assert res.gpa < 1 << c.cpu.maxphyaddr
    assert not c.noisy, "a walk through an entry with a reserved bit succeeded"
    # Rights agree with the access that was allowed (§6).
    if _is_user(c.acc):
        assert res.rights & ACC_U
        if c.acc.write:
            assert res.rights & ACC_W
    if c.acc.fetch:
        assert res.rights & ACC_X
    if c.acc.write and not _is_user(c.acc) and c.cpu.cr0 >> 16 & 1:
        assert res.rights & ACC_W


@SETTINGS
@given(cases())
def test_error_code_is_well_formed(c: Case):
    res = walk(c.t.mem, c.cpu, c.t.gva, c.acc, set_ad=False)
    if res.ok:
        assert res.error_code == 0 and res.gpa is not None
        return
    code = res.error_code
    assert res.gpa is None
    assert code & ~ALL_PFERR == 0
    assert bool(code & PFERR_W) == c.acc.write
    assert bool(code & PFERR_U) == _is_user(c.acc)
    smep = bool(c.cpu.cr4 >> 20 & 1)
    nxe = bool(c.cpu.efer >> 11 & 1)
    assert bool(code & PFERR_FETCH) == (c.acc.fetch and (smep or (nxe and c.mode != BIT32)))
    if code & PFERR_RSVD:
        assert code & PFERR_P
        assert not code & PFERR_PK
    if code & PFERR_PK:
        assert code & PFERR_P and c.mode in (LONG4, LONG5) and not c.acc.fetch
    if not code & PFERR_P:
        assert code & (PFERR_RSVD | PFERR_PK) == 0


@SETTINGS
@given(cases())
def test_set_ad_false_never_changes_memory_and_walk_is_deterministic(c: Case):
    before = c.t.mem.copy()
    res1 = walk(c.t.mem, c.cpu, c.t.gva, c.acc, set_ad=False)
    res2 = walk(c.t.mem, c.cpu, c.t.gva, c.acc, set_ad=False)
    res3, steps = walk_trace(c.t.mem, c.cpu, c.t.gva, c.acc)
    assert res1 == res2 == res3
    assert steps
    assert c.t.mem.same_as(before)
    # The same walk on an identical copy of memory gives the same result.
    assert walk(before.copy(), c.cpu, c.t.gva, c.acc, set_ad=False) == res1
    # A/D updates do not change the outcome.
    assert walk(c.t.mem, c.cpu, c.t.gva, c.acc, set_ad=True) == res1


@SETTINGS
@given(cases())
def test_ad_only_on_success_and_only_on_walked_entries(c: Case):
    before = c.t.mem.copy()
    old = _snapshot(c)
    res = walk(c.t.mem, c.cpu, c.t.gva, c.acc)
    if not res.ok:
        assert c.t.mem.same_as(before), c.t.mem.differences(before)
        return
    new = _snapshot(c)
    for lvl in c.levels:
        want = old[lvl] | PTE_A | (PTE_D if c.acc.write and lvl == c.leaf else 0)
        assert new[lvl] == want, (lvl, hex(old[lvl]), hex(new[lvl]))
    allowed = {c.t.entry_gpa(lvl) + k for lvl in c.levels for k in range(c.t.esize)}
    assert set(c.t.mem.differences(before, limit=1 << 20)) <= allowed


@SETTINGS
@given(cases())
def test_second_translation_is_identical_and_writes_nothing(c: Case):
    res1 = walk(c.t.mem, c.cpu, c.t.gva, c.acc)
    mid = c.t.mem.copy()
    res2 = walk(c.t.mem, c.cpu, c.t.gva, c.acc)
    assert res1 == res2
    assert c.t.mem.same_as(mid)


@SETTINGS
@given(cases(), st.sampled_from(["A", "D", "AD"]))
def test_accessed_dirty_bits_do_not_affect_the_outcome(c: Case, which: str):
    res = walk(c.t.mem, c.cpu, c.t.gva, c.acc, set_ad=False)
    add = (PTE_A if "A" in which else 0) | (PTE_D if "D" in which else 0)
    for lvl in c.levels:
        c.t.set(lvl, c.t.get(lvl) | add)
    assert walk(c.t.mem, c.cpu, c.t.gva, c.acc, set_ad=False) == res
    for lvl in c.levels:
        c.t.set(lvl, c.t.get(lvl) & ~(PTE_A | PTE_D))
    assert walk(c.t.mem, c.cpu, c.t.gva, c.acc, set_ad=False) == res


@SETTINGS
@given(cases(), st.data())
def test_ignored_bits_do_not_affect_the_outcome(c: Case, data):
    res = walk(c.t.mem, c.cpu, c.t.gva, c.acc, set_ad=False)
    pke = bool(c.cpu.cr4 >> 22 & 1)
    for lvl in c.levels:
        choices = ignored_bit_choices(c.mode, lvl, c.leaf, pke)
        for b in data.draw(st.lists(st.sampled_from(choices), max_size=4)):
            c.t.set(lvl, c.t.get(lvl) ^ (1 << b))
    assert walk(c.t.mem, c.cpu, c.t.gva, c.acc, set_ad=False) == res


def _restrictions(c: Case, lvl: int):
    out = ["clear-W", "clear-P"]
    if c.mode != BIT32:
        out.append("set-NX")
    if reserved_bit_choices(c.mode, lvl, c.leaf, c.cpu.maxphyaddr):
        out.append("set-reserved")
    out.append("clear-U" if _is_user(c.acc) else "set-U")
    return out


@SETTINGS
@given(cases(), st.data())
def test_restricting_an_entry_never_turns_a_fault_into_success(c: Case, data):
    """Clearing W or P, setting NX or a reserved bit never grants an access. Clearing U never
    grants a user access; setting U never grants a supervisor access (it can only add SMEP,
    SMAP and PK faults). (Clearing U may legitimately grant supervisor accesses.)"""
    before = walk(c.t.mem, c.cpu, c.t.gva, c.acc, set_ad=False)
    lvl = data.draw(st.sampled_from(c.levels))
    how = data.draw(st.sampled_from(_restrictions(c, lvl)))
    v = c.t.get(lvl)
    if how == "clear-W":
        v &= ~PTE_W
    elif how == "clear-P":
        v &= ~PTE_P
    elif how == "set-NX":
        v |= PTE_NX
    elif how == "set-reserved":
        v |= 1 << data.draw(st.sampled_from(
            reserved_bit_choices(c.mode, lvl, c.leaf, c.cpu.maxphyaddr)))
    elif how == "clear-U":
        v &= ~PTE_U
    else:
        v |= PTE_U
    c.t.set(lvl, v)
    after = walk(c.t.mem, c.cpu, c.t.gva, c.acc, set_ad=False)
    if not before.ok:
        assert not after.ok, (how, lvl, before, after)
    if after.ok:
        assert before.ok and after.gpa == before.gpa
        if how in ("clear-W", "set-NX", "clear-U"):
            removed = {"clear-W": ACC_W, "set-NX": ACC_X, "clear-U": ACC_U}[how]
            if how != "set-NX" or c.cpu.efer >> 11 & 1:
                assert after.rights == before.rights & ~removed


@SETTINGS
@given(cases(), st.data())
def test_tightening_control_registers_never_turns_a_fault_into_success(c: Case, data):
    """CR0.WP 0->1, CR4.SMEP/SMAP 0->1, EFLAGS.AC 1->0, more PKRU bits, CR4.PKE 0->1: each only
    adds restrictions (§6)."""
    before = walk(c.t.mem, c.cpu, c.t.gva, c.acc, set_ad=False)
    how = data.draw(st.sampled_from(["wp", "smep", "smap", "ac", "pkru", "pke"]))
    cpu = c.cpu
    if how == "wp":
        cpu = cpu.replace(cr0=cpu.cr0 | CR0_WP)
    elif how == "smep":
        cpu = cpu.replace(cr4=cpu.cr4 | CR4_SMEP)
    elif how == "smap":
        cpu = cpu.replace(cr4=cpu.cr4 | CR4_SMAP)
    elif how == "ac":
        cpu = cpu.replace(eflags_ac=False)
    elif how == "pkru":
        cpu = cpu.replace(pkru=cpu.pkru | data.draw(st.integers(0, (1 << 32) - 1)))
    elif c.mode in (LONG4, LONG5):
        cpu = cpu.replace(cr4=cpu.cr4 | CR4_PKE)
    after = walk(c.t.mem, cpu, c.t.gva, c.acc, set_ad=False)
    if not before.ok:
        assert not after.ok, (how, before, after)
    if after.ok:
        assert after == before


@SETTINGS
@given(cases(modes=(BIT32, PAE)), st.integers(1, (1 << 32) - 1))
def test_upper_linear_address_bits_ignored_outside_long_mode(c: Case, high: int):
    res = walk(c.t.mem, c.cpu, c.t.gva, c.acc, set_ad=False)
    assert walk(c.t.mem, c.cpu, c.t.gva | (high << 32), c.acc, set_ad=False) == res


@settings(max_examples=100, deadline=None)
@given(st.integers(0, (1 << 64) - 1), accesses, st.booleans(), st.booleans())
def test_paging_off_identity(gva, acc, wp, smap):
    mem = GuestMemory(1)
    cpu = CpuState.build("off", 0, wp=wp, smap=smap, smep=True, nxe=True)
    res = walk(mem, cpu, gva, acc)
    assert res.ok and res.gpa == gva & 0xFFFFFFFF and res.error_code == 0 and res.level == 0
    assert mem.same_as(GuestMemory(1))


# ---------------------------------------------------------------------------------------------
# Random memory with aliasing: tables chosen at random among a few pages, so entries are often
# read at several levels. Checked against an independent path computation (addresses only).

NPAGES = 4


@dataclass
class RandomCase:
    mode: object
    mem: GuestMemory
    cpu: CpuState
    gva: int
    acc: Access


def _addr_mask(mode, maxphyaddr):
    if mode == BIT32:
        return 0xFFFFF000
    return bits(maxphyaddr - 1, 12)


@st.composite
def random_cases(draw):
    mode = draw(st.sampled_from(PAGING_MODES))
    maxphyaddr = draw(st.sampled_from([36, 40, 52]))
    esize = 4 if mode == BIT32 else 8
    top = top_level(mode)
    # Small indices so that the same entry is often reached at several levels.
    def idx_choices(lvl):
        if mode == PAE and lvl == 3:
            return [0, 1, 3]
        return [0, 1, 3, 1023 if mode == BIT32 else 511]

    idx = {lvl: draw(st.sampled_from(idx_choices(lvl))) for lvl in range(1, top + 1)}
    if mode == BIT32:
        gva = (idx[2] << 22) | (idx[1] << 12)
    else:
        gva = sum(idx[lvl] << (12 + 9 * (lvl - 1)) for lvl in idx)
    gva |= draw(st.integers(0, 0xFFF))
    if mode in (LONG4, LONG5):
        width = 48 if mode == LONG4 else 57
        if gva >> (width - 1) & 1:
            gva |= ((1 << 64) - 1) ^ ((1 << width) - 1)
    mem = GuestMemory(NPAGES)
    cr3 = draw(st.integers(0, NPAGES - 1)) << 12
    table = cr3
    regs = None
    for lvl in range(top, 0, -1):
        nxt = draw(st.integers(0, NPAGES - 1)) << 12
        if mode == PAE and lvl == 3:
            value = nxt | (PTE_P if draw(_likely(9)) else 0) | draw(
                st.sampled_from([0, PTE_PWT, bits(11, 9)]))
        else:
            low = draw(st.integers(0, 0xFFF)) | (PTE_P if draw(_likely(9)) else 0)
            if draw(st.booleans()):
                low |= PTE_P | PTE_W | PTE_U
            if draw(_likely(8)) or lvl > 3:
                low &= ~PTE_PS
            value = nxt | low
            if mode != BIT32:
                value |= draw(st.sampled_from([0] * 6 + [PTE_NX, 1 << 51, bits(62, 52)]))
        mem.write(table + idx[lvl] * esize, esize, value & ((1 << (8 * esize)) - 1))
        if mode == PAE and lvl == 3:
            # The PDPTE registers are loaded now, as by a MOV to CR3; the writes below may
            # then clobber the PDPT in memory without affecting them (§3).
            regs = load_pdptrs(mem, cr3, maxphyaddr)
        table = nxt
    kw = {"wp": draw(st.booleans()), "nxe": draw(st.booleans()), "smep": draw(st.booleans()),
          "smap": draw(st.booleans()), "eflags_ac": draw(st.booleans()),
          "pse": draw(st.booleans()), "maxphyaddr": maxphyaddr}
    if mode in (LONG4, LONG5):
        kw["pke"] = draw(st.booleans())
        kw["pkru"] = draw(st.integers(0, (1 << 32) - 1))
    cpu = CpuState.build(mode, cr3, pdptrs=regs, **kw)
    return RandomCase(mode, mem, cpu, gva, draw(accesses))


def _path(c: RandomCase):
    """Entries a successful walk must have used: (gpa, size) list and the leaf level, from the
    tables' addresses alone (§2-§4). Only valid when the walk succeeded."""
    mode, mem, cpu = c.mode, c.mem, c.cpu
    esize = 4 if mode == BIT32 else 8
    mask = _addr_mask(mode, cpu.maxphyaddr)
    top = top_level(mode)
    if mode == PAE:
        table = cpu.pdptrs[index(mode, c.gva, 3)] & mask
        top = 2
    else:
        table = cpu.cr3 & mask
    path = []
    for lvl in range(top, 0, -1):
        gpa = table + index(mode, c.gva, lvl) * esize
        value = mem.read(gpa, esize)
        path.append((gpa, value))
        large = value & PTE_PS and (lvl in (2, 3)) and (mode != BIT32 or cpu.cr4 >> 4 & 1)
        if lvl == 1 or large:
            return path, lvl
        table = value & mask
    raise AssertionError("unreachable")


@settings(max_examples=600, deadline=None)
@given(random_cases())
def test_random_tables_ad_and_translation(c: RandomCase):
    before = c.mem.copy()
    res_pure = walk(c.mem, c.cpu, c.gva, c.acc, set_ad=False)
    assert c.mem.same_as(before)
    res = walk(c.mem, c.cpu, c.gva, c.acc)
    assert res == res_pure
    if not res.ok:
        assert c.mem.same_as(before), before.differences(c.mem)
        return
    path, leaf = _path_before(c, before)
    assert res.level == leaf
    esize = 4 if c.mode == BIT32 else 8
    want = {}
    for gpa, value in path:
        want[gpa] = want.get(gpa, value) | PTE_A
    leaf_gpa, leaf_value = path[-1]
    if c.acc.write:
        want[leaf_gpa] |= PTE_D
    for gpa, value in want.items():
        assert c.mem.read(gpa, esize) == value, (hex(gpa), hex(c.mem.read(gpa, esize)),
                                                 hex(value))
    allowed = {g + k for g in want for k in range(esize)}
    assert set(before.differences(c.mem, limit=1 << 20)) <= allowed
    # The frame comes from the leaf (with PSE-36 bits for a 4 MiB page).
    size = page_size(c.mode, leaf)
    if c.mode == BIT32 and leaf == 2:
        frame = (leaf_value & 0xFFC00000) | ((leaf_value >> 13 & 0xFF) << 32)
    else:
        frame = leaf_value & _addr_mask(c.mode, c.cpu.maxphyaddr) & ~(size - 1)
    assert res.gpa == frame | (c.gva & (size - 1))
    # Translating again: same result, no writes.
    mid = c.mem.copy()
    assert walk(c.mem, c.cpu, c.gva, c.acc) == res
    assert c.mem.same_as(mid)


def _path_before(c: RandomCase, before: GuestMemory):
    return _path(dataclasses.replace(c, mem=before))


def test_table_gpa_layout_is_what_the_helpers_assume():
    assert table_gpa(1) == 0x1000 and table_gpa(5) == 0x5000
