"""Table tests of the architectural walker, mode by mode and rule by rule.

Every expectation comes from the architecture, Intel SDM Vol. 3A ch. 4, and from the project
conventions documented with the walker's public API. Section numbers in the comments are of
docs/x86-paging.md, which restates it with its SDM sections: §2-§5 the paging modes, §6
rights, §7 the error code, §8 A/D.
"""

from __future__ import annotations

import pytest
from ptbuild import (
    BIT32,
    FRAME,
    FRAME_4M,
    GVA,
    LONG4,
    LONG5,
    PAE,
    PAGING_MODES,
    PWU,
    Tables,
    index,
    table_gpa,
    top_level,
)

from fuzzmmu.arch import (
    Access,
    CpuState,
    NonCanonicalAddress,
    PdpteLoadError,
    load_pdptrs,
    walk,
    walk_trace,
)
from fuzzmmu.arch.bits import (
    ACC_ALL,
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
    PTE_G,
    PTE_NX,
    PTE_P,
    PTE_PAT_LARGE,
    PTE_PCD,
    PTE_PS,
    PTE_PWT,
    PTE_U,
    PTE_W,
    PagingMode,
    bits,
)
from fuzzmmu.world.memory import GuestMemory

# ---------------------------------------------------------------------------------------------
# Accesses

R = Access()
W = Access(write=True)
X = Access(fetch=True)
UR = Access(user=True)
UW = Access(user=True, write=True)
UX = Access(user=True, fetch=True)
IR = Access(implicit=True)
IW = Access(implicit=True, write=True)
IUR = Access(user=True, implicit=True)  # implicit: supervisor whatever `user` says
IUW = Access(user=True, write=True, implicit=True)

ALL_ACCESSES = [R, W, X, UR, UW, UX, IR, IW, IUR, IUW]
ACC_IDS = ["r", "w", "x", "ur", "uw", "ux", "ir", "iw", "iur", "iuw"]
LONG_MODES = (LONG4, LONG5)
EIGHT_BYTE_MODES = (PAE, LONG4, LONG5)


def is_user(acc: Access) -> bool:
    return acc.user and not acc.implicit


def access_bits(acc: Access, fetch_reported: bool) -> int:
    """W/R, U/S and I/D of the error code: they describe the access (§7)."""
    return ((PFERR_W if acc.write else 0) | (PFERR_U if is_user(acc) else 0)
            | (PFERR_FETCH if acc.fetch and fetch_reported else 0))


def assert_ok(res, gpa: int, level: int, rights: int | None = None) -> None:
    assert res.ok, res
    assert res.error_code == 0, res
    assert res.gpa == gpa, f"gpa {res.gpa:#x} != {gpa:#x}"
    assert res.level == level, res
    if rights is not None:
        assert res.rights == rights, res


def assert_fault(res, code: int, level: int | None = None) -> None:
    assert not res.ok, res
    assert res.gpa is None, res
    assert res.error_code == code, f"error code {res.error_code:#x} != {code:#x} ({res})"
    if level is not None:
        assert res.level == level, res


# ---------------------------------------------------------------------------------------------
# §1: paging off


@pytest.mark.parametrize("acc", ALL_ACCESSES, ids=ACC_IDS)
@pytest.mark.parametrize("cpu", [
    CpuState.build("off", 0x1000),
    CpuState.build(PagingMode.OFF),
    # Every control bit that would matter with paging on: none may have an effect (§1).
    CpuState(cr0=CR0_PE | CR0_WP, cr3=0x1000, cr4=CR4_PSE | CR4_SMEP | CR4_SMAP | CR4_PKE,
             efer=EFER_NXE, eflags_ac=False, pkru=0xFFFFFFFF),
    CpuState(cr0=CR0_PE, cr3=0x1000, cr4=CR4_PAE | CR4_LA57 | CR4_SMEP | CR4_SMAP,
             efer=EFER_LME | EFER_NXE, pkru=0xFFFFFFFF),
], ids=["build-str", "build-enum", "all-bits", "lme-pae"])
def test_paging_off_is_identity_without_faults_or_writes(cpu, acc):
    assert cpu.mode == PagingMode.OFF
    mem = GuestMemory(4)
    # Entries everywhere that would fault (reserved bits, not present...) if they were read.
    for gpa in range(0, mem.size, 8):
        mem.write(gpa, 8, 0xFFF0_0000_0000_00F6 ^ gpa)
    before = mem.copy()
    for gva in (0, 0x1000, 0x1234, 0xFFF, 0x12345678, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
                0x3FFF_FFFF):
        res = walk(mem, cpu, gva, acc)
        assert_ok(res, gva, 0)
        res, _ = walk_trace(mem, cpu, gva, acc, set_ad=True)
        assert_ok(res, gva, 0)
    assert mem.same_as(before)


def test_paging_off_addresses_are_32_bits():
    cpu = CpuState.build("off")
    mem = GuestMemory(1)
    for gva in (1 << 32, (1 << 32) | 0x1234, 0xFFFF_FFFF_FFFF_FFFF, 0xDEAD_0000_BEEF_F00D):
        assert_ok(walk(mem, cpu, gva, W), gva & 0xFFFF_FFFF, 0)


# ---------------------------------------------------------------------------------------------
# §2: 32-bit paging


@pytest.mark.parametrize("gva", [GVA[BIT32], 0, 0xFFFFFFFF, 0x00400000, 0x003FF000, 0xFFC00FFF,
                                 0x80001001])
def test_32bit_4k_translation(gva):
    t = Tables(BIT32, gva)
    gpa = t.chain()
    for acc in ALL_ACCESSES:
        assert_ok(t.walk(acc), gpa, 1, ACC_ALL)


def test_32bit_indices_come_from_bits_31_22_and_21_12():
    t = Tables(BIT32)
    gpa = t.chain()
    assert index(BIT32, t.gva, 2) == 0x123 and index(BIT32, t.gva, 1) == 0x2B5
    assert t.entry_gpa(2) == 0x2000 + 0x123 * 4
    assert_ok(t.walk(), gpa, 1)


def test_32bit_linear_address_is_masked_to_32_bits():
    t = Tables(BIT32)
    gpa = t.chain()
    for high in (1 << 32, 0xFFFF_FFFF << 32, 0x1234 << 40):
        assert_ok(t.walk(gva=t.gva | high), gpa, 1)


def test_32bit_high_frame_bits():
    t = Tables(BIT32)
    gpa = t.chain(frame=0xFFFFF000)
    assert gpa == 0xFFFFF000 | (t.gva & 0xFFF)
    assert_ok(t.walk(), gpa, 1)


def test_32bit_cr3_low_bits_ignored():
    t = Tables(BIT32)
    gpa = t.chain()
    cpu = t.cpu().replace(cr3=t.cr3 | 0xFFF)
    assert_ok(t.walk(cpu=cpu), gpa, 1)
    cpu = t.cpu().replace(cr3=t.cr3 | PTE_PWT | PTE_PCD)
    assert_ok(t.walk(cpu=cpu), gpa, 1)


@pytest.mark.parametrize("pse", [False, True])
def test_32bit_ignored_bits_never_fault(pse):
    """Without a PSE page no bit of a 32-bit entry is reserved (§2); bits 6/8 of a PDE, 11:9,
    PAT/G of a PTE, PWT/PCD are ignored for translation."""
    t = Tables(BIT32)
    ign = bits(11, 9) | PTE_PWT | PTE_PCD
    gpa = t.chain(extra={2: ign | PTE_D | PTE_G, 1: ign | PTE_PS | PTE_G})
    assert_ok(t.walk(pse=pse), gpa, 1, ACC_ALL)
    assert_ok(t.walk(W, pse=pse), gpa, 1, ACC_ALL)


def test_32bit_pte_pat_bit_is_not_a_page_size_bit():
    t = Tables(BIT32)
    gpa = t.chain(extra={1: PTE_PS})
    assert_ok(t.walk(pse=True), gpa, 1)


def test_32bit_ps_ignored_when_cr4_pse_clear():
    """PDE.PS is ignored (not reserved) when CR4.PSE=0: the PDE points at a page table."""
    t = Tables(BIT32)
    gpa = t.chain(extra={2: PTE_PS})
    assert_ok(t.walk(pse=False), gpa, 1)
    assert_ok(t.walk(W, pse=False), gpa, 1)
    # With CR4.PSE=1 the same PDE maps a 4 MiB page: PA 31:22 = PDE 31:22 = 0 (the PDE holds
    # 0x1000, and bit 12 is then the PAT bit, not an address bit).
    t2 = Tables(BIT32)
    t2.chain(extra={2: PTE_PS})
    assert t2.get(2) & PTE_PAT_LARGE
    assert_ok(t2.walk(pse=True), t2.gva & 0x3FFFFF, 2)


def test_32bit_pse_page_bits_21_13_are_address_bits_without_pse():
    """Without CR4.PSE, bits 21:12 of a PDE are part of the page-table address."""
    t = Tables(BIT32, pages=0x400)
    pt = 0x203000  # bits 21 and 13:12 set
    t.set(2, pt | PWU | PTE_PS)
    t.mem.write(pt + index(BIT32, t.gva, 1) * 4, 4, 0x5000 | PWU)
    assert_ok(t.walk(pse=False), 0x5000 | (t.gva & 0xFFF), 1)


