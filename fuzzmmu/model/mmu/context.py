"""The per-vCPU MMU context (struct kvm_mmu): CPU role, root role, guest reserved bits,
permission bitmap, and the roots (mmu.c: kvm_init_mmu, kvm_mmu_load/unload, mmu_alloc_*_roots,
kvm_mmu_free_roots, kvm_mmu_new_pgd, kvm_mmu_sync_roots, kvm_mmu_invalidate_addr).

Guests that do not use 64-bit paging are shadowed with PAE-shaped tables: four level-2 roots
in ``pae_root`` (KVM's special root, not a shadow page). Long-mode guests get one root page.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Final

from fuzzmmu.arch.bits import (
    ACC_ALL,
    ACC_U,
    ACC_W,
    ACC_X,
    CR0_PG,
    CR0_WP,
    CR4_LA57,
    CR4_PAE,
    CR4_PSE,
    CR4_SMAP,
    CR4_SMEP,
    EFER_LMA,
    EFER_NXE,
    PAGE_SHIFT,
    PFERR_FETCH,
    PFERR_RSVD,
    PFERR_U,
    PFERR_W,
    bits,
)
from fuzzmmu.model.mmu import role as R
from fuzzmmu.model.mmu import spte as S
from fuzzmmu.model.mmu.internal import ModelError
from fuzzmmu.model.mmu.mmu import KvmMmu
from fuzzmmu.model.mmu.page import ShadowPage
from fuzzmmu.model.mmu.role import DIRECT, make_role, with_level, with_quadrant

if TYPE_CHECKING:
    from fuzzmmu.model.x86 import Vcpu

INVALID_PAGE: Final = -1
PAE_ROOT: Final = -2  # root.hpa of the special pae_root page
DUMMY_ROOT: Final = -3  # kvm_mmu_get_dummy_root(): CR3 outside every memslot
PT32E_ROOT_LEVEL: Final = 3
NUM_PREV_ROOTS: Final = 3
ROOT_CURRENT: Final = 1
ROOTS_ALL: Final = 0b1111


class CpuRole:
    """union kvm_cpu_role: the base role of the guest's paging mode plus the ext bits. (A
    plain class: one is made per MMU context reset, and a NamedTuple is built by a
    Python-level ``__new__``.)"""

    __slots__ = ("base", "level", "lma", "nx", "pae", "pg", "pse", "smap", "smep", "wp")

    def __init__(self, base: int, level: int, pg: bool, pae: bool, pse: bool, smep: bool,
                 smap: bool, wp: bool, nx: bool, lma: bool) -> None:
        self.base = base
        self.level = level  # guest paging levels, 0 without paging
        self.pg = pg
        self.pae = pae
        self.pse = pse
        self.smep = smep
        self.smap = smap
        self.wp = wp
        self.nx = nx  # EFER.NXE as the walker sees it
        self.lma = lma

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CpuRole):
            return NotImplemented
        return (self.base == other.base and self.level == other.level and self.pg == other.pg
                and self.pae == other.pae and self.pse == other.pse
                and self.smep == other.smep and self.smap == other.smap and self.wp == other.wp
                and self.nx == other.nx and self.lma == other.lma)

    def __hash__(self) -> int:
        return hash((self.base, self.level, self.pg, self.pae, self.pse, self.smep, self.smap,
                     self.wp, self.nx, self.lma))

    def __repr__(self) -> str:
        return (f"CpuRole(base={self.base:#x}, level={self.level}, pg={self.pg}, "
                f"pae={self.pae}, pse={self.pse}, smep={self.smep}, smap={self.smap}, "
                f"wp={self.wp}, nx={self.nx}, lma={self.lma})")


def kvm_calc_cpu_role(cr0: int, cr4: int, efer: int, smm: int) -> CpuRole:
    """kvm_calc_cpu_role()."""
    if not cr0 & CR0_PG:
        base = make_role(0, direct=True, access=ACC_ALL, smm=smm)
        return CpuRole(base, 0, False, False, False, False, False, False, False, False)
    wp = bool(cr0 & CR0_WP)
    nx = bool(efer & EFER_NXE)
    smep = bool(cr4 & CR4_SMEP)
    smap = bool(cr4 & CR4_SMAP)
    pae = bool(cr4 & CR4_PAE)
    lma = bool(efer & EFER_LMA)
    level = (5 if cr4 & CR4_LA57 else 4) if lma else (3 if pae else 2)
    pse = bool(cr4 & CR4_PSE)
    base = make_role(level, has_4_byte_gpte=not pae, access=ACC_ALL, efer_nx=nx, cr0_wp=wp,
                     smep_andnot_wp=smep and not wp, smap_andnot_wp=smap and not wp,
                     cr4_pse=pse and not pae, long_mode=lma, smm=smm)
    return CpuRole(base, level, True, pae, pse, smep, smap, wp, nx, lma)


class MmuContext:
    """struct kvm_mmu for the shadow MMU of one vCPU."""

    __slots__ = ("cpu_role", "pae_root", "pdptrs", "permissions", "prev_roots", "root_hpa",
                 "root_pgd", "root_role", "rsvd")

    def __init__(self) -> None:
        self.cpu_role: CpuRole | None = None
        self.root_role = 0
        self.root_hpa = INVALID_PAGE
        self.root_pgd = 0
        self.pae_root = [0, 0, 0, 0]  # hpa | P of each level-2 root, 0 when invalid
        self.prev_roots: list[tuple[int, int]] = [(0, INVALID_PAGE)] * NUM_PREV_ROOTS
        self.permissions: tuple[int, ...] = (0,) * 16
        self.rsvd: tuple[tuple[int, ...], tuple[int, ...]] = ((0,) * 6, (0,) * 6)
        self.pdptrs = [0, 0, 0, 0]

    @property
    def root_valid(self) -> bool:
        return self.root_hpa != INVALID_PAGE


# ---------------------------------------------------------------------- context init


def calc_root_role(kvm: KvmMmu, cpu_role: CpuRole) -> int:
    """kvm_init_shadow_mmu()'s root role: PAE-shaped shadow below 64-bit paging.

    Modern KVM forces efer_nx=1 here, so shadow pages are shared across guest EFER.NXE; a gpte
    with bit 63 then stays mapped after the guest clears NXE, where the SDM wants a reserved-bit
    #PF. The model keeps the guest's NXE in the role (the 2009 fix, 9645bb56b31a); the
    efer-nxe-not-in-role mutant is the shared-role behaviour.
    """
    role = with_level(cpu_role.base, max(cpu_role.level, PT32E_ROOT_LEVEL))
    bugs = kvm.bugs
    if bugs.efer_nx_not_in_role and not role & DIRECT:
        role |= R.EFER_NX  # forced, as in kvm_init_shadow_mmu() since 2021
    if bugs.cr0_wp_not_in_role:
        role &= ~R.CR0_WP
    if bugs.smap_andnot_wp_not_in_role:
        role &= ~R.SMAP_ANDNOT_WP
    if bugs.cr4_pse_not_in_role:
        role &= ~R.CR4_PSE
    if bugs.pae_shares_long_mode_pages:
        role &= ~R.LONG_MODE
    return role


def reset_rsvds_bits_mask(cpu_role: CpuRole, maxphyaddr: int
                          ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """__reset_rsvds_bits_mask() for the guest walker: [PS bit][level], Intel vendor, 1 GiB
    pages supported, PSE-36 assumed 36 bits wide (is_cpuid_PSE36())."""
    none = (0,) * 6
    if not cpu_role.pg:
        return none, none
    pa_rsvd = bits(63, maxphyaddr)
    if cpu_role.level == 2:
        pse_pde = bits(21, 17) if cpu_role.pse else 0
        return none, (0, 0, pse_pde, 0, 0, 0)
    high = pa_rsvd & bits(62 if cpu_role.level == 3 else 51, 0)
    if not cpu_role.nx:
        high |= 1 << 63
    if cpu_role.level == 3:
        pdpte = (1 << 63) | high | bits(8, 5) | bits(2, 1)
        small = (0, high, high, pdpte, 0, 0)
        large = (0, high, high | bits(20, 13), pdpte, 0, 0)
        return small, large
    top = high | (1 << 7)
    small = (0, high, high, high, top, top)
    large = (0, high, high | bits(20, 13), high | bits(29, 13), top, top)
    return small, large


def update_permission_bitmask(cpu_role: CpuRole) -> tuple[int, ...]:
    """update_permission_bitmask(): permissions[pfec >> 1] has bit ``acc`` set when an access
    with that error code to a page with ACC bits ``acc`` faults. The RSVD slot of the index
    means "SMAP overridden" (explicit supervisor access with EFLAGS.AC=1)."""
    return _permission_bitmask(cpu_role.nx, cpu_role.wp, cpu_role.smep, cpu_role.smap)


@functools.cache
def _permission_bitmask(nx: bool, wp: bool, smep: bool, smap: bool) -> tuple[int, ...]:
    x = _byte_mask(ACC_X)
    w = _byte_mask(ACC_W)
    u = _byte_mask(ACC_U)
    out = []
    for byte in range(16):
        pfec = byte << 1
        wf = (~w & 0xFF) if pfec & PFERR_W else 0
        uf = (~u & 0xFF) if pfec & PFERR_U else 0
        ff = (~x & 0xFF) if pfec & PFERR_FETCH else 0
        kf = 0 if pfec & PFERR_U else u
        if not nx:
            ff = 0
        if not wp:
            wf = wf if pfec & PFERR_U else 0
        smepf = (kf if pfec & PFERR_FETCH else 0) if smep else 0
        smapf = (0 if pfec & (PFERR_RSVD | PFERR_FETCH) else kf) if smap else 0
        out.append(ff | uf | wf | smepf | smapf)
    return tuple(out)


def _byte_mask(acc_bit: int) -> int:
    return sum(1 << a for a in range(8) if a & acc_bit)


def kvm_init_mmu(kvm: KvmMmu, vcpu: Vcpu) -> None:
    """kvm_init_mmu() -> kvm_init_shadow_mmu() -> shadow_mmu_init_context()."""
    cpu_role = kvm_calc_cpu_role(vcpu.cr0, vcpu.cr4, vcpu.efer, vcpu.smm)
    root_role = calc_root_role(kvm, cpu_role)
    mmu = vcpu.mmu
    if cpu_role == mmu.cpu_role and root_role == mmu.root_role:
        return
    mmu.cpu_role = cpu_role
    mmu.root_role = root_role
    mmu.rsvd = reset_rsvds_bits_mask(cpu_role, kvm.config.maxphyaddr)
    mmu.permissions = update_permission_bitmask(cpu_role)


def kvm_mmu_reset_context(kvm: KvmMmu, vcpu: Vcpu) -> None:
    kvm_mmu_unload(kvm, vcpu)
    kvm_init_mmu(kvm, vcpu)


# ---------------------------------------------------------------------- roots


def mmu_alloc_root(kvm: KvmMmu, vcpu: Vcpu, gfn: int, quadrant: int, level: int) -> int:
    role = with_quadrant(with_level(vcpu.mmu.root_role, level), quadrant)
    sp = kvm.kvm_mmu_get_shadow_page(gfn, role, vcpu)
    sp.root_count += 1
    return sp.hpfn << PAGE_SHIFT


def mmu_alloc_direct_roots(kvm: KvmMmu, vcpu: Vcpu) -> bool:
    mmu = vcpu.mmu
    if not kvm.make_mmu_pages_available():
        return False
    for i in range(4):
        mmu.pae_root[i] = mmu_alloc_root(kvm, vcpu, i << (30 - PAGE_SHIFT), 0, 2) | S.SPTE_P
    mmu.root_hpa = PAE_ROOT
    mmu.root_pgd = 0
    return True


def mmu_alloc_shadow_roots(kvm: KvmMmu, vcpu: Vcpu) -> bool:
    mmu = vcpu.mmu
    assert mmu.cpu_role is not None
    root_pgd = vcpu.cr3
    root_gfn = (root_pgd & S.SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT
    if mmu.cpu_role.level == 2:
        root_gfn = (root_pgd & 0xFFFFF000) >> PAGE_SHIFT
    # KVM checks the CR3 gfn in every mode; under PAE paging it only held the PDPT, which was
    # read at the PDPTE load, so the model checks it below PAE and in long mode only (else a PAE
    # guest whose PDPT page leaves the memslots retries its faults forever on a dummy root).
    check_cr3 = mmu.cpu_role.level != PT32E_ROOT_LEVEL or kvm.bugs.pae_root_needs_pdpt_memslot
    if (check_cr3 and kvm.slot_for(vcpu.smm, root_gfn) is None
            and not kvm.bugs.cr3_outside_memslots_trusted):
        mmu.root_hpa = DUMMY_ROOT
        mmu.root_pgd = root_pgd
        return True
    pdptrs = list(mmu.pdptrs)
    if mmu.cpu_role.level == PT32E_ROOT_LEVEL:
        for i in range(4):
            if pdptrs[i] & S.SPTE_P and kvm.slot_for(vcpu.smm, pdptrs[i] >> PAGE_SHIFT) is None:
                pdptrs[i] = 0
    if not kvm.make_mmu_pages_available():
        return False
    if mmu.cpu_role.level >= 4:
        mmu.root_hpa = mmu_alloc_root(kvm, vcpu, root_gfn, 0, mmu.cpu_role.level)
        mmu.root_pgd = root_pgd
        return True
    for i in range(4):
        if mmu.cpu_role.level == PT32E_ROOT_LEVEL:
            if not pdptrs[i] & S.SPTE_P:
                mmu.pae_root[i] = 0
                continue
            root_gfn = (pdptrs[i] & S.SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT
        quadrant = i if mmu.cpu_role.level == 2 else 0
        mmu.pae_root[i] = mmu_alloc_root(kvm, vcpu, root_gfn, quadrant, 2) | S.SPTE_P
    mmu.root_hpa = PAE_ROOT
    mmu.root_pgd = root_pgd
    return True


def kvm_mmu_load(kvm: KvmMmu, vcpu: Vcpu) -> bool:
    """kvm_mmu_load(): allocate the roots, sync them, then flush the current TLB (the
    provenance of the new root is unknown). False stands for -ENOSPC."""
    mmu = vcpu.mmu
    assert mmu.cpu_role is not None
    if mmu.root_role & DIRECT:
        ok = mmu_alloc_direct_roots(kvm, vcpu)
    else:
        ok = mmu_alloc_shadow_roots(kvm, vcpu)
    if not ok:
        return False
    if kvm.trace is not None:  # the detail only for a trace
        kvm.emit("load_root", None, f"vcpu{vcpu.id} pgd={mmu.root_pgd:#x}")
    kvm_mmu_sync_roots(kvm, vcpu)
    vcpu.tlb.clear()
    return True


def mmu_free_root_page(kvm: KvmMmu, hpa: int, invalid: list[ShadowPage]) -> None:
    sp = kvm.root_to_sp(hpa)
    if sp is None:
        raise ModelError(f"freeing root {hpa:#x} that is not a shadow page")
    sp.root_count -= 1
    if sp.root_count < 0:
        raise ModelError(f"root_count of {sp!r} went negative")
    if not sp.root_count and sp.invalid:
        kvm.kvm_mmu_prepare_zap_page(sp, invalid)


def kvm_mmu_free_roots(kvm: KvmMmu, vcpu: Vcpu, roots_to_free: int) -> None:
    mmu = vcpu.mmu
    invalid: list[ShadowPage] = []
    for i in range(NUM_PREV_ROOTS):
        if roots_to_free & (2 << i):
            hpa = mmu.prev_roots[i][1]
            if hpa >= 0:
                mmu_free_root_page(kvm, hpa, invalid)
            mmu.prev_roots[i] = (0, INVALID_PAGE)
    if roots_to_free & ROOT_CURRENT and mmu.root_valid:
        if mmu.root_hpa == PAE_ROOT:
            for i in range(4):
                if mmu.pae_root[i]:
                    mmu_free_root_page(kvm, mmu.pae_root[i] & S.SPTE_BASE_ADDR_MASK, invalid)
                    mmu.pae_root[i] = 0
        elif mmu.root_hpa >= 0:
            mmu_free_root_page(kvm, mmu.root_hpa, invalid)
        mmu.root_hpa = INVALID_PAGE
        mmu.root_pgd = 0
    kvm.kvm_mmu_commit_zap_page(invalid)


def kvm_mmu_unload(kvm: KvmMmu, vcpu: Vcpu) -> None:
    kvm_mmu_free_roots(kvm, vcpu, ROOTS_ALL)
    vcpu.clear_mmio_info()


def is_obsolete_root(kvm: KvmMmu, hpa: int) -> bool:
    """is_obsolete_root(): roots without a shadow page (PAE, dummy) count as obsolete."""
    if hpa == INVALID_PAGE:
        return False
    sp = kvm.root_to_sp(hpa) if hpa >= 0 else None
    return sp is None or kvm.is_obsolete_sp(sp)


def kvm_mmu_free_obsolete_roots(kvm: KvmMmu, vcpu: Vcpu) -> None:
    mmu = vcpu.mmu
    roots = ROOT_CURRENT if is_obsolete_root(kvm, mmu.root_hpa) else 0
    for i in range(NUM_PREV_ROOTS):
        if is_obsolete_root(kvm, mmu.prev_roots[i][1]):
            roots |= 2 << i
    if roots:
        kvm_mmu_free_roots(kvm, vcpu, roots)


def is_root_usable(kvm: KvmMmu, root: tuple[int, int], new_pgd: int, role: int) -> bool:
    pgd, hpa = root
    if hpa < 0:
        return False
    if not role & DIRECT and pgd != new_pgd:
        return False
    sp = kvm.root_to_sp(hpa)
    return sp is not None and sp.role == role


def fast_pgd_switch(kvm: KvmMmu, vcpu: Vcpu, new_pgd: int, role: int) -> bool:
    """fast_pgd_switch(): reuse only roots backed by a shadow page (64-bit guests); the
    special PAE and dummy roots are freed. prev_roots is an LRU cache of three."""
    mmu = vcpu.mmu
    if mmu.root_valid and mmu.root_hpa < 0:
        kvm_mmu_free_roots(kvm, vcpu, ROOT_CURRENT)
    if mmu.root_valid:
        # cached_root_find_and_keep_current(): the swaps rotate the current root into the
        # cache as the candidates come out of it.
        current = (mmu.root_pgd, mmu.root_hpa)
        if is_root_usable(kvm, current, new_pgd, role):
            return True
        for i in range(NUM_PREV_ROOTS):
            current, mmu.prev_roots[i] = mmu.prev_roots[i], current
            mmu.root_pgd, mmu.root_hpa = current
            if is_root_usable(kvm, current, new_pgd, role):
                return True
        kvm_mmu_free_roots(kvm, vcpu, ROOT_CURRENT)
        return False
    # cached_root_find_without_current()
    for i in range(NUM_PREV_ROOTS):
        if is_root_usable(kvm, mmu.prev_roots[i], new_pgd, role):
            mmu.root_pgd, mmu.root_hpa = mmu.prev_roots[i]
            del mmu.prev_roots[i]
            mmu.prev_roots.append((0, INVALID_PAGE))
            return True
    return False


def kvm_mmu_new_pgd(kvm: KvmMmu, vcpu: Vcpu, new_pgd: int) -> None:
    """__kvm_mmu_new_pgd(). A root built afresh gets its MMIO gva cache cleared by
    kvm_mmu_load()'s kvm_mmu_sync_roots(); a reused one skips that, so it is cleared here."""
    mmu = vcpu.mmu
    if not fast_pgd_switch(kvm, vcpu, new_pgd, mmu.root_role):
        return
    vcpu.clear_mmio_info()
    sp = kvm.root_to_sp(mmu.root_hpa)
    if sp is not None and not sp.direct:
        sp.write_flooding_count = 0


