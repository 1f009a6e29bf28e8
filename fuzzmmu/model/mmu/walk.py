"""KVM's guest page-table walker: FNAME(walk_addr_generic) of paging_tmpl.h.

One walker for the two guest entry formats (PTTYPE 32: 4-byte gptes, 2 levels; PTTYPE 64:
8-byte gptes, PAE from the cached PDPTRs or 4/5 levels from CR3). It walks, checks presence,
reserved bits and permissions, and only on success sets A/D bits in guest memory (redoing the
walk if a gpte changed under it). This is the model's own walker: it never calls the
architectural reference in fuzzmmu.arch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from fuzzmmu.arch.bits import (
    ACC_U,
    ACC_W,
    ACC_X,
    PAGE_SHIFT,
    PFERR_FETCH,
    PFERR_P,
    PFERR_RSVD,
    PFERR_U,
    PFERR_W,
    PTE_A,
    PTE_D,
    PTE_P,
    PTE_PS,
    bits,
)

if TYPE_CHECKING:
    from fuzzmmu.model.mmu.context import MmuContext
    from fuzzmmu.model.mmu.mmu import KvmMmu
    from fuzzmmu.model.x86 import Vcpu

PT64_NX_MASK: Final = 1 << 63
PT64_BASE_ADDR_MASK: Final = bits(51, 12)
PT32_BASE_ADDR_MASK: Final = 0xFFFFF000
PTE_PREFETCH_NUM: Final = 8
ALL_ONES: Final = (1 << 64) - 1


class GuestWalker:
    """struct guest_walker. Arrays are indexed by level - 1."""

    __slots__ = ("dirty_pending", "error_code", "gfn", "level", "max_level", "ok",
                 "prefetch_ptes", "pt_access", "pte_access", "pte_gpa", "ptes", "table_gfn")

    def __init__(self) -> None:
        self.ok = False
        self.level = 0
        self.max_level = 0
        self.ptes = [0] * 5
        self.table_gfn = [0] * 5
        self.pte_gpa = [0] * 5
        self.pt_access = [0] * 5
        self.pte_access = 0
        self.gfn = 0
        self.error_code = 0
        self.prefetch_ptes: list[int] = []
        self.dirty_pending = False  # a write whose leaf D bit is set when the fault commits


def gpte_access(gpte: int, is32: bool) -> int:
    """FNAME(gpte_access): W and U from the gpte, X unless NX (passed already inverted)."""
    access = (gpte & (ACC_W | ACC_U)) | ACC_X
    if not is32:
        access ^= (gpte >> 63) & ACC_X
    return access


def protect_clean_gpte(access: int, gpte: int) -> int:
    """FNAME(protect_clean_gpte): a clean (D=0) leaf gives no write access, so that the first
    write faults and the walk sets D (the dirty-bit trick)."""
    return access & (~ACC_W | ((gpte >> (6 - 1)) & ACC_W))


def is_last_gpte(mmu: MmuContext, level: int, gpte: int, is32: bool) -> bool:
    """FNAME(is_last_gpte): level 1 always; PS above it where PS means page size (32-bit
    paging only at the PDE and only with CR4.PSE)."""
    if level == 1:
        return True
    if is32:
        assert mmu.cpu_role is not None
        return level == 2 and mmu.cpu_role.pse and bool(gpte & PTE_PS)
    return bool(gpte & PTE_PS)


def permission_fault(mmu: MmuContext, pte_access: int, pfec: int, eflags_ac: bool,
                     implicit: bool = False) -> int:
    """permission_fault() (mmu.h): an explicit supervisor access with EFLAGS.AC=1 is not
    subject to SMAP; KVM encodes that in the RSVD slot of the bitmap index."""
    not_smap = eflags_ac and not implicit
    index = ((pfec & (PFERR_W | PFERR_U | PFERR_FETCH)) | (PFERR_RSVD if not_smap else 0)) >> 1
    return PFERR_P if (mmu.permissions[index] >> pte_access) & 1 else 0


def walk_addr(kvm: KvmMmu, vcpu: Vcpu, addr: int, pfec: int, eflags_ac: bool = False,
              implicit: bool = False, defer_dirty: bool = False) -> GuestWalker:
    """FNAME(walk_addr_generic) for ``vcpu``'s current paging mode. ``defer_dirty``: for a
    write, set A bits only and leave the leaf's D to whoever performs the write
    (``dirty_pending``), since the write may never happen through this translation."""
    mmu = vcpu.mmu
    role = mmu.cpu_role
    assert role is not None and role.pg
    is32 = role.level == 2
    esize = 4 if is32 else 8
    nx_mask = 0 if is32 else PT64_NX_MASK
    base_mask = PT32_BASE_ADDR_MASK if is32 else PT64_BASE_ADDR_MASK
    index_mask = 1023 if is32 else 511
    index_bits = 10 if is32 else 9
    rsvd = mmu.rsvd
    phys = vcpu.phys
    as_id = vcpu.smm
    write_fault = pfec & PFERR_W
    early_a = kvm.bugs.walk_sets_accessed_early

    while True:  # retry_walk
        w = GuestWalker()
        level = role.level
        pte = vcpu.cr3
        errcode = 0
        failed = False
        if level == 3:
            pte = mmu.pdptrs[(addr >> 30) & 3]
            if not pte & PTE_P:
                failed = True
            level -= 1
        if not failed:
            w.max_level = level
            pte_access = ALL_ONES
            level += 1
            while True:
                pt_access = pte_access
                level -= 1
                index = (addr >> (PAGE_SHIFT + index_bits * (level - 1))) & index_mask
                table_gfn = (pte & base_mask) >> PAGE_SHIFT
                pte_gpa = (table_gfn << PAGE_SHIFT) + index * esize
                w.table_gfn[level - 1] = table_gfn
                w.pte_gpa[level - 1] = pte_gpa
                read = phys.read(as_id, pte_gpa, esize)
                w.level = level
                if read is None:  # table gfn not backed by a visible memslot
                    failed = True
                    break
                pte = read
                pte_access = pt_access & (pte ^ nx_mask)
                if not pte & PTE_P:
                    failed = True
                    break
                if pte & rsvd[1 if pte & PTE_PS else 0][level]:
                    errcode = PFERR_RSVD | PFERR_P
                    failed = True
                    break
                if early_a and not pte & PTE_A:
                    # 2007 walker: A set level by level before the access is known to succeed
                    pte |= PTE_A
                    phys.write(as_id, pte_gpa, esize, pte)
                w.ptes[level - 1] = pte
                w.pt_access[level - 1] = gpte_access(pt_access ^ nx_mask, is32)
                if is_last_gpte(mmu, level, pte, is32):
                    break
        if failed:
            return _walk_error(kvm, w, mmu, errcode, pfec)

        w.level = level
        accessed_dirty = pte_access & PTE_A
        w.pte_access = gpte_access(pte_access ^ nx_mask, is32)
        if kvm.bugs.walk_checks_leaf_only:
            # 2007: the rights were checked against the leaf gpte alone, so a restriction of
            # an upper level went unnoticed by the walker (the spte still carried it).
            errcode = permission_fault(mmu, gpte_access(pte, is32), pfec, eflags_ac, implicit)
        else:
            errcode = permission_fault(mmu, w.pte_access, pfec, eflags_ac, implicit)
        if errcode:
            return _walk_error(kvm, w, mmu, errcode, pfec)

        if is32:
            if level == 2:
                gfn = ((pte & 0xFFC00000) >> PAGE_SHIFT) + ((addr & 0x3FFFFF) >> PAGE_SHIFT)
                gfn += ((pte >> 13) & 0xF) << (32 - PAGE_SHIFT)  # pse36_gfn_delta()
            else:
                gfn = (pte & PT32_BASE_ADDR_MASK) >> PAGE_SHIFT
        else:
            low = PAGE_SHIFT + 9 * (level - 1)
            gfn = ((pte & bits(51, low)) + (addr & ((1 << low) - 1))) >> PAGE_SHIFT
        w.gfn = gfn

        set_dirty = bool(write_fault)
        if not write_fault:
            w.pte_access = protect_clean_gpte(w.pte_access, pte)
        elif defer_dirty:
            w.dirty_pending = not pte & PTE_D
            set_dirty = False
        else:
            accessed_dirty &= pte >> 1  # fold D into the A position
        if not accessed_dirty and update_accessed_dirty_bits(vcpu, w, set_dirty, esize):
            continue
        w.ok = True
        return w


def _walk_error(kvm: KvmMmu, w: GuestWalker, mmu: MmuContext, errcode: int, pfec: int
                ) -> GuestWalker:
    errcode |= pfec & (PFERR_W | PFERR_U)
    assert mmu.cpu_role is not None
    # KVM tests EFER.NX as recorded in the CPU role, which it also sets for 32-bit paging; the
    # SDM sets I/D only with PAE/long paging and NXE (or with SMEP).
    if kvm.bugs.fetch_errcode_32bit_nxe:
        nx = mmu.cpu_role.nx
    else:
        nx = mmu.cpu_role.nx and mmu.cpu_role.level >= 3
    if pfec & PFERR_FETCH and (nx or mmu.cpu_role.smep):
        errcode |= PFERR_FETCH
    w.error_code = errcode
    w.ok = False
    return w


def update_accessed_dirty_bits(vcpu: Vcpu, w: GuestWalker, write_fault: bool, esize: int
                               ) -> bool:
    """FNAME(update_accessed_dirty_bits): top-down, A on every level, D on the leaf for a
    write, each by cmpxchg against the value walked. Returns True when a gpte changed under
    the walk (the caller redoes the walk)."""
    phys = vcpu.phys
    for level in range(w.max_level, w.level - 1, -1):
        orig = w.ptes[level - 1]
        pte = orig | PTE_A
        if level == w.level and write_fault:
            pte |= PTE_D
        if pte == orig:
            continue
        gpa = w.pte_gpa[level - 1]
        if phys.read(vcpu.smm, gpa, esize) != orig:
            return True
        phys.write(vcpu.smm, gpa, esize, pte)
        w.ptes[level - 1] = pte
    return False


def set_pending_dirty(vcpu: Vcpu, w: GuestWalker, esize: int) -> bool:
    """The leaf's D bit for a write the walk deferred it for, by cmpxchg against the value
    walked; False when the gpte changed meanwhile (the fault is retried)."""
    gpa = w.pte_gpa[w.level - 1]
    orig = w.ptes[w.level - 1]
    if vcpu.phys.read(vcpu.smm, gpa, esize) != orig:
        return False
    vcpu.phys.write(vcpu.smm, gpa, esize, orig | PTE_D)
    w.ptes[w.level - 1] = orig | PTE_D
    w.dirty_pending = False
    return True


def gva_to_gpa(kvm: KvmMmu, vcpu: Vcpu, addr: int, pfec: int, eflags_ac: bool
               ) -> tuple[int | None, int]:
    """FNAME(gva_to_gpa) (nonpaging: identity): (gpa, 0) or (None, #PF error code)."""
    role = vcpu.mmu.cpu_role
    assert role is not None
    if not role.pg:
        return addr & 0xFFFFFFFF, 0
    w = walk_addr(kvm, vcpu, addr, pfec, eflags_ac)
    if not w.ok:
        return None, w.error_code
    return (w.gfn << PAGE_SHIFT) | (addr & 0xFFF), 0