def test_32bit_pse_4m_page():
    t = Tables(BIT32)
    gpa = t.chain(leaf=2)
    assert gpa == FRAME_4M | (t.gva & 0x3FFFFF)
    for acc in ALL_ACCESSES:
        assert_ok(t.walk(acc, pse=True), gpa, 2, ACC_ALL)


def test_32bit_pse_pat_bit_12_is_not_address():
    t = Tables(BIT32)
    gpa = t.chain(leaf=2, extra={2: PTE_PAT_LARGE})
    assert_ok(t.walk(pse=True), gpa, 2)


def _pse36_cases():
    configs = [(40, 40), (36, 40), (40, 36), (36, 36), (32, 40), (40, 32), (52, 40), (39, 40),
               (46, 40), (52, 36), (34, 40), (41, 38)]
    for m, w in configs:
        limit = min(m, w)
        for b in range(13, 22):
            pa_bit = b - 13 + 32
            reserved = b == 21 or pa_bit >= limit
            yield pytest.param(m, w, b, reserved, id=f"M{m}-w{w}-bit{b}")


@pytest.mark.parametrize(("maxphyaddr", "width", "bit", "reserved"), list(_pse36_cases()))
def test_32bit_pse36_high_bits(maxphyaddr, width, bit, reserved):
    """PDE bits 20:13 give PA bits 39:32 below min(M, pse36_width); the rest and bit 21 are
    reserved (§2 and the project's pse36_width convention)."""
    t = Tables(BIT32)
    gpa = t.chain(leaf=2, extra={2: 1 << bit})
    cpu = t.cpu(pse=True, maxphyaddr=maxphyaddr, pse36_width=width)
    for acc in (R, UW, X):
        res = t.walk(acc, cpu=cpu)
        if reserved:
            assert_fault(res, PFERR_P | PFERR_RSVD | access_bits(acc, False), 2)
        else:
            assert_ok(res, gpa | (1 << (bit - 13 + 32)), 2)


@pytest.mark.parametrize(("maxphyaddr", "width"), [(40, 40), (36, 40), (52, 40), (40, 36),
                                                   (32, 40), (38, 52)])
def test_32bit_pse36_all_usable_bits_at_once(maxphyaddr, width):
    limit = min(maxphyaddr, width, 40)
    nbits = limit - 32
    t = Tables(BIT32)
    gpa = t.chain(leaf=2, extra={2: bits(13 + nbits - 1, 13)})
    res = t.walk(cpu=t.cpu(pse=True, maxphyaddr=maxphyaddr, pse36_width=width))
    assert_ok(res, gpa | bits(32 + nbits - 1, 32), 2)


def test_32bit_not_present_pse_pde_ignores_reserved_bits():
    t = Tables(BIT32)
    t.chain(leaf=2, flags={2: PWU & ~PTE_P}, extra={2: bits(21, 13)})
    assert_fault(t.walk(UW, pse=True), PFERR_W | PFERR_U, 2)


# ---------------------------------------------------------------------------------------------
# §3: PAE paging


def test_pae_4k_translation():
    t = Tables(PAE)
    gpa = t.chain()
    for acc in ALL_ACCESSES:
        assert_ok(t.walk(acc), gpa, 1, ACC_ALL)


@pytest.mark.parametrize("gva", [0, 0xFFFFFFFF, 0x40000000, 0xC0201FFF, 0x3FFFF123])
def test_pae_indices(gva):
    t = Tables(PAE, gva)
    gpa = t.chain()
    assert_ok(t.walk(UW), gpa, 1)


def test_pae_linear_address_is_masked_to_32_bits():
    t = Tables(PAE)
    gpa = t.chain()
    assert_ok(t.walk(gva=t.gva | (1 << 32)), gpa, 1)
    assert_ok(t.walk(gva=t.gva | (0xFFFF_FFFF << 32)), gpa, 1)


def test_pae_uses_cached_pdpte_registers_not_memory():
    t = Tables(PAE)
    gpa = t.chain()
    cpu = t.cpu()
    assert cpu.pdptrs[index(PAE, t.gva, 3)] == table_gpa(2) | PTE_P
    # Clear, then redirect, the PDPTE in memory: the registers still hold the old value.
    t.set(3, 0)
    assert_ok(t.walk(cpu=cpu), gpa, 1)
    t.set(3, 0x7000 | PTE_P)
    assert_ok(t.walk(cpu=cpu), gpa, 1)
    # A PDPTE that was not present at load stays not present until the next load.
    t2 = Tables(PAE)
    t2.chain()
    t2.set(3, 0)
    cpu2 = t2.cpu()
    t2.set(3, table_gpa(2) | PTE_P)
    assert_fault(t2.walk(UR, cpu=cpu2), PFERR_U, 3)
    # Reloading (as a MOV to CR3 would) picks the new value up.
    gpa2 = t2.chain()
    assert_ok(t2.walk(UR), gpa2, 1)


def test_pae_explicit_pdptrs_with_empty_pdpt_in_memory():
    t = Tables(PAE)
    gpa = t.chain()
    regs = [0, 0, 0, 0]
    regs[index(PAE, t.gva, 3)] = table_gpa(2) | PTE_P
    t.set(3, 0)
    cpu = CpuState.build(PAE, t.cr3, pdptrs=tuple(regs))
    assert_ok(t.walk(cpu=cpu), gpa, 1)
    cpu = CpuState(cr0=CR0_PG | CR0_PE | CR0_WP, cr3=t.cr3, cr4=CR4_PAE, pdptrs=tuple(regs))
    assert_ok(t.walk(UW, cpu=cpu), gpa, 1)


@pytest.mark.parametrize("acc", ALL_ACCESSES, ids=ACC_IDS)
def test_pae_pdpte_not_present(acc):
    t = Tables(PAE)
    t.chain(flags={3: 0}, extra={3: bits(8, 1) | PTE_NX})  # P=0: other bits are ignored
    cpu = t.cpu(nxe=True, smep=True)
    before = t.mem.copy()
    assert_fault(t.walk(acc, cpu=cpu), access_bits(acc, True), 3)
    assert t.mem.same_as(before)


def test_pae_rights_come_from_pde_and_pte_only():
    """A PAE PDPTE has no R/W, U/S or XD (§3): P alone allows user writes and fetches."""
    t = Tables(PAE)
    gpa = t.chain(flags={3: PTE_P})
    cpu = t.cpu(nxe=True)
    for acc in (UR, UW, UX, W, X):
        assert_ok(t.walk(acc, cpu=cpu), gpa, 1, ACC_ALL)


def test_pae_pdpt_gets_no_accessed_bit():
    t = Tables(PAE)
    gpa = t.chain()
    pdpt = t.mem.read(t.entry_gpa(3), 8)
    assert_ok(t.walk(W), gpa, 1)
    assert t.mem.read(t.entry_gpa(3), 8) == pdpt
    assert t.get(2) & PTE_A and t.get(1) & (PTE_A | PTE_D) == PTE_A | PTE_D


def test_pae_cr3_selects_32_byte_aligned_pdpt():
    t = Tables(PAE)
    gpa = t.chain()
    # Move the PDPT to offset 0x20 of its page; CR3 bits 4:0 (PWT, PCD, ignored) are not address.
    for i in range(4):
        t.mem.write(t.cr3 + 0x20 + 8 * i, 8, t.mem.read(t.cr3 + 8 * i, 8))
        t.mem.write(t.cr3 + 8 * i, 8, 0)
    for cr3 in (t.cr3 + 0x20, t.cr3 + 0x20 + 0x18, t.cr3 + 0x3F):
        regs = load_pdptrs(t.mem, cr3)
        assert regs[index(PAE, t.gva, 3)] == table_gpa(2) | PTE_P
        cpu = CpuState.build(PAE, cr3, mem=t.mem)
        assert_ok(t.walk(cpu=cpu), gpa, 1)


def test_pae_2m_page():
    t = Tables(PAE)
    gpa = t.chain(leaf=2)
    assert gpa == FRAME[2] | (t.gva & 0x1FFFFF)
    for acc in ALL_ACCESSES:
        assert_ok(t.walk(acc), gpa, 2, ACC_ALL)
    t.chain(leaf=2, extra={2: PTE_PAT_LARGE})  # PAT, not an address bit
    assert_ok(t.walk(), gpa, 2)


@pytest.mark.parametrize("bit", range(13, 21))
def test_pae_2m_reserved_bits_20_13(bit):
    t = Tables(PAE)
    t.chain(leaf=2, extra={2: 1 << bit})
    before = t.mem.copy()
    assert_fault(t.walk(UW), PFERR_P | PFERR_RSVD | PFERR_W | PFERR_U, 2)
    assert t.mem.same_as(before)


@pytest.mark.parametrize("maxphyaddr", [32, 36, 40, 46, 52])
@pytest.mark.parametrize("leaf", [1, 2])
@pytest.mark.parametrize("level", [2, 1])
def test_pae_bits_62_m_reserved(maxphyaddr, leaf, level):
    if level < leaf:
        return
    for bit in range(maxphyaddr, 63):
        t = Tables(PAE)
        t.chain(leaf=leaf, extra={level: 1 << bit})
        res = t.walk(R, cpu=t.cpu(maxphyaddr=maxphyaddr, nxe=True))
        assert_fault(res, PFERR_P | PFERR_RSVD, level)