def is_unsync_root(kvm: KvmMmu, hpa: int) -> bool:
    """is_unsync_root(): a root page that is unsync or leads to unsync pages."""
    sp = kvm.root_to_sp(hpa) if hpa >= 0 else None
    return sp is not None and bool(sp.unsync or sp.unsync_children)


def kvm_mmu_sync_roots(kvm: KvmMmu, vcpu: Vcpu) -> None:
    """kvm_mmu_sync_roots(): drop the MMIO gva cache (this is what makes every MOV to CR3,
    through KVM_REQ_MMU_SYNC, and every new root forget it), then sync every unsync page the
    current root leads to: the guest's TLB flush is where its edits of unsync tables must
    take effect."""
    mmu = vcpu.mmu
    if mmu.root_role & DIRECT or not mmu.root_valid:
        return
    vcpu.clear_mmio_info()
    if mmu.root_hpa >= 0:
        if is_unsync_root(kvm, mmu.root_hpa):
            sp = kvm.root_to_sp(mmu.root_hpa)
            assert sp is not None
            kvm.mmu_sync_children(vcpu, sp)
        return
    if mmu.root_hpa == PAE_ROOT:
        for entry in list(mmu.pae_root):
            if entry:
                sp = kvm.root_to_sp(entry & S.SPTE_BASE_ADDR_MASK)
                if sp is not None:
                    kvm.mmu_sync_children(vcpu, sp)


