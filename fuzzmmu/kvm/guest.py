"""A long-mode VM with the agent in it: guest memory in one host mapping, memslots, CPUID,
vCPUs entered at CPL0 with paging on, and ``run_op``, which performs one agent operation and
says how it ended.

This layer knows the agent and KVM, not the world's meaning: the caller (fuzzmmu.kvm.machine)
decides what an operation's outcome means for the program.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from fuzzmmu.kvm import abi
from fuzzmmu.kvm.agent import (
    AGENT_GPA,
    AGENT_PAGES,
    AGENT_VA,
    DONE,
    GDT_LIMIT,
    KCODE,
    KDATA,
    PAGE,
    TSS_SEL,
    VECTORS_WITH_ERROR_CODE,
    VcpuLayout,
    agent_code,
    agent_image,
)
from fuzzmmu.kvm.device import Kvm, KvmError, KvmTimeout, KvmUnavailable, Vcpu, Vm

AGENT_SLOT = 16  # the KVM slot id of the agent's memory; the world uses 0-3
RUN_TIMEOUT = 2.0  # seconds a KVM_RUN may take before the watchdog calls it a hang
MAX_EXITS = 64  # exits one operation may take (MMIO, HLT, foreign I/O) before it is a hang

# CPUID leaf 0x80000008 EAX[7:0] is MAXPHYADDR (SDM Vol. 2A, CPUID).
_LEAF_ADDRESS_SIZES = 0x8000_0008
CR0_AGENT = (1 << 1) | (1 << 4) | (1 << 5)  # MP, ET, NE: the bits the agent keeps on


@dataclass
class OpResult:
    """How one agent operation ended. ``end`` is "done" (the template's OUT), "exception"
    (``vector``, ``error_code``, the faulting ``rip``, ``cr2``), "shutdown", "hang" or
    "error" (``detail``). ``mmio`` lists the MMIO exits on the way: (gpa, size, is_write,
    data)."""

    end: str
    rax: int = 0
    vector: int = -1
    error_code: int = 0
    rip: int = 0
    cr2: int = 0
    detail: str = ""
    mmio: list[tuple[int, int, bool, int]] = field(default_factory=list)
    exits: int = 0


@dataclass(frozen=True)
class WorldSlot:
    """A memslot of the world's guest memory: ``npages`` gfns from ``gfn``, backed by the
    host pages of ``memory`` from ``host_page``."""

    slot: int
    gfn: int
    npages: int
    host_page: int


class Guest:
    """The VM, its memory and its vCPUs. ``memory`` is the world's guest memory (host pages
    0..n-1 of the mapping; memslots say which gfns they back); the agent has its own mapping
    and memslot.

    A Guest can be reset in place (``reset``) and run the next program as a fresh one would:
    ``spoiled`` says why it must not be (a run that hung or failed), ``runs`` counts the
    operations it ran and ``programs`` the programs (fuzzmmu.kvm.pool decides from both)."""

    def __init__(self, world_pages: int, vcpus: int,
                 mmio_read: Callable[[int, int], int]) -> None:
        self.mmio_read = mmio_read  # the VMM's device model: what an MMIO read returns
        self.kvm = Kvm()
        self.vm: Vm | None = None
        self.memory = mmap.mmap(-1, world_pages * PAGE)
        self.agent = mmap.mmap(-1, AGENT_PAGES * PAGE)
        self.vcpus: list[Vcpu] = []
        self.layouts = [VcpuLayout(v) for v in range(vcpus)]
        self.codes = [agent_code(v) for v in range(vcpus)]
        self.world_slots: dict[int, WorldSlot] = {}  # the world's memslots now in KVM
        self.ran = False  # after the first KVM_RUN the host must not edit page tables
        self.run_timeout = RUN_TIMEOUT
        self.spoiled = ""  # why this VM cannot be reset for another program
        self.runs = 0  # agent operations run (each one or more KVM_RUNs)
        self.programs = 0  # programs run on this VM
        self.maxphyaddr = 0  # the vCPUs' CPUID's, once set_cpuid has set it
        try:
            self._check_host()
            self.vm = self.kvm.create_vm()
            self.memory_base = self._address(self.memory)
            self.agent_base = self._address(self.agent)
            self.agent_image = agent_image(vcpus)
            self.agent[:] = self.agent_image
            self.vm.set_memory_region(AGENT_SLOT, AGENT_GPA, AGENT_PAGES * PAGE, self.agent_base)
            self.cpuid = self.kvm.supported_cpuid()
            self.host_maxphyaddr = self._address_sizes().eax & 0xFF
            for _ in range(vcpus):
                self.vcpus.append(self.vm.create_vcpu())
            # What a reset loads back: the special registers of a vCPU that has never run.
            self._initial_sregs = [vcpu.get_sregs() for vcpu in self.vcpus]
        except BaseException:
            self.close()
            raise

    def _check_host(self) -> None:
        if not self.kvm.check_extension(abi.KVM_CAP_SYNC_REGS) & (
                abi.KVM_SYNC_X86_REGS | abi.KVM_SYNC_X86_SREGS) == 3:
            raise KvmUnavailable("KVM lacks KVM_CAP_SYNC_REGS for registers and sregs")

    def _address_sizes(self) -> abi.KvmCpuidEntry2:
        for i in range(self.cpuid.nent):
            if self.cpuid.entries[i].function == _LEAF_ADDRESS_SIZES:
                return self.cpuid.entries[i]
        raise KvmUnavailable("KVM offers no CPUID leaf 0x80000008 (address sizes)")

    def set_cpuid(self, maxphyaddr: int) -> None:
        """KVM_SET_CPUID2 on every vCPU: what KVM supports, with the program's MAXPHYADDR
        (at most the host's). Before any KVM_SET_SREGS: KVM checks CR4 and EFER against the
        guest's CPUID."""
        if maxphyaddr > self.host_maxphyaddr:
            raise ValueError(f"MAXPHYADDR {maxphyaddr} is above this host's "
                             f"{self.host_maxphyaddr}")
        leaf = self._address_sizes()
        leaf.eax = (leaf.eax & ~0xFF) | maxphyaddr
        # The reference is an Intel CPU (docs/model.md §2: reset_rsvds_bits_mask). KVM checks
        # the guest's reserved bits by its CPUID vendor (guest_cpuid_is_amd_compatible()):
        # with this host's AuthenticAMD, bit 8 of a PML4E or non-leaf PDPTE is reserved (AMD
        # APM Vol. 2 §5.3.3: MBZ), where Intel ignores it. Present an Intel CPU.
        for i in range(self.cpuid.nent):
            e = self.cpuid.entries[i]
            if e.function == 0:
                e.ebx, e.edx, e.ecx = struct.unpack("<3I", b"GenuineIntel")
        for vcpu in self.vcpus:
            vcpu.set_cpuid(self.cpuid)
        self.maxphyaddr = maxphyaddr

    @staticmethod
    def _address(m: mmap.mmap) -> int:
        view = ctypes.c_char.from_buffer(m)
        try:
            return ctypes.addressof(view)
        finally:
            del view  # a live view would keep the mapping from closing

    # ------------------------------------------------------------------ memory

    def map_world(self, slot: int, gfn: int, npages: int, host_page: int) -> None:
        """Create the memslot, or move it (KVM_MR_MOVE: same slot, size and memory)."""
        assert self.vm is not None
        self.vm.set_memory_region(slot, gfn * PAGE, npages * PAGE,
                                  self.memory_base + host_page * PAGE)
        self.world_slots[slot] = WorldSlot(slot, gfn, npages, host_page)

    def unmap_world(self, slot: int) -> None:
        assert self.vm is not None
        self.vm.set_memory_region(slot, 0, 0, 0)
        del self.world_slots[slot]

    def zap_all(self) -> None:
        """Delete and re-create the agent's memslot while no vCPU runs: deleting a memslot
        zaps every shadow page (kvm_arch_flush_shadow_memslot() -> kvm_mmu_zap_all_fast()
        under KVM_X86_QUIRK_SLOT_ZAP_ALL, on by default), as the model's zap-all does; the
        world's memslots are untouched."""
        assert self.vm is not None
        self.vm.set_memory_region(AGENT_SLOT, 0, 0, 0)
        self.vm.set_memory_region(AGENT_SLOT, AGENT_GPA, AGENT_PAGES * PAGE, self.agent_base)

    def reset(self, image: bytes, frames: Iterable[int], slots: Sequence[WorldSlot]) -> None:
        """Make this VM what a fresh one is before its first run: the world's memory ``image``
        back in ``frames`` (those that changed since it was fresh), the agent's memory, the
        world's memslots as ``slots`` (those a program deleted, moved or created put back),
        every vCPU's registers as at its creation. The CPUID, set per vCPU, stays (KVM refuses
        a different one after the first KVM_RUN); the shadow-page limit is the next program's
        to set.

        Why the host may write guest tables again, although KVM_RUN has run (``ran`` goes back
        to False): ``zap_all`` deletes a memslot, and kvm_set_memslot(KVM_MR_DELETE) ->
        kvm_arch_flush_shadow_memslot() -> kvm_mmu_zap_all_fast() zaps every shadow page of
        the VM (a new mmu_valid_gen makes them all obsolete, roots included; their sptes, rmaps
        and the write-protection of the guest tables they shadowed go, and KVM flushes the
        TLBs). That is KVM_X86_QUIRK_SLOT_ZAP_ALL, on unless the VMM disables it
        (KVM_CAP_DISABLE_QUIRKS2, which this one never does), and what every kernel since 5.4
        did before the quirk existed. The MMIO gva cache of a vCPU goes with the memslot
        generation (vcpu_match_mmio_gen()), and KVM_SET_SREGS with paging off unloads the
        vCPU's roots (kvm_mmu_reset_context()). Nothing built from the old tables is left: the
        next program's shadow pages are built at its faults, from the memory written here."""
        self.zap_all()
        for f in frames:
            self.memory[f * PAGE:(f + 1) * PAGE] = image[f * PAGE:(f + 1) * PAGE]
        self.agent[:] = self.agent_image
        want = {s.slot: s for s in slots}
        for slot, now in sorted(self.world_slots.items()):
            if want.get(slot) != now:
                self.unmap_world(slot)
        for s in slots:
            if s.slot not in self.world_slots:
                self.map_world(s.slot, s.gfn, s.npages, s.host_page)
        for vcpu, sregs in zip(self.vcpus, self._initial_sregs, strict=True):
            vcpu.set_sregs(sregs)
            # A fresh vCPU's sync-register area is zeros (KVM fills it at the first exit) and
            # the first operation loads it whole: R11-R15 as zeros, not as a program left them.
            run = vcpu.kvm_run
            run.kvm_dirty_regs = 0
            ctypes.memset(ctypes.addressof(run.s), 0, ctypes.sizeof(run.s))
        self.ran = False
        self.run_timeout = RUN_TIMEOUT

    # ------------------------------------------------------------------ vCPUs

    def boot(self, v: int, cr0: int, cr3: int, cr4: int, efer: int) -> None:
        """Put vCPU ``v`` in 64-bit mode at CPL0, with these control registers
        (KVM_SET_SREGS; CR0 keeps the agent's MP/ET/NE on), and run the agent's ``ping``."""
        vcpu = self.vcpus[v]
        layout = self.layouts[v]
        s = vcpu.get_sregs()
        s.cs, s.ss = _kernel_cs(), _kernel_ds()
        s.ds = s.es = s.fs = s.gs = _kernel_ds()
        s.tr = abi.KvmSegment(base=AGENT_VA + layout.tss, limit=0x67, selector=TSS_SEL[v],
                              type=0xB, present=1, s=0)
        s.ldt = abi.KvmSegment(type=0x2, present=0, unusable=1)
        s.gdt = abi.KvmDtable(base=AGENT_VA + 3 * PAGE, limit=GDT_LIMIT)
        s.idt = abi.KvmDtable(base=AGENT_VA + layout.idt, limit=32 * 16 - 1)
        s.cr0, s.cr3, s.cr4, s.efer = cr0 | CR0_AGENT, cr3, cr4, efer
        vcpu.set_sregs(s)
        result = self.run_op(v, "ping")
        if result.end != "done":
            raise KvmUnavailable(f"the agent did not start on vCPU {v}: {describe(result)}")

    def run_op(self, v: int, template: str, *, rdi: int = 0, rsi: int = 0, r8: int = 0,
               r9: int = 0, r10: int = 0x2) -> OpResult:
        """Run one agent operation on vCPU ``v``: ``template`` names a CPL0 entry point of
        the agent, entered with these registers (and RSP at the vCPU's kernel stack)."""
        vcpu = self.vcpus[v]
        regs = vcpu.regs
        regs.rip = self.codes[v].entry[template]
        regs.rsp = self.layouts[v].kstack_top
        regs.rflags = 0x2
        regs.rax = regs.rbx = regs.rcx = regs.rdx = regs.rbp = 0
        regs.rdi, regs.rsi, regs.r8, regs.r9, regs.r10 = rdi, rsi, r8, r9, r10
        vcpu.mark_regs_dirty()
        return self._run(v)

    def _run(self, v: int) -> OpResult:
        self.ran = True
        self.runs += 1
        try:
            result = self._exits(v)
        except BaseException as exc:
            self.spoiled = f"a run ended with {type(exc).__name__}: {exc}"
            raise
        if result.end in ("hang", "shutdown", "error"):
            self.spoiled = describe(result)
        return result

    def _exits(self, v: int) -> OpResult:
        vcpu = self.vcpus[v]
        run = vcpu.kvm_run
        exits = self.codes[v].exits
        mmio: list[tuple[int, int, bool, int]] = []
        for n in range(1, MAX_EXITS + 1):
            try:
                reason = vcpu.run(self.run_timeout)
            except KvmTimeout:
                self._recover(v)
                return OpResult("hang", detail=f"no exit in {self.run_timeout} s", mmio=mmio,
                                exits=n)
            if reason == abi.KVM_EXIT_HLT:
                which = exits.get(int(vcpu.regs.rip))
                if which == DONE:
                    return OpResult("done", rax=int(vcpu.regs.rax), mmio=mmio, exits=n)
                if which is not None:
                    return self._exception(v, which, mmio, n)
                continue  # a fetched HLT: the next run goes on after it
            if reason == abi.KVM_EXIT_MMIO:
                m = run.exit.mmio
                size = int(m.len)
                if m.is_write:
                    data = int.from_bytes(bytes(m.data[:size]), "little")
                else:
                    data = self.mmio_read(int(m.phys_addr), size)
                    for i in range(size):
                        m.data[i] = (data >> (8 * i)) & 0xFF
                mmio.append((int(m.phys_addr), size, bool(m.is_write), data))
                continue
            if reason == abi.KVM_EXIT_IO:
                if run.exit.io.direction == abi.KVM_EXIT_IO_IN:
                    vcpu.fill_io_in()  # a fetched IN from a port nobody owns reads zeros
                continue
            if reason == abi.KVM_EXIT_SHUTDOWN:
                return OpResult("shutdown", detail="KVM_EXIT_SHUTDOWN (triple fault)",
                                mmio=mmio, exits=n)
            detail = abi.EXIT_NAMES.get(reason, str(reason))
            if reason == abi.KVM_EXIT_INTERNAL_ERROR:
                detail += f" (suberror {run.exit.internal.suberror})"
            elif reason == abi.KVM_EXIT_FAIL_ENTRY:
                detail += f" (reason {run.exit.hardware_exit_reason:#x})"
            rip = int(vcpu.regs.rip)
            self._recover(v)
            return OpResult("error", rip=rip, detail=f"KVM_EXIT_{detail}", mmio=mmio, exits=n)
        self._recover(v)
        return OpResult("hang", detail=f"more than {MAX_EXITS} exits", mmio=mmio,
                        exits=MAX_EXITS)

    def _exception(self, v: int, vector: int, mmio: list[tuple[int, int, bool, int]], n: int
                   ) -> OpResult:
        vcpu = self.vcpus[v]
        # The IST stack is 16-byte aligned: the frame is SS, RSP, RFLAGS, CS, RIP from the
        # top, then the error code for the vectors that push one (SDM Vol. 3A §6.14.2).
        top = self.layouts[v].ist_top_offset
        has_code = vector in VECTORS_WITH_ERROR_CODE
        rip = struct.unpack_from("<Q", self.agent, top - 40)[0]
        code = struct.unpack_from("<Q", self.agent, top - 48)[0] if has_code else 0
        return OpResult("exception", rax=int(vcpu.regs.rax), vector=vector, error_code=code,
                        rip=rip, cr2=int(vcpu.sregs.cr2), mmio=mmio, exits=n)

    def _recover(self, v: int) -> None:
        """After an exit that left the vCPU somewhere unknown (a watchdog, an internal
        error): back to CPL0 by KVM_SET_SREGS, then ``ping`` until an exception KVM still had
        queued has been delivered."""
        vcpu = self.vcpus[v]
        s = vcpu.get_sregs()
        s.cs, s.ss = _kernel_cs(), _kernel_ds()
        vcpu.set_sregs(s)
        for _ in range(3):
            if self.run_op(v, "ping").end == "done":
                return
        raise KvmError(f"vCPU {v} could not be brought back to the agent")

    def control_registers(self, v: int) -> tuple[int, int, int, int]:
        """CR0 (without the agent's own bits), CR3, CR4, EFER as of the last exit."""
        s = self.vcpus[v].sregs
        return int(s.cr0) & ~CR0_AGENT, int(s.cr3), int(s.cr4), int(s.efer)

    def close(self) -> None:
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        self.vcpus = []
        self.kvm.close()
        for m in (self.memory, self.agent):
            if not m.closed:
                m.close()


def _kernel_cs() -> abi.KvmSegment:
    return abi.KvmSegment(base=0, limit=0xFFFFFFFF, selector=KCODE, type=0xB, present=1, dpl=0,
                          db=0, s=1, l=1, g=1)


def _kernel_ds() -> abi.KvmSegment:
    return abi.KvmSegment(base=0, limit=0xFFFFFFFF, selector=KDATA, type=0x3, present=1, dpl=0,
                          db=1, s=1, l=0, g=1)


def describe(result: OpResult) -> str:
    if result.end == "exception":
        return (f"exception {result.vector} at {result.rip:#x} (error code "
                f"{result.error_code:#x}, cr2 {result.cr2:#x})")
    return result.end + (f": {result.detail}" if result.detail else "")


__all__ = ["Guest", "OpResult", "WorldSlot", "describe"]