@pytest.mark.parametrize("maxphyaddr", [36, 40, 52])
def test_pae_address_bits_below_m(maxphyaddr):
    t = Tables(PAE)
    frame = (1 << (maxphyaddr - 1)) | FRAME[1]
    gpa = t.chain(frame=frame)
    assert_ok(t.walk(cpu=t.cpu(maxphyaddr=maxphyaddr)), gpa, 1)
    t = Tables(PAE)
    frame = (1 << (maxphyaddr - 1)) | FRAME[2]
    gpa = t.chain(leaf=2, frame=frame)
    assert_ok(t.walk(cpu=t.cpu(maxphyaddr=maxphyaddr)), gpa, 2)


@pytest.mark.parametrize("leaf", [1, 2])
@pytest.mark.parametrize("level", [2, 1])
def test_pae_bit_63_reserved_without_nxe(leaf, level):
    if level < leaf:
        return
    t = Tables(PAE)
    t.chain(leaf=leaf, extra={level: PTE_NX})
    for acc in (R, UW, X, UX):
        assert_fault(t.walk(acc, nxe=False), PFERR_P | PFERR_RSVD | access_bits(acc, False),
                     level)


@pytest.mark.parametrize("leaf", [1, 2])
@pytest.mark.parametrize("level", [2, 1])
def test_pae_bit_63_is_xd_with_nxe(leaf, level):
    if level < leaf:
        return
    t = Tables(PAE)
    gpa = t.chain(leaf=leaf, extra={level: PTE_NX})
    cpu = t.cpu(nxe=True)
    for acc in (R, W, UR, UW, IR):
        assert_ok(t.walk(acc, cpu=cpu), gpa, leaf, ACC_U | ACC_W)
    assert_fault(t.walk(X, cpu=cpu), PFERR_P | PFERR_FETCH, leaf)
    assert_fault(t.walk(UX, cpu=cpu), PFERR_P | PFERR_U | PFERR_FETCH, leaf)


def test_pae_protection_keys_do_not_exist():
    """PKE is a long-mode feature (§6); in PAE bits 62:59 are reserved, not a key."""
    t = Tables(PAE)
    gpa = t.chain()
    regs = load_pdptrs(t.mem, t.cr3)
    cpu = CpuState(cr0=CR0_PG | CR0_PE | CR0_WP, cr3=t.cr3, cr4=CR4_PAE | CR4_PKE,
                   pdptrs=regs, pkru=0xFFFFFFFF)
    for acc in (UR, UW, R, W):
        assert_ok(t.walk(acc, cpu=cpu), gpa, 1)
    t.chain(extra={1: 1 << 59})
    assert_fault(t.walk(UR, cpu=cpu), PFERR_P | PFERR_RSVD | PFERR_U, 1)


# load_pdptrs (§3: #GP on reserved bits of a present PDPTE)


def _pdpt(mem: GuestMemory, cr3: int, values) -> None:
    for i, v in enumerate(values):
        mem.write((cr3 & 0xFFFFFFE0) + 8 * i, 8, v)


def test_load_pdptrs_returns_the_four_entries():
    mem = GuestMemory(4)
    vals = (0x1000 | PTE_P, 0, 0x2000 | PTE_P | PTE_PWT | PTE_PCD | bits(11, 9),
            0xFFFF_FFFF_FFFF_FFFE)  # not present: every other bit is ignored
    _pdpt(mem, 0x3000, vals)
    assert tuple(load_pdptrs(mem, 0x3000)) == vals
    cpu = CpuState.build(PAE, 0x3000, mem=mem)
    assert tuple(cpu.pdptrs) == vals


@pytest.mark.parametrize("bit", [1, 2, 5, 6, 7, 8, 63, 40, 51, 52, 62])
@pytest.mark.parametrize("slot", [0, 3])
def test_load_pdptrs_reserved_bit_raises(bit, slot):
    mem = GuestMemory(4)
    vals = [0x1000 | PTE_P] * 4
    vals[slot] |= 1 << bit
    _pdpt(mem, 0x2000, vals)
    with pytest.raises(PdpteLoadError) as info:
        load_pdptrs(mem, 0x2000)
    assert info.value.index == slot
    with pytest.raises(PdpteLoadError):
        CpuState.build(PAE, 0x2000, mem=mem)


@pytest.mark.parametrize(("maxphyaddr", "bit", "ok"), [
    (36, 35, True), (36, 36, False), (40, 39, True), (40, 40, False), (46, 45, True),
    (46, 46, False), (52, 51, True), (52, 52, False), (32, 31, True), (32, 32, False),
])
def test_load_pdptrs_maxphyaddr(maxphyaddr, bit, ok):
    mem = GuestMemory(4)
    _pdpt(mem, 0x2000, [0x1000 | PTE_P | (1 << bit), 0, 0, 0])
    if ok:
        assert load_pdptrs(mem, 0x2000, maxphyaddr=maxphyaddr)[0] == 0x1000 | PTE_P | (1 << bit)
    else:
        with pytest.raises(PdpteLoadError):
            load_pdptrs(mem, 0x2000, maxphyaddr=maxphyaddr)


def test_load_pdptrs_outside_memory_raises():
    mem = GuestMemory(2)
    load_pdptrs(mem, mem.size - 32)  # the last 32 bytes: fine (all zero: not present)
    for cr3 in (mem.size, mem.size + 0x1000, 0xFFFFF000):
        with pytest.raises(PdpteLoadError):
            load_pdptrs(mem, cr3)


# ---------------------------------------------------------------------------------------------
# §4: 4-level and 5-level paging


@pytest.mark.parametrize("mode", LONG_MODES)
@pytest.mark.parametrize("gva", [None, 0, 0x7FFF_FFFF_FFFF, 0xFFFF_8000_0000_0000,
                                 0xFFFF_FFFF_FFFF_FFFF, 0xFFFF_A5A5_5A5A_5123, 0x1234_5678_9ABC])
def test_long_4k_translation(mode, gva):
    t = Tables(mode, gva)
    gpa = t.chain()
    for acc in ALL_ACCESSES:
        assert_ok(t.walk(acc), gpa, 1, ACC_ALL)


@pytest.mark.parametrize("gva", [0x0000_8000_0000_0000, 0x00FF_FFFF_FFFF_F123,
                                 0xFF00_0000_0000_0000, 0x005B_51A3_F1C7_E678])
def test_5level_uses_bits_56_48(gva):
    t = Tables(LONG5, gva)
    gpa = t.chain()
    assert_ok(t.walk(UW), gpa, 1)


@pytest.mark.parametrize("mode", LONG_MODES)
def test_long_2m_page(mode):
    t = Tables(mode)
    gpa = t.chain(leaf=2)
    assert gpa == FRAME[2] | (t.gva & 0x1FFFFF)
    for acc in ALL_ACCESSES:
        assert_ok(t.walk(acc), gpa, 2, ACC_ALL)
    t.chain(leaf=2, extra={2: PTE_PAT_LARGE})
    assert_ok(t.walk(), gpa, 2)


@pytest.mark.parametrize("mode", LONG_MODES)
def test_long_1g_page(mode):
    t = Tables(mode)
    gpa = t.chain(leaf=3)
    assert gpa == FRAME[3] | (t.gva & 0x3FFFFFFF)
    for acc in ALL_ACCESSES:
        assert_ok(t.walk(acc), gpa, 3, ACC_ALL)
    t.chain(leaf=3, extra={3: PTE_PAT_LARGE})
    assert_ok(t.walk(), gpa, 3)


@pytest.mark.parametrize("mode", LONG_MODES)
@pytest.mark.parametrize("bit", range(13, 21))
def test_long_2m_reserved_bits_20_13(mode, bit):
    t = Tables(mode)
    t.chain(leaf=2, extra={2: 1 << bit})
    assert_fault(t.walk(W), PFERR_P | PFERR_RSVD | PFERR_W, 2)


@pytest.mark.parametrize("mode", LONG_MODES)
@pytest.mark.parametrize("bit", range(13, 30))
def test_long_1g_reserved_bits_29_13(mode, bit):
    t = Tables(mode)
    t.chain(leaf=3, extra={3: 1 << bit})
    assert_fault(t.walk(UR), PFERR_P | PFERR_RSVD | PFERR_U, 3)


def test_long_ps_reserved_in_pml4e_and_pml5e():
    t = Tables(LONG4)
    t.chain(extra={4: PTE_PS})
    assert_fault(t.walk(R), PFERR_P | PFERR_RSVD, 4)
    t = Tables(LONG5)
    t.chain(extra={5: PTE_PS})
    assert_fault(t.walk(UW), PFERR_P | PFERR_RSVD | PFERR_W | PFERR_U, 5)
    t = Tables(LONG5)
    t.chain(extra={4: PTE_PS})
    assert_fault(t.walk(R), PFERR_P | PFERR_RSVD, 4)