def kvm_mmu_sync_prev_roots(kvm: KvmMmu, vcpu: Vcpu) -> None:
    """kvm_mmu_sync_prev_roots(): cached roots that lead to unsync pages are freed rather
    than synced (they are synced when loaded again, if ever)."""
    roots = 0
    for i in range(NUM_PREV_ROOTS):
        if is_unsync_root(kvm, vcpu.mmu.prev_roots[i][1]):
            roots |= 2 << i
    if roots:
        kvm_mmu_free_roots(kvm, vcpu, roots)


def kvm_mmu_reload(kvm: KvmMmu, vcpu: Vcpu) -> bool:
    if vcpu.mmu.root_valid:
        return True
    return kvm_mmu_load(kvm, vcpu)


def kvm_mmu_invalidate_addr(kvm: KvmMmu, vcpu: Vcpu, gva: int) -> None:
    """kvm_mmu_invlpg() -> kvm_mmu_invalidate_addr(KVM_MMU_ROOTS_ALL): drop the hardware TLB
    entry and the MMIO gva cache, then, through the current root and every cached one, sync
    the one spte of ``gva`` in each unsync page on the way (an INVLPG is the guest's promise
    that this translation changed; the page stays unsync)."""
    vcpu.tlb.pop(gva >> PAGE_SHIFT, None)
    vcpu.clear_mmio_info(gva)
    mmu = vcpu.mmu
    for hpa in (mmu.root_hpa, *(hpa for _pgd, hpa in mmu.prev_roots)):
        if hpa != INVALID_PAGE:
            _invalidate_addr_in_root(kvm, vcpu, gva, hpa)


