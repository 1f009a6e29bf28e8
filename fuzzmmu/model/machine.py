"""The model machine: guest memory, memslots, two vCPUs and KVM's shadow MMU, driven by the
operations a guest and its VMM perform.

An access enters the guest (KVM services requests and reloads roots), goes through the
hardware (host TLB, shadow tables) and, on a #PF exit, through KVM's fault handler, emulator
included, until the guest sees a memory access, an MMIO exit or an injected #PF.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from fuzzmmu.arch.bits import EFER_LMA, PAGE_SHIFT
from fuzzmmu.model.bugs import NO_BUGS, BugSet
from fuzzmmu.model.emulator import emulate_access
from fuzzmmu.model.hardware import completes_without_exit, translate
from fuzzmmu.model.mmu.fault import kvm_mmu_page_fault, sync_spte
from fuzzmmu.model.mmu.internal import RET_PF_EMULATE, MmuConfig, Point, VmError
from fuzzmmu.model.mmu.mmio import kvm_mmu_invalidate_mmio_sptes
from fuzzmmu.model.mmu.mmu import KvmMmu
from fuzzmmu.model.mmu.trace import Event
from fuzzmmu.model.x86 import Vcpu
from fuzzmmu.world.layout import new_world
from fuzzmmu.world.memslots import (
    GEN_UPDATE_IN_PROGRESS,
    NUM_ADDRESS_SPACES,
    MemslotError,
    MemslotUpdate,
    PhysMemory,
)
from fuzzmmu.world.observe import DONE, GP, AccessKind, Observation, ObsKind

NUM_VCPUS: Final = 2
DEFAULT_CONFIG: Final = MmuConfig()
MAX_GUEST_ENTRIES: Final = 16  # a guest access that faults more often than this is a livelock


class Machine:
    """The system under test."""

    def __init__(self, config: MmuConfig = DEFAULT_CONFIG, bugs: BugSet = NO_BUGS,
                 trace: Callable[[Event], None] | None = None) -> None:
        backing, slots, host = new_world()
        self.config = config
        self.phys = PhysMemory(backing, slots, host)
        self.kvm = KvmMmu(slots, config, bugs, trace)
        self.kvm.sync_spte = sync_spte
        self.vcpus = [Vcpu(i, self.kvm, self.phys) for i in range(NUM_VCPUS)]
        self.kvm.vcpus = self.vcpus
        self.dead = ""  # why the VM stopped, once KVM_RUN failed

    def destroy(self) -> None:
        """kvm_destroy_vm(), as far as memory goes: KVM lets go of its vCPUs. That is the one
        reference cycle of a machine, so a destroyed machine is freed as soon as it is dropped
        instead of at the next garbage collection (a fuzzer drops hundreds of machines a second,
        and memory freed late comes back as fresh pages that fault); its guest memory goes to
        the next machine's (GuestMemory.release). It cannot run anymore."""
        self.kvm.vcpus = []
        self.phys.release()

    # ------------------------------------------------------------------ guest operations

    def access(self, v: int, gva: int, kind: AccessKind, *, cpl: int = 0, ac: bool = False,
               width: int = 8, value: int = 0) -> Observation:
        """One guest load, store or fetch of ``width`` bytes (within one page)."""
        vcpu = self.vcpus[v]
        if self.dead or vcpu.dead:
            return self._stopped(vcpu)
        if not vcpu.efer & EFER_LMA:
            gva &= 0xFFFFFFFF
        vcpu.cpl = cpl
        vcpu.eflags_ac = ac
        write = kind is AccessKind.WRITE
        fetch = kind is AccessKind.FETCH
        kvm = self.kvm
        prev = kvm.current_vcpu
        # A host that runs no guest code at CPL0 natively emulates the access at once.
        emulated = cpl == 0 and kvm.config.emulate_cpl0
        try:
            for _ in range(MAX_GUEST_ENTRIES):
                kvm.current_vcpu = vcpu
                vcpu.service_requests()
                if emulated:
                    break
                pfn, code = translate(kvm, vcpu, gva, write, fetch)
                if pfn >= 0:
                    return self._ram(pfn, gva, write, width, value)
                r = kvm_mmu_page_fault(kvm, vcpu, gva, code)
                if vcpu.pending_pf is not None:
                    cr2, error_code = vcpu.pending_pf
                    vcpu.pending_pf = None
                    return Observation(ObsKind.PF, cr2, 0, error_code)
                if r == RET_PF_EMULATE:
                    kvm.point(Point.EMULATE, vcpu)
                    break
            else:
                return Observation(ObsKind.HANG, gva, 0, 0, "the access faulted "
                                   f"{MAX_GUEST_ENTRIES} times without completing")
            kvm.stat.insn_emulation += 1
            obs = emulate_access(kvm, vcpu, gva, write, fetch, width, value)
            vcpu.pending_pf = None  # a fault of the emulated access is ``obs``
            return obs
        except VmError as exc:
            self.dead = str(exc)
            return Observation(ObsKind.VM_ERROR, detail=self.dead)
        finally:
            kvm.current_vcpu = prev

    def _ram(self, pfn: int, gva: int, write: bool, width: int, value: int) -> Observation:
        hpa = (pfn << PAGE_SHIFT) | (gva & 0xFFF)
        mem = self.phys.backing
        if write:
            mem.write(hpa, width, value)
            return Observation(ObsKind.RAM, hpa, value)
        return Observation(ObsKind.RAM, hpa, mem.read(hpa, width))

    def _stopped(self, vcpu: Vcpu) -> Observation:
        if self.dead:
            return Observation(ObsKind.VM_ERROR, detail=self.dead)
        return Observation(ObsKind.SHUTDOWN, detail=f"vCPU {vcpu.id} is shut down")

    def _vcpu_op(self, v: int, op: Callable[[Vcpu], Observation]) -> Observation:
        vcpu = self.vcpus[v]
        if self.dead or vcpu.dead:
            return self._stopped(vcpu)
        prev = self.kvm.current_vcpu
        self.kvm.current_vcpu = vcpu
        try:
            return op(vcpu)
        except VmError as exc:
            self.dead = str(exc)
            return Observation(ObsKind.VM_ERROR, detail=self.dead)
        finally:
            self.kvm.current_vcpu = prev

    def write_cr0(self, v: int, value: int) -> Observation:
        return self._vcpu_op(v, lambda c: DONE if c.set_cr0(value) else GP)

    def write_cr3(self, v: int, value: int) -> Observation:
        return self._vcpu_op(v, lambda c: DONE if c.set_cr3(value) else GP)

    def write_cr4(self, v: int, value: int) -> Observation:
        return self._vcpu_op(v, lambda c: DONE if c.set_cr4(value) else GP)

    def write_efer(self, v: int, value: int) -> Observation:
        return self._vcpu_op(v, lambda c: DONE if c.set_efer(value) else GP)

    def invlpg(self, v: int, gva: int) -> Observation:
        def op(c: Vcpu) -> Observation:
            c.invlpg(gva if c.efer & EFER_LMA else gva & 0xFFFFFFFF)
            return DONE
        return self._vcpu_op(v, op)

    def smi(self, v: int) -> Observation:
        def op(c: Vcpu) -> Observation:
            if not c.smm:  # an SMI in SMM stays latched until RSM; nothing to see
                c.enter_smm()
            return DONE
        return self._vcpu_op(v, op)

    def rsm(self, v: int) -> Observation:
        def op(c: Vcpu) -> Observation:
            if not c.smm:
                return Observation(ObsKind.UD, detail="RSM outside SMM")
            if c.leave_smm():
                return DONE
            c.dead = True
            return Observation(ObsKind.SHUTDOWN, detail="RSM could not restore the state")
        return self._vcpu_op(v, op)

    def completes_without_exit(self, v: int, gva: int, kind: AccessKind, cpl: int, ac: bool
                               ) -> bool:
        """Whether vCPU ``v`` could do this access now without entering KVM."""
        vcpu = self.vcpus[v]
        if self.dead or vcpu.dead:
            return False
        if not vcpu.efer & EFER_LMA:
            gva &= 0xFFFFFFFF
        return completes_without_exit(self.kvm, vcpu, gva, kind is AccessKind.WRITE,
                                      kind is AccessKind.FETCH, cpl, ac)

    def regs(self, v: int) -> tuple[int, int, int, int, int]:
        c = self.vcpus[v]
        return c.cr0, c.cr3, c.cr4, c.efer, c.smm

    # ------------------------------------------------------------------ VMM / host operations

    def _host_op(self, op: Callable[[], Observation]) -> Observation:
        if self.dead:
            return Observation(ObsKind.VM_ERROR, detail=self.dead)
        prev = self.kvm.current_vcpu
        self.kvm.current_vcpu = None
        try:
            return op()
        except VmError as exc:
            self.dead = str(exc)
            return Observation(ObsKind.VM_ERROR, detail=self.dead)
        finally:
            self.kvm.current_vcpu = prev

    def set_memslot(self, upd: MemslotUpdate) -> Observation:
        """KVM_SET_USER_MEMORY_REGION (kvm_set_memslot): a deleted or moved slot is first
        made invalid and its shadow pages zapped (kvm_arch_flush_shadow_memslot), then the
        new memslots are swapped in with a new generation."""
        def op() -> Observation:
            try:
                old, new = self.phys.slots.check(upd)
            except MemslotError as exc:
                return Observation(ObsKind.REJECTED, detail=str(exc))
            if new is old:
                return DONE
            kvm = self.kvm
            if old is not None:
                self._swap_active_memslots(upd.as_id, lambda: None, False)
                kvm.kvm_mmu_zap_all_fast()
            if new is not None:
                kvm.kvm_arch_prepare_memory_region(new)
            self._swap_active_memslots(upd.as_id, lambda: self.phys.slots.install(old, new),
                                       True)
            if old is not None:
                kvm.kvm_arch_free_memslot(old)
            return DONE
        return self._host_op(op)

    def _swap_active_memslots(self, as_id: int, install: Callable[[], None], point: bool
                              ) -> None:
        """kvm_swap_active_memslots(): publish with the in-progress flag, then the new
        generation. The MMIO generation wrap check must come before the new generation is
        visible (152482580a1b); before the fix a vCPU could pair an old MMIO spte with it."""
        slots = self.phys.slots
        gen = slots.generation[as_id]
        slots.generation[as_id] = gen | GEN_UPDATE_IN_PROGRESS
        install()
        new_gen = gen + NUM_ADDRESS_SPACES
        if self.kvm.bugs.mmio_gen_published_before_zap:
            slots.generation[as_id] = new_gen
            if point:
                self.kvm.point(Point.MEMSLOT_PUBLISH)
            kvm_mmu_invalidate_mmio_sptes(self.kvm, new_gen)
        else:
            kvm_mmu_invalidate_mmio_sptes(self.kvm, new_gen)
            if point:
                self.kvm.point(Point.MEMSLOT_PUBLISH)
            slots.generation[as_id] = new_gen

    def migrate_page(self, as_id: int, gfn: int) -> Observation:
        """The host moves the page backing ``gfn`` (compaction, NUMA balancing): KVM sees an
        MMU-notifier invalidation of its host page around the move."""
        def op() -> Observation:
            slot = self.phys.slots.lookup(as_id, gfn)
            if slot is None:
                return Observation(ObsKind.REJECTED, detail=f"gfn {gfn:#x} is not RAM")
            hva = slot.gfn_to_hva(gfn)
            self.kvm.invalidate_range_start(hva)
            self.phys.migrate(hva)
            self.kvm.invalidate_range_end()
            return DONE
        return self._host_op(op)

    def zap_all(self) -> Observation:
        """kvm_mmu_zap_all_fast(), as a host-side toggle (e.g. of nx_huge_pages) triggers."""
        def op() -> Observation:
            self.kvm.kvm_mmu_zap_all_fast()
            return DONE
        return self._host_op(op)

    def shrink(self, nr_to_scan: int) -> Observation:
        """The MMU shrinker: zap up to ``nr_to_scan`` of the oldest shadow pages."""
        return self._host_op(lambda: (self.kvm.kvm_mmu_zap_oldest_mmu_pages(nr_to_scan), DONE)[1])

    def set_max_pages(self, goal: int) -> Observation:
        """KVM_SET_NR_MMU_PAGES."""
        if goal < 16:
            return Observation(ObsKind.REJECTED, detail="fewer than 16 shadow pages")
        def op() -> Observation:
            self.kvm.kvm_mmu_change_mmu_pages(goal)
            return DONE
        return self._host_op(op)
