"""KVM's MMU statistics: the counters of struct kvm_vm_stat and struct kvm_vcpu_stat that the
shadow MMU's paths increment (x86.c's kvm_vm_stats_desc / kvm_vcpu_stats_desc, read through
KVM_GET_STATS_FD), kept VM-wide. They say which of KVM's paths an operation took, cheaply,
in KVM's own vocabulary, so the campaign can use their per-op changes as feedback; a real KVM
reports the same names."""

from __future__ import annotations

from operator import attrgetter
from typing import Final

# In KVM's order of declaration; a feature names a counter by its index here.
STAT_NAMES: Final = (
    "pf_taken",  # kvm_mmu_do_page_fault()
    "pf_fixed",  # ... returned RET_PF_FIXED
    "pf_emulate",  # ... RET_PF_EMULATE
    "pf_spurious",  # ... RET_PF_SPURIOUS
    "pf_guest",  # kvm_inject_page_fault(): a #PF for the guest
    "pf_mmio_spte_created",  # mark_mmio_spte()
    "invlpg",  # kvm_mmu_invlpg()
    "tlb_flush",  # kvm_vcpu_flush_tlb_*()
    "insn_emulation",  # x86_emulate_instruction()
    "mmu_shadow_zapped",  # __kvm_mmu_prepare_zap_page()
    "mmu_pte_write",  # kvm_mmu_track_write()
    "mmu_pde_zapped",  # ... a written gpte above level 1
    "mmu_flooded",  # ... a misaligned or flooded write zapped the page
    "mmu_recycled",  # kvm_mmu_zap_oldest_mmu_pages()
    "mmu_cache_miss",  # __kvm_mmu_get_shadow_page() made a new page
    "mmu_unsync",  # kvm_unsync_page(), less kvm_unlink_unsync_page()
    "remote_tlb_flush",  # kvm_flush_remote_tlbs()
)


class MmuStats:
    __slots__ = STAT_NAMES

    pf_taken: int
    pf_fixed: int
    pf_emulate: int
    pf_spurious: int
    pf_guest: int
    pf_mmio_spte_created: int
    invlpg: int
    tlb_flush: int
    insn_emulation: int
    mmu_shadow_zapped: int
    mmu_pte_write: int
    mmu_pde_zapped: int
    mmu_flooded: int
    mmu_recycled: int
    mmu_cache_miss: int
    mmu_unsync: int
    remote_tlb_flush: int

    def __init__(self) -> None:
        for name in STAT_NAMES:
            setattr(self, name, 0)

    def values(self) -> tuple[int, ...]:
        """Every counter, in STAT_NAMES order."""
        return _ALL(self)


_ALL: Final = attrgetter(*STAT_NAMES)