def _invalidate_addr_in_root(kvm: KvmMmu, vcpu: Vcpu, gva: int, hpa: int) -> None:
    """__kvm_mmu_invalidate_addr() for one root."""
    if hpa == PAE_ROOT:
        entry = vcpu.mmu.pae_root[(gva >> 30) & 3]
        sp = kvm.root_to_sp(entry & S.SPTE_BASE_ADDR_MASK) if entry else None
        level = 2
    else:
        sp = kvm.root_to_sp(hpa) if hpa >= 0 else None
        level = sp.level if sp is not None else 0
    while sp is not None:
        index = (gva >> (PAGE_SHIFT + 9 * (level - 1))) & 511
        if sp.unsync:
            ret = kvm.kvm_sync_spte(vcpu, sp, index)
            if ret < 0:
                kvm.mmu_page_zap_pte(sp, index)
            if ret:
                kvm.kvm_flush_remote_tlbs()
        if not sp.unsync_children:
            return
        spte = sp.sptv[index]
        if not spte & S.SPTE_MMU_PRESENT or S.is_last_spte(spte, level):
            return
        sp = kvm.spte_to_child_sp(spte)
        level -= 1


def shadow_walk_init(kvm: KvmMmu, vcpu: Vcpu, addr: int) -> tuple[ShadowPage | None, int]:
    """shadow_walk_init(): the shadow page the walk for ``addr`` starts at, and its level;
    (None, 0) without a root (or with an invalid PAE root entry)."""
    mmu = vcpu.mmu
    if mmu.root_hpa == PAE_ROOT:
        entry = mmu.pae_root[(addr >> 30) & 3]
        if not entry:
            return None, 0
        return kvm.root_to_sp(entry & S.SPTE_BASE_ADDR_MASK), 2
    if mmu.root_hpa >= 0:
        sp = kvm.root_to_sp(mmu.root_hpa)
        return sp, sp.level if sp is not None else 0
    return None, 0


def shadow_walk(kvm: KvmMmu, vcpu: Vcpu, addr: int) -> list[tuple[ShadowPage, int, int]]:
    """for_each_shadow_entry(): (sp, index, level) from the root down while sptes are present
    non-leaf; the last element is the first non-present or leaf entry."""
    out: list[tuple[ShadowPage, int, int]] = []
    sp, level = shadow_walk_init(kvm, vcpu, addr)
    while sp is not None:
        index = (addr >> (PAGE_SHIFT + 9 * (level - 1))) & 511
        out.append((sp, index, level))
        spte = sp.sptv[index]
        if not spte & S.SPTE_MMU_PRESENT or S.is_last_spte(spte, level):
            break
        sp = kvm.spte_to_child_sp(spte)
        level -= 1
    return out
