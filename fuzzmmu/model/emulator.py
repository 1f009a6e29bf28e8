"""The slice of KVM's instruction emulator a shadow-MMU fault can lead to (x86.c:
emulator_read_write_onepage, vcpu_mmio_gva_to_gpa, emulator_write_phys): one load, store or
fetch at a gva, after the fault handler returned RET_PF_EMULATE.

The gva is translated again, through the vCPU's MMIO cache when it matches, else by KVM's
guest walker (which sets A/D bits). RAM is read or written directly and a write is reported to
write tracking (kvm_page_track_write); anything else is an exit to the VMM's device model.
Executing from MMIO, which KVM cannot emulate, is reported as an MMIO access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fuzzmmu.arch.bits import ACC_W, PAGE_SHIFT, PFERR_FETCH, PFERR_U, PFERR_W
from fuzzmmu.model.mmu.pte_write import kvm_mmu_track_write
from fuzzmmu.model.mmu.walk import gva_to_gpa, permission_fault
from fuzzmmu.world.observe import Observation, ObsKind, mmio_read_value

if TYPE_CHECKING:
    from fuzzmmu.model.mmu.mmu import KvmMmu
    from fuzzmmu.model.x86 import Vcpu


def emulate_access(kvm: KvmMmu, vcpu: Vcpu, gva: int, write: bool, fetch: bool, width: int,
                   value: int) -> Observation:
    pfec = (PFERR_W if write else 0) | (PFERR_U if vcpu.cpl == 3 else 0) | (
        PFERR_FETCH if fetch else 0)
    role = vcpu.mmu.cpu_role
    assert role is not None
    is_mmio = False
    # The cached access lacks W for a clean gpte (FNAME(protect_clean_gpte)); a write needs it,
    # or the walk that sets the D bit (SDM §4.8) is skipped. KVM asks only permission_fault(),
    # which with CR0.WP=0 lets a supervisor write through (kvm.mmio-cache-write-skips-dirty).
    cached_write_ok = (not write or bool(vcpu.mmio_access & ACC_W)
                       or kvm.bugs.mmio_cache_write_skips_dirty)
    if not fetch and vcpu.match_mmio_gva(gva) and (
            not role.pg or (cached_write_ok and not permission_fault(
                vcpu.mmu, vcpu.mmio_access, pfec, vcpu.eflags_ac))):
        gpa = (vcpu.mmio_gfn << PAGE_SHIFT) | (gva & 0xFFF)
        is_mmio = True
    else:
        maybe_gpa, error_code = gva_to_gpa(kvm, vcpu, gva, pfec, vcpu.eflags_ac)
        if maybe_gpa is None:
            vcpu.inject_page_fault(gva, error_code)
            return Observation(ObsKind.PF, gva, 0, error_code)
        gpa = maybe_gpa
        is_mmio = not fetch and vcpu.match_mmio_gpa(gpa)
    if not is_mmio:
        pfn = vcpu.phys.gfn_to_pfn(vcpu.smm, gpa >> PAGE_SHIFT)
        if pfn >= 0:
            hpa = (pfn << PAGE_SHIFT) | (gpa & 0xFFF)
            mem = vcpu.phys.backing
            if write:
                mem.write(hpa, width, value)
                kvm_mmu_track_write(kvm, vcpu, gpa, width)
                return Observation(ObsKind.RAM, hpa, value)
            return Observation(ObsKind.RAM, hpa, mem.read(hpa, width))
    if write:
        return Observation(ObsKind.MMIO, gpa, value)
    return Observation(ObsKind.MMIO, gpa, mmio_read_value(gpa, width))
