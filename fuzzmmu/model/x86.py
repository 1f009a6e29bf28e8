"""A vCPU of the model machine: KVM's x86.c control-register paths (kvm_set_cr0/3/4, set_efer,
load_pdptrs), SMM entry and RSM (smm.c), the vCPU's MMIO cache, pending requests (KVM_REQ_*),
and the host TLB of translations the hardware derived from the shadow tables.

The host TLB is dropped only where KVM asks for a flush: a missing flush in the model is
therefore visible to the guest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from fuzzmmu.arch.bits import (
    CR0_CD,
    CR0_NW,
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_LA57,
    CR4_PAE,
    CR4_PGE,
    CR4_PKE,
    CR4_PSE,
    CR4_SMAP,
    CR4_SMEP,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    PFERR_P,
    PFERR_RSVD,
    bits,
)
from fuzzmmu.model.mmu import context as ctx
from fuzzmmu.model.mmu.context import MmuContext

if TYPE_CHECKING:
    from fuzzmmu.model.mmu.mmu import KvmMmu
    from fuzzmmu.world.memslots import PhysMemory

CR0_PDPTR_BITS: Final = CR0_CD | CR0_NW | CR0_PG  # X86_CR0_PDPTR_BITS
CR4_PDPTR_BITS: Final = CR4_PGE | CR4_PSE | CR4_PAE | CR4_SMEP  # X86_CR4_PDPTR_BITS
MMU_CR0_ROLE_BITS: Final = CR0_PG | CR0_WP
MMU_CR4_ROLE_BITS: Final = CR4_PSE | CR4_PAE | CR4_LA57 | CR4_SMEP | CR4_SMAP | CR4_PKE
MMU_EFER_ROLE_BITS: Final = EFER_LME | EFER_NXE


@dataclass(frozen=True)
class SmmState:
    """What SMI saves (in SMRAM on real hardware; in the vCPU here)."""

    cr0: int
    cr3: int
    cr4: int
    efer: int


class Vcpu:
    __slots__ = ("cpl", "cr0", "cr3", "cr4", "dead", "efer", "eflags_ac", "id", "kvm",
                 "mmio_access", "mmio_gen", "mmio_gfn", "mmio_gva", "mmio_smm", "mmu",
                 "pending_pf", "phys", "requests", "smm", "smm_saved", "tlb")

    def __init__(self, vcpu_id: int, kvm: KvmMmu, phys: PhysMemory) -> None:
        self.id = vcpu_id
        self.kvm = kvm
        self.phys = phys
        self.cr0 = CR0_PE | CR0_WP  # the world's reset state: protected mode, paging off
        self.cr3 = 0
        self.cr4 = 0
        self.efer = 0
        self.smm = 0
        self.smm_saved: SmmState | None = None
        self.cpl = 0
        self.eflags_ac = False
        self.mmu = MmuContext()
        self.tlb: dict[int, tuple[int, int]] = {}  # gva page -> (hpa page, ACC rights)
        self.requests: set[str] = set()
        self.mmio_gva = 0
        self.mmio_gfn = 0
        self.mmio_access = 0
        self.mmio_gen = 0
        self.mmio_smm = 0  # the address space the MMIO info was cached in
        self.pending_pf: tuple[int, int] | None = None  # (cr2, error code) to inject
        self.dead = False
        ctx.kvm_init_mmu(kvm, self)

    # ------------------------------------------------------------------ state

    @property
    def is_paging(self) -> bool:
        return bool(self.cr0 & CR0_PG)

    @property
    def is_long_mode(self) -> bool:
        return bool(self.efer & EFER_LMA)

    @property
    def is_pae_paging(self) -> bool:
        return self.is_paging and bool(self.cr4 & CR4_PAE) and not self.is_long_mode

    def inject_page_fault(self, addr: int, error_code: int) -> None:
        """kvm_inject_emulated_page_fault(): CR2 and the error code go to the guest. The fault
        first invalidates the address (kvm_mmu_invalidate_addr(): the TLB entry, the MMIO gva
        cache, the spte in an unsync page), as the hardware's own #PF does (SDM §4.10.4.1).
        KVM does so only for a present, non-reserved fault, assuming nothing is cached for
        the others; an unsync page may still map the address
        (kvm.not-present-pf-keeps-unsync-spte; kvm.mmio-cache-outlives-walk, KVM's behaviour
        too, keeps its MMIO cache through such a fault the same way)."""
        bugs = self.kvm.bugs
        if (error_code & PFERR_P and not error_code & PFERR_RSVD) or not (
                bugs.pf_invalidates_present_only or bugs.mmio_cache_outlives_walk):
            ctx.kvm_mmu_invalidate_addr(self.kvm, self, addr)
        elif self.cpl == 3 and self.kvm.config.user_fault_clears_mmio_cache:
            self.clear_mmio_info(addr)
        self.pending_pf = (addr, error_code)
        self.kvm.stat.pf_guest += 1

    # ------------------------------------------------------------------ MMIO info cache

    def cache_mmio_info(self, gva: int, gfn: int, access: int) -> None:
        """vcpu_cache_mmio_info(), tagged with the memslot generation of the vCPU's address
        space."""
        gen = self._mmio_generation()
        if gen & (1 << 63):
            return
        self.mmio_gva = gva & ~0xFFF
        self.mmio_access = access
        self.mmio_gfn = gfn
        self.mmio_gen = gen
        self.mmio_smm = self.smm

    def clear_mmio_info(self, gva: int | None = None) -> None:
        """vcpu_clear_mmio_info(); None stands for MMIO_GVA_ANY."""
        if gva is not None and self.mmio_gva != gva & ~0xFFF:
            return
        self.mmio_gva = 0

    def _mmio_generation(self) -> int:
        """The memslot generation the MMIO info is tagged with and checked against. KVM's
        vcpu_cache_mmio_info() and vcpu_match_mmio_gen() use kvm_memslots(), address space
        0's, even in SMM: a memslot change in the SMM address space then leaves the cached
        translation valid (the kvm.mmio-cache-smm-memslot-gen mutant; the
        kvm.mmio-cache-ignores-smm mutant, KVM's cache as a whole, includes it)."""
        bugs = self.kvm.bugs
        as0 = bugs.mmio_cache_smm_memslot_gen or bugs.mmio_cache_ignores_smm
        return self.kvm.memslots.generation[0 if as0 else self.smm]

    def match_mmio_gen(self) -> bool:
        """vcpu_match_mmio_gen(). vcpu_clear_mmio_info() keeps the gfn, so in KVM a gfn cached
        as MMIO outside SMM still matches inside SMM, where it may be SMRAM; the model also
        asks for the address space the info was cached in (KVM's behaviour is the
        kvm.mmio-cache-ignores-smm mutant)."""
        return self.mmio_gen == self._mmio_generation() and (
            self.mmio_smm == self.smm or self.kvm.bugs.mmio_cache_ignores_smm)

    def match_mmio_gva(self, gva: int) -> bool:
        return self.match_mmio_gen() and self.mmio_gva != 0 and self.mmio_gva == gva & ~0xFFF

    def match_mmio_gpa(self, gpa: int) -> bool:
        return self.match_mmio_gen() and self.mmio_gfn != 0 and self.mmio_gfn == gpa >> 12

    def mmio_info_in_cache(self, addr: int, direct: bool) -> bool:
        return self.match_mmio_gpa(addr) if direct else self.match_mmio_gva(addr)

    # ------------------------------------------------------------------ requests

    def service_requests(self) -> None:
        """The KVM_REQ_* part of vcpu_enter_guest(), then kvm_mmu_reload()."""
        kvm = self.kvm
        reqs = self.requests
        if reqs:
            if "free_obsolete_roots" in reqs:
                reqs.discard("free_obsolete_roots")
                ctx.kvm_mmu_free_obsolete_roots(kvm, self)
            if "mmu_sync" in reqs:
                reqs.discard("mmu_sync")
                ctx.kvm_mmu_sync_roots(kvm, self)
            if "tlb_flush_current" in reqs or "tlb_flush_guest" in reqs:
                # kvm_vcpu_flush_tlb_guest() syncs the roots first (as INVPCID(all) would) and
                # frees the cached roots that lead to unsync pages;
                # kvm_vcpu_flush_tlb_current() only flushes the hardware TLB.
                if "tlb_flush_guest" in reqs:
                    ctx.kvm_mmu_sync_roots(kvm, self)
                    ctx.kvm_mmu_sync_prev_roots(kvm, self)
                reqs.discard("tlb_flush_current")
                reqs.discard("tlb_flush_guest")
                self.tlb.clear()
                kvm.stat.tlb_flush += 1
        ctx.kvm_mmu_reload(kvm, self)

    # ------------------------------------------------------------------ CR writes

    def load_pdptrs(self, cr3: int) -> bool:
        """load_pdptrs(): read the PDPT at CR3[31:5]; a present PDPTE with reserved bits (or a
        PDPT outside memslots) fails; new values free the current (PAE-shaped) root."""
        base = cr3 & 0xFFFFFFE0
        rsvd = bits(63, self.kvm.config.maxphyaddr) | bits(8, 5) | bits(2, 1)
        pdptrs = []
        for i in range(4):
            value = self.phys.read(self.smm, base + 8 * i, 8)
            if value is None:
                return False
            if value & 1 and value & rsvd:
                return False
            pdptrs.append(value)
        if pdptrs != self.mmu.pdptrs:
            ctx.kvm_mmu_free_roots(self.kvm, self, ctx.ROOT_CURRENT)
        self.mmu.pdptrs = pdptrs
        return True

    def set_cr0(self, cr0: int) -> bool:
        """kvm_set_cr0(); False is #GP."""
        old = self.cr0
        if cr0 & CR0_PG and not cr0 & CR0_PE:
            return False
        if cr0 & CR0_NW and not cr0 & CR0_CD:
            return False
        if self.efer & EFER_LME and not old & CR0_PG and cr0 & CR0_PG and not self.cr4 & CR4_PAE:
            return False
        if (not self.efer & EFER_LME and cr0 & CR0_PG and self.cr4 & CR4_PAE
                and (cr0 ^ old) & CR0_PDPTR_BITS and not self.load_pdptrs(self.cr3)):
            return False
        self.cr0 = cr0
        # vmx_set_cr0(): entering or leaving paging with EFER.LME moves EFER.LMA.
        if self.efer & EFER_LME:
            if not old & CR0_PG and cr0 & CR0_PG:
                self.efer |= EFER_LMA
            elif old & CR0_PG and not cr0 & CR0_PG:
                self.efer &= ~EFER_LMA
        self.post_set_cr0(old, cr0)
        return True

    def post_set_cr0(self, old: int, cr0: int) -> None:
        if (cr0 ^ old) == CR0_WP and not cr0 & CR0_PG:
            return
        if (cr0 ^ old) & CR0_PG and not cr0 & CR0_PG:
            self.requests.add("tlb_flush_guest")
        if (cr0 ^ old) & MMU_CR0_ROLE_BITS:
            ctx.kvm_mmu_reset_context(self.kvm, self)

    def set_cr4(self, cr4: int) -> bool:
        """kvm_set_cr4(); False is #GP."""
        old = self.cr4
        if self.is_long_mode:
            if not cr4 & CR4_PAE or (cr4 ^ old) & CR4_LA57:
                return False
        elif (self.is_paging and cr4 & CR4_PAE and (cr4 ^ old) & CR4_PDPTR_BITS
              and not self.load_pdptrs(self.cr3)):
            return False
        self.cr4 = cr4
        if (cr4 ^ old) & MMU_CR4_ROLE_BITS:
            ctx.kvm_mmu_reset_context(self.kvm, self)
        if (cr4 ^ old) & CR4_PGE:
            self.requests.add("tlb_flush_guest")
        elif ((cr4 ^ old) & CR4_SMEP and cr4 & CR4_SMEP) or (cr4 ^ old) & CR4_PAE:
            self.requests.add("tlb_flush_current")
        return True

    def set_cr3(self, cr3: int) -> bool:
        """kvm_set_cr3(); False is #GP. Every CR3 write flushes (no PCID)."""
        if cr3 != self.cr3 or self.is_pae_paging:
            if self.is_long_mode and cr3 & bits(63, self.kvm.config.maxphyaddr):
                return False
            if self.is_pae_paging and not self.load_pdptrs(cr3):
                return False
            if cr3 != self.cr3:
                ctx.kvm_mmu_new_pgd(self.kvm, self, cr3)
            self.cr3 = cr3
        # kvm_invalidate_pcid(): KVM_REQ_MMU_SYNC and KVM_REQ_TLB_FLUSH_CURRENT.
        self.requests.add("mmu_sync")
        self.requests.add("tlb_flush_current")
        return True

    def set_efer(self, efer: int) -> bool:
        """set_efer() for a guest WRMSR; False is #GP."""
        old = self.efer
        if self.is_paging and (old & EFER_LME) != (efer & EFER_LME):
            return False
        efer = (efer & ~EFER_LMA) | (old & EFER_LMA)
        self.efer = efer
        if (efer ^ old) & MMU_EFER_ROLE_BITS:
            ctx.kvm_mmu_reset_context(self.kvm, self)
        return True

    def invlpg(self, gva: int) -> None:
        self.kvm.stat.invlpg += 1
        ctx.kvm_mmu_invalidate_addr(self.kvm, self, gva)

    # ------------------------------------------------------------------ SMM

    def kvm_smm_changed(self, entering: bool) -> None:
        self.smm = 1 if entering else 0
        ctx.kvm_mmu_reset_context(self.kvm, self)

    def enter_smm(self) -> None:
        """enter_smm(): save state, enter SMM with paging off, CR4 and EFER cleared."""
        self.smm_saved = SmmState(self.cr0, self.cr3, self.cr4, self.efer)
        self.kvm_smm_changed(True)
        self.cr0 = self.cr0 & ~(CR0_PE | CR0_PG | (1 << 2) | (1 << 3))  # PE, EM, TS, PG
        self.cr4 = 0
        self.efer = 0
        ctx.kvm_mmu_reset_context(self.kvm, self)

    def leave_smm(self) -> bool:
        """emulator_leave_smm(): back to real mode, then CR3, CR4, CR0 in the order RSM loads
        them (which reloads the PDPTEs for PAE paging). False is a failed RSM (shutdown)."""
        saved = self.smm_saved
        if saved is None or not self.smm:
            return False
        self.smm_saved = None
        self.kvm_smm_changed(False)
        if self.cr0 & CR0_PE:
            self.set_cr0(self.cr0 & ~(CR0_PG | CR0_PE))
        if self.cr4 & CR4_PAE:
            self.set_cr4(self.cr4 & ~CR4_PAE)
        self.set_efer(0)
        self.set_efer(saved.efer & ~EFER_LMA)
        if not self.set_cr3(saved.cr3):
            return False
        if not self.set_cr4(saved.cr4):
            return False
        return self.set_cr0(saved.cr0)