def _long_levels(mode, leaf):
    return range(top_level(mode), leaf - 1, -1)


@pytest.mark.parametrize("mode", LONG_MODES)
@pytest.mark.parametrize("maxphyaddr", [32, 36, 40, 46, 51])
@pytest.mark.parametrize("leaf", [1, 2, 3])
def test_long_bits_51_m_reserved_at_every_level(mode, maxphyaddr, leaf):
    for level in _long_levels(mode, leaf):
        for bit in (maxphyaddr, 51, (maxphyaddr + 51) // 2):
            t = Tables(mode)
            t.chain(leaf=leaf, extra={level: 1 << bit})
            for acc in (R, UX):
                res = t.walk(acc, cpu=t.cpu(maxphyaddr=maxphyaddr))
                assert_fault(res, PFERR_P | PFERR_RSVD | access_bits(acc, False), level)


@pytest.mark.parametrize("mode", LONG_MODES)
@pytest.mark.parametrize("maxphyaddr", [36, 40, 46, 52])
@pytest.mark.parametrize("leaf", [1, 2, 3])
def test_long_leaf_address_bits_below_m(mode, maxphyaddr, leaf):
    t = Tables(mode)
    frame = FRAME[leaf] | bits(maxphyaddr - 1, 34)
    gpa = t.chain(leaf=leaf, frame=frame)
    assert_ok(t.walk(cpu=t.cpu(maxphyaddr=maxphyaddr)), gpa, leaf)


def test_long_m52_bit_51_is_an_address_bit():
    """With M=52 bit 51 is part of the address. A table there lies outside guest memory and so
    reads as not present (project convention)."""
    t = Tables(LONG4)
    gpa = t.chain(frame=FRAME[1] | (1 << 51))
    assert_ok(t.walk(cpu=t.cpu(maxphyaddr=52)), gpa, 1)
    t = Tables(LONG4)
    t.chain(extra={3: 1 << 51})
    assert_fault(t.walk(UR, cpu=t.cpu(maxphyaddr=52)), PFERR_U, 2)


@pytest.mark.parametrize("mode", LONG_MODES)
@pytest.mark.parametrize("leaf", [1, 2, 3])
@pytest.mark.parametrize("pke", [False, True])
def test_long_bits_62_52_ignored(mode, leaf, pke):
    """Bits 62:52 are ignored in every long-mode entry (a leaf's 62:59 are its key with PKE;
    key 0 with PKRU=0 allows everything)."""
    t = Tables(mode)
    high = bits(62, 52)
    gpa = t.chain(leaf=leaf, extra={lvl: high for lvl in _long_levels(mode, leaf)})
    cpu = t.cpu(pke=pke, pkru=0)
    for acc in (R, UW, X):
        assert_ok(t.walk(acc, cpu=cpu), gpa, leaf, ACC_ALL)


@pytest.mark.parametrize("mode", LONG_MODES)
@pytest.mark.parametrize("leaf", [1, 2, 3])
def test_long_other_ignored_bits(mode, leaf):
    """Bits 11:9 everywhere, G (bit 8) and D in non-leaf entries, PWT/PCD: no effect."""
    t = Tables(mode)
    ign = bits(11, 9) | PTE_PWT | PTE_PCD | PTE_G
    extra = {lvl: ign | (PTE_D if lvl > leaf else 0) for lvl in _long_levels(mode, leaf)}
    gpa = t.chain(leaf=leaf, extra=extra)
    assert_ok(t.walk(UR), gpa, leaf, ACC_ALL)


@pytest.mark.parametrize("mode", LONG_MODES)
@pytest.mark.parametrize("leaf", [1, 2, 3])
def test_long_bit_63_reserved_without_nxe(mode, leaf):
    for level in _long_levels(mode, leaf):
        t = Tables(mode)
        t.chain(leaf=leaf, extra={level: PTE_NX})
        for acc in (R, UX):
            assert_fault(t.walk(acc, nxe=False), PFERR_P | PFERR_RSVD | access_bits(acc, False),
                         level)


@pytest.mark.parametrize("mode", LONG_MODES)
@pytest.mark.parametrize("leaf", [1, 2, 3])
def test_long_bit_63_is_xd_at_every_level(mode, leaf):
    for level in _long_levels(mode, leaf):
        t = Tables(mode)
        gpa = t.chain(leaf=leaf, extra={level: PTE_NX})
        cpu = t.cpu(nxe=True)
        for acc in (R, W, UR, UW, IW):
            assert_ok(t.walk(acc, cpu=cpu), gpa, leaf, ACC_U | ACC_W)
        assert_fault(t.walk(X, cpu=cpu), PFERR_P | PFERR_FETCH, leaf)
        assert_fault(t.walk(UX, cpu=cpu), PFERR_P | PFERR_FETCH | PFERR_U, leaf)


@pytest.mark.parametrize("mode", LONG_MODES)
def test_long_cr3_low_bits_ignored(mode):
    t = Tables(mode)
    gpa = t.chain()
    for low in (PTE_PWT, PTE_PCD, 0xFFF, 0x5A5):
        cpu = t.cpu().replace(cr3=t.cr3 | low)
        assert_ok(t.walk(UW, cpu=cpu), gpa, 1)


@pytest.mark.parametrize("high", [1 << 32, 1 << 39, 0xFFFF_FFFF << 32])
def test_32bit_and_pae_cr3_is_32_bits(high):
    """32-bit paging uses CR3[31:12], PAE CR3[31:5] (§2, §3)."""
    t = Tables(BIT32)
    gpa = t.chain()
    assert_ok(t.walk(cpu=t.cpu().replace(cr3=t.cr3 | high)), gpa, 1)
    t = Tables(PAE)
    gpa = t.chain()
    assert load_pdptrs(t.mem, t.cr3 | high) == load_pdptrs(t.mem, t.cr3)
    assert_ok(t.walk(cpu=CpuState.build(PAE, t.cr3 | high, mem=t.mem)), gpa, 1)


@pytest.mark.parametrize("mode", LONG_MODES)
@pytest.mark.parametrize(("maxphyaddr", "bit"), [(40, 40), (40, 51), (36, 45), (46, 46), (52, 63),
                                                 (40, 63)])
def test_long_cr3_bits_above_m_are_not_address(mode, maxphyaddr, bit):
    """Only CR3[(M-1):12] locate the root (§4); bit 63 is a MOV hint that is not stored and
    bits 62:M cannot be loaded (#GP). Either the state is refused (ValueError) or the bits
    play no part in the walk."""
    t = Tables(mode)
    gpa = t.chain()
    try:
        cpu = t.cpu(maxphyaddr=maxphyaddr).replace(cr3=t.cr3 | (1 << bit))
    except ValueError:
        return
    assert_ok(t.walk(UW, cpu=cpu), gpa, 1)


@pytest.mark.parametrize("gva", [1 << 47, 0x0000_8000_0000_0000 | 0x1234, 0xFFFF_7FFF_FFFF_FFFF,
                                 0x8000_0000_0000_0000, 0x0001_0000_0000_0000,
                                 0x7FFF_FFFF_FFFF_FFFF, 0xFFFE_FFFF_FFFF_F000])
def test_non_canonical_4level(gva):
    """4-level: bits 63:48 must equal bit 47; #GP (NonCanonicalAddress), never #PF."""
    t = Tables(LONG4, gva & 0xFFFF_FFFF_FFFF)
    t.chain()
    before = t.mem.copy()
    for acc in ALL_ACCESSES:
        with pytest.raises(NonCanonicalAddress):
            walk(t.mem, t.cpu(), gva, acc)
        with pytest.raises(NonCanonicalAddress):
            walk_trace(t.mem, t.cpu(), gva, acc, set_ad=True)
    assert t.mem.same_as(before)


@pytest.mark.parametrize("gva", [1 << 56, 0x0100_0000_0000_0000, 0xFE00_0000_0000_0000,
                                 0x8000_0000_0000_0000, 0xFEFF_FFFF_FFFF_FFFF,
                                 0x7F00_0000_0000_0000])
def test_non_canonical_5level(gva):
    t = Tables(LONG5)
    t.chain()
    with pytest.raises(NonCanonicalAddress):
        walk(t.mem, t.cpu(), gva, R)
    with pytest.raises(NonCanonicalAddress):
        walk(t.mem, t.cpu(), gva, UW)


@pytest.mark.parametrize("gva", [0x0000_8000_0000_0000, 0x00FF_FFFF_FFFF_FFFF,
                                 0xFF00_0000_0000_0000, 0xFFFF_0000_1234_5678])
def test_5level_canonical(gva):
    t = Tables(LONG5, gva)
    gpa = t.chain()
    assert_ok(t.walk(R), gpa, 1)


def test_non_canonical_checked_before_memory_is_touched():
    """#GP comes before any walk (§4): even an empty memory or a bad CR3 gives the exception."""
    mem = GuestMemory(1)
    cpu = CpuState.build(LONG4, 0xFFFF_F000)
    with pytest.raises(NonCanonicalAddress):
        walk(mem, cpu, 1 << 63, R)


# Paging-structure entries outside guest memory read as not present (project convention).


@pytest.mark.parametrize("mode", PAGING_MODES)
def test_cr3_outside_memory_is_not_present(mode):
    t = Tables(mode)
    if mode == PAE:
        regs = (0x0F00_0000 | PTE_P,) * 4
        cpu = CpuState.build(PAE, t.cr3, pdptrs=regs)
        assert_fault(t.walk(UW, cpu=cpu), PFERR_W | PFERR_U, 2)
        return
    cpu = t.cpu().replace(cr3=0x0F00_0000)
    assert_fault(t.walk(UW, cpu=cpu), PFERR_W | PFERR_U, t.top)


@pytest.mark.parametrize("mode", PAGING_MODES)
def test_table_outside_memory_is_not_present(mode):
    t = Tables(mode)
    t.chain()
    # The PDE points at a page table far beyond the 16 pages of guest memory.
    t.set(2, 0x0F00_0000 | PWU)
    before = t.mem.copy()
    assert_fault(t.walk(UR), PFERR_U, 1)
    assert_fault(t.walk(X), 0, 1)
    assert t.mem.same_as(before)


def test_table_in_last_page_of_memory():
    """Only the entry read matters: a table whose page is the last one works."""
    t = Tables(LONG4, pages=16)
    gpa = t.chain()
    last = t.mem.size - 0x1000
    t.set(2, last | PWU)
    t.mem.write(last + index(LONG4, t.gva, 1) * 8, 8, FRAME[1] | PWU)
    assert_ok(t.walk(W), gpa, 1)


# ---------------------------------------------------------------------------------------------
# §7: order of evaluation


@pytest.mark.parametrize("mode", LONG_MODES)
def test_reserved_upper_beats_not_present_lower(mode):
    t = Tables(mode)
    t.chain(extra={3: 1 << 45})
    t.set(2, 0)
    t.set(1, 0)
    assert_fault(t.walk(UW), PFERR_P | PFERR_RSVD | PFERR_W | PFERR_U, 3)


@pytest.mark.parametrize("mode", LONG_MODES)
def test_not_present_upper_hides_reserved_lower(mode):
    t = Tables(mode)
    t.chain(extra={2: 1 << 45 | PTE_NX, 1: bits(51, 40)})
    t.set(3, t.get(3) & ~PTE_P)
    assert_fault(t.walk(UW, nxe=False), PFERR_W | PFERR_U, 3)


def test_pae_not_present_pde_hides_reserved_pte():
    t = Tables(PAE)
    t.chain(extra={1: 1 << 50})
    t.set(2, t.get(2) & ~PTE_P)
    assert_fault(t.walk(W), PFERR_W, 2)


@pytest.mark.parametrize("mode", EIGHT_BYTE_MODES)
def test_not_present_leaf_ignores_its_other_bits(mode):
    t = Tables(mode)
    t.chain()
    t.set(1, 0xFFFF_FFFF_FFFF_FFFE)
    assert_fault(t.walk(UR), PFERR_U, 1)
    t = Tables(BIT32)
    t.chain(leaf=2)
    t.set(2, 0xFFFF_FFFE)
    assert_fault(t.walk(UR, pse=True), PFERR_U, 2)


def _protection_violations(mode):
    """(description, extra bits on PTE or flags, cpu kwargs, access) that fault on rights."""
    cases = [
        ("user-on-supervisor", {1: PTE_P | PTE_W}, {}, UR),
        ("user-write-readonly", {1: PTE_P | PTE_U}, {}, UW),
        ("sup-write-readonly-wp", {1: PTE_P | PTE_U}, {"wp": True}, W),
        ("smep", {}, {"smep": True}, X),
        ("smap", {}, {"smap": True}, R),
    ]
    if mode != BIT32:
        cases.append(("nx", {1: PWU | PTE_NX}, {"nxe": True}, UX))
    if mode in LONG_MODES:
        cases.append(("pk", {}, {"pke": True, "pkru": 0xFFFFFFFF}, UR))
    return cases


def _reserved_bit(mode):
    """A reserved bit of a 4 KiB PTE in ``mode`` (none exists in 32-bit paging: use a PSE
    4 MiB leaf with bit 21 instead)."""
    return {PAE: 1 << 55, LONG4: 1 << 45, LONG5: 1 << 51}[mode]


@pytest.mark.parametrize("mode", PAGING_MODES)
def test_any_reserved_bit_beats_protection(mode):
    for name, flags, kw, acc in _protection_violations(mode):
        t = Tables(mode)
        # First: the violation alone faults with P=1 and no RSVD.
        if mode == BIT32:
            leaf, rsvd = 2, {2: 1 << 21}
            flags = {2: flags[1]} if flags else {}
        else:
            leaf, rsvd = 1, {1: _reserved_bit(mode)}
        t.chain(leaf=leaf, flags=flags)
        kw = dict(kw, pse=True)
        res = t.walk(acc, **kw)
        assert not res.ok and res.error_code & PFERR_P and not res.error_code & PFERR_RSVD, name
        t.chain(leaf=leaf, flags=flags, extra=rsvd)
        fetch_rep = acc.fetch and (kw.get("smep", False) or (kw.get("nxe") and mode != BIT32))
        assert_fault(t.walk(acc, **kw), PFERR_P | PFERR_RSVD | access_bits(acc, fetch_rep), leaf)


@pytest.mark.parametrize("mode", EIGHT_BYTE_MODES)
def test_upper_reserved_bit_beats_protection_below(mode):
    t = Tables(mode)
    t.chain(flags={1: PTE_P}, extra={2: PTE_NX})  # supervisor read-only PTE; NX reserved
    assert_fault(t.walk(UW, nxe=False), PFERR_P | PFERR_RSVD | PFERR_W | PFERR_U, 2)


# ---------------------------------------------------------------------------------------------
# §7: error-code bits


def _fault_setups(mode):
    """(name, setup(t) -> leaf level of the fault, kind) for not-present, reserved and
    protection faults."""
    def not_present(t):
        t.chain()
        t.set(1, 0)
        return 1, 0

    def upper_not_present(t):
        t.chain()
        t.set(t.top if mode != PAE else 2, 0)
        return (t.top if mode != PAE else 2), 0

    def reserved(t):
        if mode == BIT32:
            t.chain(leaf=2, extra={2: 1 << 21})
            return 2, PFERR_P | PFERR_RSVD
        t.chain(extra={1: _reserved_bit(mode)})
        return 1, PFERR_P | PFERR_RSVD

    return [("not-present", not_present), ("upper-not-present", upper_not_present),
            ("reserved", reserved)]


@pytest.mark.parametrize("mode", PAGING_MODES)
@pytest.mark.parametrize("nxe", [False, True])
@pytest.mark.parametrize("smep", [False, True])
@pytest.mark.parametrize("acc", ALL_ACCESSES, ids=ACC_IDS)
def test_error_code_access_bits(mode, nxe, smep, acc):
    """W/R, U/S and I/D describe the access, whatever the fault (§7). I/D only with SMEP or
    (PAE/long mode and NXE): 32-bit paging with NXE=1 and SMEP=0 reports no I/D."""
    fetch_rep = smep or (nxe and mode != BIT32)
    for _name, setup in _fault_setups(mode):
        t = Tables(mode)
        level, base = setup(t)
        cpu = t.cpu(nxe=nxe, smep=smep, pse=True)
        assert_fault(t.walk(acc, cpu=cpu), base | access_bits(acc, fetch_rep), level)


@pytest.mark.parametrize("mode", PAGING_MODES)
@pytest.mark.parametrize(("nxe", "smep"), [(False, False), (True, False), (False, True),
                                           (True, True)])
def test_fetch_protection_fault_id_bit(mode, nxe, smep):
    """User fetch from a supervisor page: P|U, plus I/D under the §7 rule."""
    t = Tables(mode)
    t.chain(flags={1: PTE_P | PTE_W})
    fetch_rep = smep or (nxe and mode != BIT32)
    res = t.walk(UX, nxe=nxe, smep=smep)
    assert_fault(res, PFERR_P | PFERR_U | (PFERR_FETCH if fetch_rep else 0), 1)


def test_32bit_nxe_without_smep_has_no_id_bit():
    t = Tables(BIT32)
    t.chain()
    t.set(1, 0)
    assert_fault(t.walk(X, nxe=True, smep=False), 0, 1)
    assert_fault(t.walk(UX, nxe=True, smep=False), PFERR_U, 1)
    t.chain(flags={1: PTE_P})
    assert_fault(t.walk(UX, nxe=True, smep=False), PFERR_P | PFERR_U, 1)
    # ...and the 4-byte entries have no XD bit: fetches work, rights have X.
    gpa = t.chain()
    assert_ok(t.walk(UX, nxe=True), gpa, 1, ACC_ALL)


# ---------------------------------------------------------------------------------------------
# §6: access rights


@pytest.mark.parametrize("mode", PAGING_MODES)
@pytest.mark.parametrize("where", ["pte", "pde"])
def test_user_supervisor_accumulates(mode, where):
    t = Tables(mode)
    level = 1 if where == "pte" else 2
    gpa = t.chain(flags={level: PTE_P | PTE_W})
    for acc in (UR, UW, UX):
        assert_fault(t.walk(acc), PFERR_P | access_bits(acc, False), 1)
    for acc in (R, W, X, IR, IUW):
        assert_ok(t.walk(acc), gpa, 1, ACC_W | ACC_X)


@pytest.mark.parametrize("mode", PAGING_MODES)
@pytest.mark.parametrize("where", ["pte", "pde"])
def test_read_only_accumulates_and_cr0_wp(mode, where):
    t = Tables(mode)
    level = 1 if where == "pte" else 2
    gpa = t.chain(flags={level: PTE_P | PTE_U})
    # User writes never succeed on a read-only page.
    for wp in (False, True):
        assert_fault(t.walk(UW, wp=wp), PFERR_P | PFERR_W | PFERR_U, 1)
        assert_ok(t.walk(UR, wp=wp), gpa, 1, ACC_U | ACC_X)
    # Supervisor writes: only CR0.WP=1 checks R/W (on user and supervisor pages alike).
    assert_fault(t.walk(W, wp=True), PFERR_P | PFERR_W, 1)
    assert_fault(t.walk(IUW, wp=True), PFERR_P | PFERR_W, 1)
    assert_ok(t.walk(W, wp=False), gpa, 1, ACC_U | ACC_X)
    assert_ok(t.walk(IW, wp=False), gpa, 1, ACC_U | ACC_X)
    t.chain(flags={level: PTE_P})
    assert_fault(t.walk(W, wp=True), PFERR_P | PFERR_W, 1)
    assert_ok(t.walk(W, wp=False), gpa, 1, ACC_X)


@pytest.mark.parametrize("mode", PAGING_MODES)
def test_smep(mode):
    t = Tables(mode)
    gpa = t.chain()
    fetch_bit = PFERR_FETCH  # SMEP=1 always reports I/D
    assert_fault(t.walk(X, smep=True), PFERR_P | fetch_bit, 1)
    assert_ok(t.walk(X, smep=False), gpa, 1)
    assert_ok(t.walk(UX, smep=True), gpa, 1)
    # SMEP concerns fetches only.
    for acc in (R, W, IR, IW):
        assert_ok(t.walk(acc, smep=True), gpa, 1)
    # A supervisor entry anywhere makes the page supervisor: no SMEP fault.
    gpa = t.chain(flags={2: PTE_P | PTE_W})
    assert_ok(t.walk(X, smep=True), gpa, 1)
    assert_fault(t.walk(UX, smep=True), PFERR_P | PFERR_U | PFERR_FETCH, 1)


@pytest.mark.parametrize("mode", PAGING_MODES)
def test_smep_with_large_pages(mode):
    t = Tables(mode)
    t.chain(leaf=2)
    assert_fault(t.walk(X, smep=True, pse=True), PFERR_P | PFERR_FETCH, 2)


@pytest.mark.parametrize("mode", PAGING_MODES)
def test_smap(mode):
    t = Tables(mode)
    gpa = t.chain()
    for ac in (False, True):
        for acc in (R, W):
            res = t.walk(acc, smap=True, eflags_ac=ac)
            if ac:
                assert_ok(res, gpa, 1)
            else:
                assert_fault(res, PFERR_P | access_bits(acc, False), 1)
        # Implicit supervisor accesses are always checked, even with AC=1 and `user` set.
        for acc in (IR, IW, IUR, IUW):
            assert_fault(t.walk(acc, smap=True, eflags_ac=ac), PFERR_P | access_bits(acc, False),
                         1)
        # User accesses and fetches are not SMAP's business.
        for acc in (UR, UW, UX, X):
            assert_ok(t.walk(acc, smap=True, eflags_ac=ac), gpa, 1)
    # SMAP off: everything is allowed.
    for acc in ALL_ACCESSES:
        assert_ok(t.walk(acc, smap=False), gpa, 1)
    # Supervisor pages are not SMAP's business.
    gpa = t.chain(flags={1: PTE_P | PTE_W})
    for acc in (R, W, IR, IW, IUW):
        assert_ok(t.walk(acc, smap=True), gpa, 1)


@pytest.mark.parametrize("mode", PAGING_MODES)
def test_smap_and_wp_together(mode):
    t = Tables(mode)
    gpa = t.chain(flags={1: PTE_P | PTE_U})  # user, read-only
    # WP=0 lets the supervisor ignore R/W, but SMAP still applies unless AC=1 (explicit).
    assert_fault(t.walk(W, wp=False, smap=True), PFERR_P | PFERR_W, 1)
    assert_ok(t.walk(W, wp=False, smap=True, eflags_ac=True), gpa, 1, ACC_U | ACC_X)
    assert_fault(t.walk(IW, wp=False, smap=True, eflags_ac=True), PFERR_P | PFERR_W, 1)
    # WP=1: AC does not make a read-only page writable.
    assert_fault(t.walk(W, wp=True, smap=True, eflags_ac=True), PFERR_P | PFERR_W, 1)


def test_eflags_ac_without_smap_changes_nothing():
    t = Tables(LONG4)
    gpa = t.chain(flags={1: PTE_P})
    assert_fault(t.walk(UR, eflags_ac=True), PFERR_P | PFERR_U, 1)
    assert_fault(t.walk(W, eflags_ac=True), PFERR_P | PFERR_W, 1)
    assert_ok(t.walk(R, eflags_ac=True), gpa, 1)


@pytest.mark.parametrize("mode", PAGING_MODES)
def test_rights_reported(mode):
    t = Tables(mode)
    cases = [({}, ACC_ALL), ({1: PTE_P | PTE_W}, ACC_W | ACC_X),
             ({2: PTE_P | PTE_U}, ACC_U | ACC_X), ({2: PTE_P, 1: PTE_P | PTE_U | PTE_W}, ACC_X)]
    for flags, rights in cases:
        gpa = t.chain(flags=flags)
        assert_ok(t.walk(R), gpa, 1, rights)
    if mode != BIT32:
        gpa = t.chain(extra={2: PTE_NX})
        assert_ok(t.walk(R, nxe=True), gpa, 1, ACC_U | ACC_W)


@pytest.mark.parametrize("mode", PAGING_MODES)
def test_rights_reported_on_protection_fault(mode):
    t = Tables(mode)
    t.chain(flags={1: PTE_P | PTE_U})          # user, read-only
    res = t.walk(UW)
    assert_fault(res, PFERR_P | PFERR_W | PFERR_U, 1)
    assert res.rights == ACC_U | ACC_X


@pytest.mark.parametrize("mode", PAGING_MODES)
def test_rights_zero_when_walk_stops_before_leaf(mode):
    t = Tables(mode)
    t.chain()
    t.set(1, 0)
    res = t.walk(R)
    assert_fault(res, 0, 1)
    assert res.rights == 0


# §6: protection keys (long mode)


def _pk(key: int, ad: bool = False, wd: bool = False) -> int:
    return (ad << (2 * key)) | (wd << (2 * key + 1))


def _pk_tables(mode, key, leaf=1, flags=None):
    t = Tables(mode)
    gpa = t.chain(leaf=leaf, flags=flags, extra={leaf: key << 59})
    return t, gpa


@pytest.mark.parametrize("mode", LONG_MODES)
@pytest.mark.parametrize("key", [0, 1, 7, 15])
def test_pk_access_disable(mode, key):
    t, gpa = _pk_tables(mode, key)
    kw = {"pke": True, "pkru": _pk(key, ad=True)}
    assert_fault(t.walk(UR, **kw), PFERR_P | PFERR_U | PFERR_PK, 1)
    assert_fault(t.walk(UW, **kw), PFERR_P | PFERR_W | PFERR_U | PFERR_PK, 1)
    # Supervisor data accesses to user-mode addresses too (SMAP off), WP irrelevant for AD.
    for wp in (False, True):
        assert_fault(t.walk(R, wp=wp, **kw), PFERR_P | PFERR_PK, 1)
        assert_fault(t.walk(W, wp=wp, **kw), PFERR_P | PFERR_W | PFERR_PK, 1)
        assert_fault(t.walk(IR, wp=wp, **kw), PFERR_P | PFERR_PK, 1)
    # Never fetches.
    assert_ok(t.walk(UX, **kw), gpa, 1)
    assert_ok(t.walk(X, **kw), gpa, 1)
    # Other keys' bits do not matter.
    other = (key + 1) % 16
    t2, gpa2 = _pk_tables(mode, other)
    assert_ok(t2.walk(UW, **kw), gpa2, 1)
    # PKE=0: keys are ignored bits.
    assert_ok(t.walk(UW, pke=False, pkru=_pk(key, ad=True)), gpa, 1)


@pytest.mark.parametrize("mode", LONG_MODES)
@pytest.mark.parametrize("key", [0, 3, 8, 15])
def test_pk_write_disable(mode, key):
    t, gpa = _pk_tables(mode, key)
    kw = {"pke": True, "pkru": _pk(key, wd=True)}
    for wp in (False, True):
        assert_ok(t.walk(UR, wp=wp, **kw), gpa, 1)
        assert_ok(t.walk(R, wp=wp, **kw), gpa, 1)
        assert_fault(t.walk(UW, wp=wp, **kw), PFERR_P | PFERR_W | PFERR_U | PFERR_PK, 1)
        assert_ok(t.walk(UX, wp=wp, **kw), gpa, 1)
    # Supervisor writes: only with CR0.WP=1.
    assert_fault(t.walk(W, wp=True, **kw), PFERR_P | PFERR_W | PFERR_PK, 1)
    assert_fault(t.walk(IW, wp=True, **kw), PFERR_P | PFERR_W | PFERR_PK, 1)
    assert_ok(t.walk(W, wp=False, **kw), gpa, 1)
    assert_ok(t.walk(IUW, wp=False, **kw), gpa, 1)


@pytest.mark.parametrize("mode", LONG_MODES)
def test_pk_never_applies_to_supervisor_pages(mode):
    for where in (1, 2):
        t = Tables(mode)
        gpa = t.chain(flags={where: PTE_P | PTE_W}, extra={1: 5 << 59})
        kw = {"pke": True, "pkru": 0xFFFFFFFF}
        for acc in (R, W, IR, IW):
            assert_ok(t.walk(acc, **kw), gpa, 1)
        # A user access to a supervisor page faults on U/S, without PK.
        assert_fault(t.walk(UR, **kw), PFERR_P | PFERR_U, 1)
        assert_fault(t.walk(UW, **kw), PFERR_P | PFERR_W | PFERR_U, 1)


@pytest.mark.parametrize("mode", LONG_MODES)
def test_pk_bit_set_even_when_rw_also_forbids(mode):
    t, _ = _pk_tables(mode, 2, flags={1: PTE_P | PTE_U})  # read-only user page
    kw = {"pke": True, "pkru": _pk(2, wd=True)}
    assert_fault(t.walk(UW, **kw), PFERR_P | PFERR_W | PFERR_U | PFERR_PK, 1)
    assert_fault(t.walk(W, wp=True, **kw), PFERR_P | PFERR_W | PFERR_PK, 1)
    kw = {"pke": True, "pkru": _pk(2, ad=True)}
    assert_fault(t.walk(UW, **kw), PFERR_P | PFERR_W | PFERR_U | PFERR_PK, 1)
    # ...and when SMAP also forbids.
    t, _ = _pk_tables(mode, 2)
    assert_fault(t.walk(R, smap=True, **kw), PFERR_P | PFERR_PK, 1)


@pytest.mark.parametrize("mode", LONG_MODES)
def test_pk_only_the_leaf_key_counts(mode):
    # Keys in non-leaf entries are ignored bits.
    t = Tables(mode)
    gpa = t.chain(extra={2: 9 << 59, 3: 9 << 59, 4: 9 << 59})
    assert_ok(t.walk(UW, pke=True, pkru=_pk(9, ad=True)), gpa, 1)
    assert_fault(t.walk(UW, pke=True, pkru=_pk(0, ad=True)), PFERR_P | PFERR_W | PFERR_U | PFERR_PK,
                 1)


@pytest.mark.parametrize("mode", LONG_MODES)
@pytest.mark.parametrize("leaf", [2, 3])
def test_pk_large_pages(mode, leaf):
    t, gpa = _pk_tables(mode, 11, leaf=leaf)
    assert_fault(t.walk(UR, pke=True, pkru=_pk(11, ad=True)), PFERR_P | PFERR_U | PFERR_PK, leaf)
    assert_ok(t.walk(UR, pke=True, pkru=_pk(11, wd=True)), gpa, leaf)


@pytest.mark.parametrize("mode", [BIT32])
def test_pk_has_no_effect_outside_long_mode(mode):
    t = Tables(mode)
    gpa = t.chain()
    cpu = CpuState(cr0=CR0_PG | CR0_PE | CR0_WP, cr3=t.cr3, cr4=CR4_PKE, pkru=0xFFFFFFFF)
    for acc in (UR, UW, R, W):
        assert_ok(t.walk(acc, cpu=cpu), gpa, 1)


def test_pk_fault_is_not_reported_on_reserved_or_not_present():
    t, _ = _pk_tables(LONG4, 1)
    t.set(1, t.get(1) | (1 << 47))
    assert_fault(t.walk(UR, pke=True, pkru=0xFFFFFFFF), PFERR_P | PFERR_RSVD | PFERR_U, 1)
    t.set(1, t.get(1) & ~PTE_P)
    assert_fault(t.walk(UR, pke=True, pkru=0xFFFFFFFF), PFERR_U, 1)


# ---------------------------------------------------------------------------------------------
# §8: accessed and dirty flags


def _entry_values(t: Tables, leaf: int) -> list[int]:
    return [t.mem.read(gpa, size) for gpa, size in t.walked_entries(leaf)]


def _leaves(mode):
    return {BIT32: (1, 2), PAE: (1, 2), LONG4: (1, 2, 3), LONG5: (1, 2, 3)}[mode]


@pytest.mark.parametrize("mode", PAGING_MODES)
@pytest.mark.parametrize("acc", ALL_ACCESSES, ids=ACC_IDS)
def test_ad_set_on_success(mode, acc):
    for leaf in _leaves(mode):
        t = Tables(mode)
        gpa = t.chain(leaf=leaf)
        before = t.mem.copy()
        entries_before = _entry_values(t, leaf)
        assert_ok(t.walk(acc, pse=True), gpa, leaf)
        after = _entry_values(t, leaf)
        for i, (old, new) in enumerate(zip(entries_before, after, strict=True)):
            is_leaf = i == len(after) - 1
            expect = old | PTE_A | (PTE_D if is_leaf and acc.write else 0)
            assert new == expect, (leaf, i, hex(old), hex(new))
        # Nothing else in memory changed (PAE PDPT included).
        changed = set(t.mem.differences(before, limit=64))
        allowed = {g + k for g, s in t.walked_entries(leaf) for k in range(s)}
        assert changed <= allowed


@pytest.mark.parametrize("mode", PAGING_MODES)
def test_ad_bits_are_sticky_and_preserve_other_bits(mode):
    t = Tables(mode)
    hi = (bits(62, 52) if mode in LONG_MODES else 0) | bits(11, 9) | PTE_PWT | PTE_PCD
    gpa = t.chain(extra={1: hi | PTE_A | PTE_D | PTE_G, 2: hi})
    assert_ok(t.walk(R), gpa, 1)
    assert t.get(1) == FRAME[1] | PWU | hi | PTE_A | PTE_D | PTE_G
    assert t.get(2) == table_gpa(1) | PWU | hi | PTE_A


@pytest.mark.parametrize("mode", PAGING_MODES)
def test_dirty_only_in_leaf(mode):
    for leaf in _leaves(mode):
        t = Tables(mode)
        gpa = t.chain(leaf=leaf)
        assert_ok(t.walk(W, pse=True), gpa, leaf)
        for level in range(t.top if mode != PAE else 2, leaf - 1, -1):
            v = t.get(level)
            assert v & PTE_A, level
            assert bool(v & PTE_D) == (level == leaf), (leaf, level, hex(v))


def test_nx_leaf_keeps_nx_after_ad_update():
    t = Tables(LONG4)
    gpa = t.chain(extra={1: PTE_NX | (3 << 59)})
    assert_ok(t.walk(W, nxe=True), gpa, 1)
    assert t.get(1) == FRAME[1] | PWU | PTE_NX | (3 << 59) | PTE_A | PTE_D


def test_32bit_ad_update_writes_only_4_bytes():
    """32-bit entries are 4 bytes: neighbours of the entries walked must stay intact."""
    t = Tables(BIT32)
    gpa = t.chain()
    for level in (2, 1):
        t.mem.write(t.entry_gpa(level) + 4, 4, 0xDEADBEEF & ~1)
        t.mem.write(t.entry_gpa(level) - 4, 4, 0xCAFEF00D & ~1)
    before = t.mem.copy()
    assert_ok(t.walk(W), gpa, 1)
    for level in (2, 1):
        assert t.mem.read(t.entry_gpa(level) + 4, 4) == 0xDEADBEEF & ~1
        assert t.mem.read(t.entry_gpa(level) - 4, 4) == 0xCAFEF00D & ~1
    diffs = t.mem.differences(before, limit=64)
    assert sorted(diffs) == sorted([t.entry_gpa(2), t.entry_gpa(1)])  # only the low byte each


def _faulting_walks(mode):
    """Walks that fault for every reason the spec lists."""
    out = []

    def add(name, acc, kw, setup):
        out.append((name, acc, kw, setup))

    add("pte-not-present", UW, {}, lambda t: (t.chain(), t.set(1, 0)))
    add("top-not-present", R, {}, lambda t: (t.chain(), t.set(2 if mode == PAE else t.top, 0)))
    add("user-on-sup", UR, {}, lambda t: t.chain(flags={1: PTE_P | PTE_W}))
    add("write-ro", UW, {}, lambda t: t.chain(flags={2: PTE_P | PTE_U}))
    add("sup-write-ro", W, {"wp": True}, lambda t: t.chain(flags={1: PTE_P | PTE_U}))
    add("smep", X, {"smep": True}, lambda t: t.chain())
    add("smap", W, {"smap": True}, lambda t: t.chain())
    add("smap-implicit", IR, {"smap": True, "eflags_ac": True}, lambda t: t.chain())
    if mode == BIT32:
        add("rsvd", W, {"pse": True}, lambda t: t.chain(leaf=2, extra={2: 1 << 21}))
    else:
        add("rsvd-leaf", W, {}, lambda t: t.chain(extra={1: PTE_NX}))
        add("rsvd-pde", W, {}, lambda t: t.chain(extra={2: 1 << 50}))
        add("nx", UX, {"nxe": True}, lambda t: t.chain(extra={1: PTE_NX}))
        add("rsvd-large", UW, {}, lambda t: t.chain(leaf=2, extra={2: 1 << 14}))
    if mode in LONG_MODES:
        add("pk", UW, {"pke": True, "pkru": 0xFFFFFFFF}, lambda t: t.chain())
        add("pk-wd", W, {"pke": True, "pkru": 0xAAAAAAAA}, lambda t: t.chain())
        add("rsvd-1g", W, {}, lambda t: t.chain(leaf=3, extra={3: 1 << 20}))
    return out


@pytest.mark.parametrize("mode", PAGING_MODES)
def test_no_memory_change_on_any_fault(mode):
    for name, acc, kw, setup in _faulting_walks(mode):
        t = Tables(mode)
        setup(t)
        before = t.mem.copy()
        res = t.walk(acc, **kw)
        assert not res.ok, name
        assert t.mem.same_as(before), (name, t.mem.differences(before))
        res2, _ = walk_trace(t.mem, t.cpu(**kw), t.gva, acc, set_ad=True)
        assert res2 == res, name
        assert t.mem.same_as(before), name


@pytest.mark.parametrize("mode", PAGING_MODES)
@pytest.mark.parametrize("acc", [R, W, UW, X], ids=["r", "w", "uw", "x"])
def test_set_ad_false_never_changes_memory(mode, acc):
    for leaf in _leaves(mode):
        t = Tables(mode)
        gpa = t.chain(leaf=leaf)
        before = t.mem.copy()
        cpu = t.cpu(pse=True)
        assert_ok(walk(t.mem, cpu, t.gva, acc, set_ad=False), gpa, leaf)
        assert_ok(walk_trace(t.mem, cpu, t.gva, acc)[0], gpa, leaf)
        assert_ok(walk_trace(t.mem, cpu, t.gva, acc, set_ad=False)[0], gpa, leaf)
        assert t.mem.same_as(before)
        # walk_trace with set_ad=True does update, like walk.
        res, steps = walk_trace(t.mem, cpu, t.gva, acc, set_ad=True)
        assert_ok(res, gpa, leaf)
        assert steps
        assert t.get(leaf) & PTE_A
        assert bool(t.get(leaf) & PTE_D) == acc.write


def test_aliasing_entry_used_at_two_non_leaf_levels():
    """PML4[0] is used as PML4E and as PDPTE; PML4[5] as the PDE."""
    mem = GuestMemory(4)
    cr3 = 0x1000
    mem.write(cr3, 8, cr3 | PWU)
    mem.write(cr3 + 5 * 8, 8, 0x2000 | PWU)
    mem.write(0x2000 + 7 * 8, 8, 0x3000 | PWU | PTE_NX)
    cpu = CpuState.build(LONG4, cr3, nxe=True)
    gva = (5 << 21) | (7 << 12) | 0x9
    assert_ok(walk(mem, cpu, gva, UW), 0x3009, 1, ACC_U | ACC_W)
    assert mem.read(cr3, 8) == cr3 | PWU | PTE_A
    assert mem.read(cr3 + 40, 8) == 0x2000 | PWU | PTE_A
    assert mem.read(0x2000 + 56, 8) == 0x3000 | PWU | PTE_NX | PTE_A | PTE_D


@pytest.mark.parametrize("acc", [R, W, UW], ids=["r", "w", "uw"])
def test_aliasing_self_referencing_pml4e(acc):
    """PML4[0] points at the PML4 itself: one entry serves as PML4E, PDPTE, PDE and PTE. The
    walk must succeed and leave A (and D for a write: it is also the leaf) set."""
    mem = GuestMemory(4)
    cr3 = 0x1000
    mem.write(cr3, 8, cr3 | PWU)
    cpu = CpuState.build(LONG4, cr3)
    res = walk(mem, cpu, 0x123, acc)
    assert_ok(res, cr3 | 0x123, 1, ACC_ALL)
    expect = cr3 | PWU | PTE_A | (PTE_D if acc.write else 0)
    assert mem.read(cr3, 8) == expect
    # Walking again changes nothing.
    before = mem.copy()
    assert walk(mem, cpu, 0x123, acc) == res
    assert mem.same_as(before)


def test_aliasing_32bit_pde_maps_page_directory():
    """A PDE that points at the page directory itself is both PDE and PTE."""
    mem = GuestMemory(4)
    mem.write(0x2000, 4, 0x2000 | PWU)
    cpu = CpuState.build(BIT32, 0x2000)
    assert_ok(walk(mem, cpu, 0xABC, W), 0x2ABC, 1)
    assert mem.read(0x2000, 4) == 0x2000 | PWU | PTE_A | PTE_D


def test_aliasing_recursive_slot():
    """Recursive mapping through PML4[511]: PML4 entries are used as PDPTEs, PDPTEs as PDEs
    and a PDE as the PTE. All end with A set, D only on the entry used as leaf."""
    mem = GuestMemory(8)
    cr3 = 0x1000
    mem.write(cr3 + 511 * 8, 8, cr3 | PWU)   # recursive slot
    mem.write(cr3 + 1 * 8, 8, 0x2000 | PWU)  # PML4[1] -> PDPT
    mem.write(0x2000 + 2 * 8, 8, 0x3000 | PWU)  # PDPT[2] -> PD
    mem.write(0x3000 + 3 * 8, 8, 0x4000 | PWU)  # PD[3] -> frame 0x4000 as "PT"
    # gva: PML4 511, PDPT 1, PD 2, PT 3 -> walks PML4[511], PML4[1], PDPT[2], PD[3]; the last
    # is used as a PTE mapping frame 0x4000.
    gva = 0xFFFF_0000_0000_0000 | (511 << 39) | (1 << 30) | (2 << 21) | (3 << 12) | 0x56
    cpu = CpuState.build(LONG4, cr3)
    assert_ok(walk(mem, cpu, gva, W), 0x4056, 1)
    assert mem.read(cr3 + 511 * 8, 8) == cr3 | PWU | PTE_A
    assert mem.read(cr3 + 8, 8) == 0x2000 | PWU | PTE_A
    assert mem.read(0x2000 + 16, 8) == 0x3000 | PWU | PTE_A
    assert mem.read(0x3000 + 24, 8) == 0x4000 | PWU | PTE_A | PTE_D


# ---------------------------------------------------------------------------------------------
# Misc API behaviour


def test_walk_level_on_faults():
    t = Tables(LONG5)
    t.chain()
    for level in (5, 4, 3, 2, 1):
        t.chain()
        t.set(level, 0)
        assert_fault(t.walk(R), 0, level)


def test_walk_trace_agrees_with_walk():
    for mode in PAGING_MODES:
        t = Tables(mode)
        t.chain()
        for acc in ALL_ACCESSES:
            for kw in ({}, {"smap": True}, {"smep": True}):
                cpu = t.cpu(**kw)
                before = t.mem.copy()
                res, steps = walk_trace(t.mem, cpu, t.gva, acc)
                assert t.mem.same_as(before)
                assert res == walk(t.mem, cpu, t.gva, acc, set_ad=False)
                assert len(steps) >= 1


def test_access_rejects_write_and_fetch():
    with pytest.raises(ValueError):
        Access(write=True, fetch=True)


def test_user_bit_of_implicit_access_is_clear_in_error_code():
    t = Tables(LONG4)
    t.chain()
    t.set(1, 0)
    assert_fault(t.walk(IUW), PFERR_W, 1)
    assert_fault(t.walk(IUR), 0, 1)


def test_all_modes_translate_with_build_labels():
    for label, mode in (("32bit", BIT32), ("pae", PAE), ("4level", LONG4), ("5level", LONG5)):
        t = Tables(label)
        assert t.mode == mode
        gpa = t.chain()
        cpu = CpuState.build(label, t.cr3, mem=t.mem)
        assert cpu.mode == mode
        assert_ok(walk(t.mem, cpu, t.gva, UW), gpa, 1)


def test_efer_nxe_cr4_bits_in_raw_cpustate():
    """CpuState built by hand behaves like CpuState.build."""
    t = Tables(LONG4)
    gpa = t.chain(extra={1: PTE_NX})
    cpu = CpuState(cr0=CR0_PG | CR0_PE | CR0_WP, cr3=t.cr3, cr4=CR4_PAE,
                   efer=EFER_LME | EFER_NXE)
    assert cpu.mode == LONG4
    assert_ok(walk(t.mem, cpu, t.gva, R), gpa, 1, ACC_U | ACC_W)
    assert_fault(walk(t.mem, cpu, t.gva, X), PFERR_P | PFERR_FETCH, 1)
    cpu = cpu.replace(cr4=CR4_PAE | CR4_SMAP | CR4_SMEP)
    assert_fault(walk(t.mem, cpu, t.gva, R), PFERR_P, 1)
