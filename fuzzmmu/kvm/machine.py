"""KvmMachine: the executor's machine under test, played by real KVM.

It has the methods of ``fuzzmmu.model.machine.Machine`` that the executor calls
(``fuzzmmu.oracle.executor.TargetMachine``) and answers with the same Observations, from a VM
whose guest memory is the world's (same frames, memslots, boot root and direct map: see
fuzzmmu/world/layout.py) and whose vCPUs run the agent (fuzzmmu/kvm/agent.py):

* a guest access is one agent operation at the op's CPL: at CPL0 KVM emulates the instruction
  (its emulator and software walker), at CPL3 it runs natively on KVM's shadow page tables;
* MOV to CR0/CR3/CR4, WRMSR to EFER and INVLPG are guest instructions at CPL0;
* the world's memslot updates are KVM_SET_USER_MEMORY_REGION, KVM_SET_NR_MMU_PAGES is itself,
  zap-all is the deletion of a spare memslot (which zaps every shadow page).

Paging off cannot run on this host (long mode only), so the boot the executor lowers (a store
of the kernel half into the root, CR4, EFER, CR3, then CR0.PG) is done by the VMM: the store
before the first KVM_RUN into the world memory, the registers by KVM_SET_SREGS when CR0.PG is
written. After that every change to guest memory is made by the guest.

What the machine cannot do raises ``Unsupported`` (the program is skipped, with the reason).

How an observation is made (and its limits, see ``_frame``): a read's value is what the guest
got; an MMIO access's address and data come from KVM_EXIT_MMIO; a #PF's error code and CR2
from the exception frame and CR2. Which frame a RAM access reached is not visible to the
guest: it is inferred from memory (for a write, the frame whose bytes changed to the value; for
a read, the frame the current tables give if it holds the value read, else the one frame that
does), so a stale translation to a frame with the same bytes looks like the current one.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Iterator

import numpy as np

from fuzzmmu.arch.bits import (
    CR0_PE,
    CR0_PG,
    CR0_WP,
    EFER_LMA,
    PAGE_SHIFT,
    PTE_A,
    PTE_D,
    PTE_P,
    PTE_PS,
    PagingMode,
    paging_mode,
)
from fuzzmmu.arch.walker import Access, CpuState, walk_trace
from fuzzmmu.kvm.agent import (
    AGENT_GPA,
    AGENT_LINK_OFFSET,
    AGENT_PAGES,
    PAGE,
    RFLAGS_FIXED,
    RFLAGS_TF,
)
from fuzzmmu.kvm.device import KvmError
from fuzzmmu.kvm.guest import OpResult, describe
from fuzzmmu.kvm.pool import AGENT_ROOTS, NUM_VCPUS, GuestPool, new_guest, world_image
from fuzzmmu.oracle.executor import Unsupported
from fuzzmmu.program.ops import Program
from fuzzmmu.world.layout import new_world
from fuzzmmu.world.memory import GuestMemoryError
from fuzzmmu.world.memslots import MemslotError, MemslotUpdate, PhysMemory
from fuzzmmu.world.observe import DONE, GP, AccessKind, Observation, ObsKind, mmio_read_value

MIN_MMU_PAGES = 64  # KVM_MIN_ALLOC_MMU_PAGES: KVM_SET_NR_MMU_PAGES refuses fewer
PF_VECTOR, UD_VECTOR, GP_VECTOR = 14, 6, 13
UNKNOWN_FRAME = 0xFFFF_FFFF_FFFF_F000  # the address of a RAM access whose frame is unknown


_libc = ctypes.CDLL(None)
_memcmp = _libc.memcmp
_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_memcmp.restype = ctypes.c_int


def _merged(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Half-open ranges, overlapping ones merged, in order."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(hi, out[-1][1]))
        else:
            out.append((lo, hi))
    return out


class _NoPdptrs:
    """Long mode has no PDPTE registers: what the executor compares reads as zeros."""

    pdptrs = (0, 0, 0, 0)


class _PastMemory:
    """Address space 0 with some frames as they were earlier (the walker's Memory)."""

    __slots__ = ("old", "phys")

    def __init__(self, phys: PhysMemory, old: dict[int, bytes]) -> None:
        self.phys = phys
        self.old = old

    def read(self, gpa: int, size: int) -> int:
        frame = self.phys.gfn_to_pfn(0, gpa >> PAGE_SHIFT)
        if frame < 0:
            raise GuestMemoryError(f"gpa {gpa:#x} is not RAM")
        off = gpa & (PAGE - 1)
        page = self.old.get(frame)
        if page is None:
            return self.phys.backing.read((frame << PAGE_SHIFT) | off, size)
        return int.from_bytes(page[off:off + size], "little")

    def write(self, gpa: int, size: int, value: int) -> None:
        raise AssertionError("the past is read only: walks of it set no A/D bits")


class KvmVcpuState:
    """The architectural state the executor compares: the control registers as KVM reports
    them after the last exit (CR0 without the agent's MP/ET/NE). Until the boot's CR0.PG write
    the vCPU has not run and these are the values the VMM will load."""

    __slots__ = ("booted", "cr0", "cr3", "cr4", "dead", "efer", "mmu", "smm")

    def __init__(self) -> None:
        self.cr0 = CR0_PE | CR0_WP  # the world's reset state: paging off
        self.cr3 = 0
        self.cr4 = 0
        self.efer = 0
        self.smm = 0
        self.dead = False
        self.booted = False
        self.mmu = _NoPdptrs()


class KvmMachine:
    """Real KVM behind the executor's machine interface. With a ``pool`` the VM comes from it
    and goes back to it (reset in place) at ``destroy`` when the program left it fit to run
    another; without one it is a fresh VM, closed at ``destroy``."""

    def __init__(self, program: Program, pool: GuestPool | None = None) -> None:
        h = program.header
        backing, slots, host = new_world()
        self.maxphyaddr = h.maxphyaddr
        self.dead = ""  # why the VM stopped
        try:
            self.guest = new_guest(h.maxphyaddr) if pool is None else pool.take(h.maxphyaddr)
        except ValueError as exc:
            raise Unsupported(f"maxphyaddr={h.maxphyaddr}: {exc}") from exc
        self._pool = pool
        try:
            self._set_mmu_pages(h.mmu_pages)
        except BaseException:
            self.guest.close()
            raise
        # ``phys.backing`` is what the executor compares: a copy of KVM's guest memory, taken
        # after every operation, with the agent's root entries hidden (``_sync``).
        self.phys = PhysMemory(backing, slots, host)
        self._seen: np.ndarray = np.frombuffer(world_image(), dtype=np.uint8).copy()
        self._seen_base = self._seen.ctypes.data
        self._changed: set[int] = set()  # frames of guest memory changed since it was fresh
        self._synced_runs = self.guest.runs  # the guest's runs that _sync has looked after
        self.vcpus = [KvmVcpuState() for _ in range(NUM_VCPUS)]
        self.ambiguous = 0  # RAM accesses whose frame more than one frame could explain
        # The frame each (vCPU, linear page) last reached: the translation a stale TLB entry
        # or spte would still give, the first guess when the current tables do not explain a
        # read.
        self._last_frame: dict[tuple[int, int], int] = {}
        # The earlier contents of the frames each look at memory found changed, oldest first:
        # the guest tables of earlier moments, whose translations KVM may still hold.
        self._past: list[dict[int, bytes]] = []

    def destroy(self) -> None:
        """Give the VM back to the pool, or close it: one that a program left in doubt (a run
        that hung or failed, a dead vCPU or VM, guest writes ``_sync`` has not seen) is never
        reused."""
        fit = (not self.dead and not self.guest.spoiled and self._synced_runs == self.guest.runs
               and not any(c.dead for c in self.vcpus))
        if self._pool is not None and fit:
            self._pool.give_back(self.guest, self._changed)
        else:
            self.guest.close()

    def regs(self, v: int) -> tuple[int, int, int, int, int]:
        c = self.vcpus[v]
        return c.cr0, c.cr3, c.cr4, c.efer, c.smm

    # ------------------------------------------------------------------ memory

    def _sync(self) -> dict[int, bytes]:
        """Copy the frames KVM's guest memory changed in since the last look into
        ``phys.backing`` (and its ``dirty`` set); return their previous contents.

        Only the frames a memslot maps now can have changed since the last look (after every
        guest operation; a memslot update runs no guest code): per memslot, one memcmp says
        whether any did (nothing did after some 40% of operations) and numpy finds which."""
        now = np.frombuffer(self.guest.memory, dtype=np.uint64)
        try:
            seen = self._seen
            seen64 = seen.view(np.uint64)
            words = PAGE // 8
            changed: list[int] = []
            for lo, hi in _merged((s.host_page, s.host_page + s.npages)
                                  for s in self.guest.world_slots.values()):
                if not _memcmp(self.guest.memory_base + lo * PAGE,
                               self._seen_base + lo * PAGE, (hi - lo) * PAGE):
                    continue
                # np.not_equal, not `!=`: under a KVM campaign this module is instrumented,
                # and Atheris's hook on a comparison operator keeps the array it returns (a
                # leak of the memory's size on every step, libFuzzer's RSS limit within a
                # minute).
                diff = np.not_equal(now[lo * words:hi * words], seen64[lo * words:hi * words])
                changed += (np.flatnonzero(diff.reshape(hi - lo, words).any(axis=1)) + lo
                            ).tolist()
            self._synced_runs = self.guest.runs
            self._changed.update(changed)
            before: dict[int, bytes] = {}
            backing = self.phys.backing
            mem = now.view(np.uint8)
            for f in changed:
                lo, hi = f << PAGE_SHIFT, (f + 1) << PAGE_SHIFT
                before[f] = seen[lo:hi].tobytes()
                seen[lo:hi] = mem[lo:hi]
                page = backing.page(f)
                page[:] = mem[lo:hi]
                if f in AGENT_ROOTS:
                    page[AGENT_LINK_OFFSET:AGENT_LINK_OFFSET + 8] = 0
                backing.dirty.add(f)
            if before:
                self._past.append(before)
            return before
        finally:
            del now  # no view of the mapping may outlive this call (mmap.close())

    def _ram_frames(self) -> list[int]:
        """Host frames that back a gfn of address space 0, in frame order."""
        return sorted({self.phys.host.pfn[hva] for hva in self.phys.slots.hva_table[0].values()})

    def _cpu(self, v: int) -> CpuState:
        c = self.vcpus[v]
        return CpuState(cr0=c.cr0, cr3=c.cr3, cr4=c.cr4, efer=c.efer, maxphyaddr=self.maxphyaddr)

    def _walk(self, v: int, gva: int, kind: AccessKind, cpl: int,
              entries: set[int] | None = None) -> int | None:
        """The gpa the current guest tables give for this access (None: they fault); the host
        byte addresses of the entries the walk reads go into ``entries`` if given. Raises
        Unsupported for a walk through a 1 GiB page, which this host's CPUID does not offer
        (a PDPTE with PS=1 faults with RSVD here, while the reference allows it), and for a
        walk that reads a table in, or translates to, the agent's memory (MMIO to the
        reference, RAM to KVM)."""
        acc = Access(write=kind is AccessKind.WRITE, user=cpl == 3,
                     fetch=kind is AccessKind.FETCH)
        res, steps = walk_trace(self.phys.view(0), self._cpu(v), gva, acc)
        for where in (res.gpa, *(step.entry_gpa for step in steps)):
            if where is not None and AGENT_GPA <= where < AGENT_GPA + AGENT_PAGES * PAGE:
                raise Unsupported(f"the access at {gva:#x} reaches the agent's memory at "
                                  f"gpa {where:#x}")
        for step in steps:
            if step.level == 3 and step.value & PTE_P and step.value & PTE_PS:
                raise Unsupported(f"the access at {gva:#x} walks a 1 GiB page (PDPTE "
                                  f"{step.value:#x}), which this host does not offer")
            if entries is not None and step.entry_gpa is not None:
                frame = self.phys.gfn_to_pfn(0, step.entry_gpa >> PAGE_SHIFT)
                if frame >= 0:  # a table in MMIO is no memory the guest could change
                    entries.add((frame << PAGE_SHIFT) | (step.entry_gpa & (PAGE - 1)))
        return res.gpa if res.ok else None

    def _frame(self, v: int, gpa: int | None, gva: int, width: int, value: int, write: bool,
               before: dict[int, bytes]) -> int:
        """The host frame a RAM access of ``value`` at ``gva`` reached, as far as memory
        tells: for a write, the one frame whose bytes at the page offset changed to the value;
        else the frame of the current translation (``gpa``) if it holds the value; else the
        frame an earlier access to the page reached (this vCPU's, then the other's) if it holds
        it; else a frame an earlier state of the tables gave, newest first, if it holds it;
        else the one frame that holds it, or the lowest (``ambiguous`` counts the guesses);
        else UNKNOWN_FRAME."""
        off = gva & 0xFFF
        want = value.to_bytes(width, "little")
        mem = self.phys.backing

        def holds(f: int) -> bool:
            return f >= 0 and mem.read((f << PAGE_SHIFT) + off, width) == value

        if write:
            moved = [f for f, old in before.items() if old[off:off + width] != want and holds(f)]
            if len(moved) == 1:
                return moved[0]
        fresh = self.phys.gfn_to_pfn(0, gpa >> PAGE_SHIFT) if gpa is not None else -1
        for f in (fresh, *self._earlier_frames(v, gva)):
            if holds(f):
                return f
        for f in self._past_frames(v, gva):
            if holds(f):
                return f
        holders = [f for f in self._ram_frames() if holds(f)]
        if len(holders) > 1:
            self.ambiguous += 1
        return holders[0] if holders else UNKNOWN_FRAME >> PAGE_SHIFT

    def _earlier_frames(self, v: int, gva: int) -> list[int]:
        """The frame an access to ``gva``'s page reached last, this vCPU's then the other's
        (-1: none)."""
        page = gva >> PAGE_SHIFT
        return [self._last_frame.get((u, page), -1)
                for u in sorted(range(len(self.vcpus)), key=lambda u: u != v)]

    def _past_frames(self, v: int, gva: int) -> Iterator[int]:
        """The frames earlier states of the guest tables translated ``gva`` to, newest first:
        a stale spte (an unsync page's) or TLB entry may still give one, and the SDM lets a
        processor cache a translation it never used (§4.10.2.3). Without this a read that
        several frames could explain was pinned on the lowest of them."""
        old: dict[int, bytes] = {}
        cpu = self._cpu(v)
        for before in reversed(self._past):
            old.update(before)  # going back in time: the older contents win
            res, _ = walk_trace(_PastMemory(self.phys, old), cpu, gva, Access())
            if res.ok and res.gpa is not None:
                frame = self.phys.gfn_to_pfn(0, res.gpa >> PAGE_SHIFT)
                if frame >= 0:
                    yield frame

    # ------------------------------------------------------------------ guest operations

    def _stopped(self, v: int) -> Observation | None:
        if self.dead:
            return Observation(ObsKind.VM_ERROR, detail=self.dead)
        if self.vcpus[v].dead:
            return Observation(ObsKind.SHUTDOWN, detail=f"vCPU {v} is shut down")
        return None

    def _after(self, v: int, result: OpResult) -> Observation | None:
        """Take in the registers after an operation; an observation if it ended the vCPU or
        the VM."""
        c = self.vcpus[v]
        c.cr0, c.cr3, c.cr4, c.efer = self.guest.control_registers(v)
        if result.end == "shutdown":
            c.dead = True
            return Observation(ObsKind.SHUTDOWN, detail=result.detail)
        if result.end == "hang":
            return Observation(ObsKind.HANG, detail=result.detail)
        if result.end == "error":
            self.dead = f"{result.detail} at rip {result.rip:#x}"
            return Observation(ObsKind.VM_ERROR, detail=self.dead)
        return None

    def access(self, v: int, gva: int, kind: AccessKind, *, cpl: int = 0, ac: bool = False,
               width: int = 8, value: int = 0) -> Observation:
        """One guest load, store or fetch. ``ac`` (EFLAGS.AC) only matters with SMAP, which
        this host does not offer; it is not set."""
        stopped = self._stopped(v)
        if stopped is not None:
            return stopped
        c = self.vcpus[v]
        if not c.booted:
            return self._access_paging_off(gva, kind, width, value)
        if not c.efer & EFER_LMA:
            raise Unsupported("an access outside long mode")
        path: set[int] = set()
        gpa = self._walk(v, gva, kind, cpl, path if kind is AccessKind.FETCH else None)
        write = kind is AccessKind.WRITE
        layout, code = self.guest.layouts[v], self.guest.codes[v]
        if kind is AccessKind.FETCH:
            # IRETQ to the address with TF set; every register poisoned (fuzzmmu.kvm.agent).
            result = self.guest.run_op(
                v, "to_user_poisoned" if cpl == 3 else "to_kernel_poisoned", r9=gva,
                r8=layout.scratch_top, r10=RFLAGS_FIXED | RFLAGS_TF)
            self._check_fetch_wrote_nothing(gva, self._sync(), path)
            if result.end == "error" and result.detail.startswith("KVM_EXIT_INTERNAL_ERROR"):
                # KVM fetched the bytes and could not emulate them (kvm_pvm emulates CPL0).
                self._after(v, OpResult("done"))
                return self._fetched(v, gva, width, gpa, result)
            return self._after(v, result) or self._fetched(v, gva, width, gpa, result)
        name = f"{'write' if write else 'read'}{width}"
        if cpl == 3:
            result = self.guest.run_op(v, "to_user", rdi=gva, rsi=value, r8=layout.ustack_top,
                                       r9=code.access_at["u_" + name], r10=RFLAGS_FIXED)
            at, ok = code.access_at["u_" + name], (
                result.end == "exception" and result.vector == UD_VECTOR
                and result.rip == code.ud2_at["u_" + name])
        else:
            result = self.guest.run_op(v, "k_" + name, rdi=gva, rsi=value)
            at, ok = code.entry["k_" + name], result.end == "done"
        before = self._sync()
        stopped = self._after(v, result)
        if stopped is not None:
            return stopped
        if result.mmio:
            mgpa, _size, _write, data = result.mmio[0]
            return Observation(ObsKind.MMIO, mgpa, data)
        if ok:
            got = value if write else result.rax & ((1 << (8 * width)) - 1)
            frame = self._frame(v, gpa, gva, width, got, write, before)
            self._last_frame[v, gva >> PAGE_SHIFT] = frame
            return Observation(ObsKind.RAM, (frame << PAGE_SHIFT) | (gva & 0xFFF), got)
        if result.end == "exception" and result.vector == PF_VECTOR and result.rip == at:
            return Observation(ObsKind.PF, result.cr2, 0, result.error_code)
        return self._unexpected(v, result)

    def _check_fetch_wrote_nothing(self, gva: int, before: dict[int, bytes], path: set[int]
                                   ) -> None:
        """The instruction a fetch executes runs with every register non-canonical, but one
        with an absolute or RIP-relative operand still reaches memory: if it wrote anything
        beyond A/D bits, or A/D bits of an entry off the fetch's own walk (``path``, host byte
        addresses: its data access walked elsewhere), the program cannot be compared."""
        for f, old in before.items():
            was = np.frombuffer(old, dtype=np.uint64)
            now = self._seen[f << PAGE_SHIFT:(f + 1) << PAGE_SHIFT].view(np.uint64)
            diff = was ^ now
            other = np.flatnonzero(diff & np.uint64(~(PTE_A | PTE_D) & (2**64 - 1)))
            if other.size:
                raise Unsupported(f"the instruction fetched at {gva:#x} wrote guest memory "
                                  f"(frame {f:#x} offset {int(other[0]) * 8:#x})")
            for i in np.flatnonzero(diff).tolist():
                if (f << PAGE_SHIFT) | (i * 8) not in path:
                    raise Unsupported(f"the instruction fetched at {gva:#x} reached memory: "
                                      f"A/D bits of an entry off the fetch's walk changed "
                                      f"(frame {f:#x} offset {i * 8:#x})")

    def _fetched(self, v: int, gva: int, width: int, gpa: int | None, result: OpResult
                 ) -> Observation:
        """A fetch faulted if a #PF came at the address itself with CR2 in its page;
        anything else (the single-step #DB, a fault of the fetched instruction, an emulation
        failure of KVM's) means the bytes were fetched. Their frame is the current
        translation's: a fetch has no value to tell another one by. Where the current tables
        fault, it is the most recent earlier translation's: the frame an access to the page
        reached last (this vCPU's, then the other's), else the newest earlier state of the
        tables' (the reference still decides whether the processor may have kept it)."""
        if (result.end == "exception" and result.vector == PF_VECTOR and result.rip == gva
                and result.cr2 >> PAGE_SHIFT == gva >> PAGE_SHIFT):
            return Observation(ObsKind.PF, result.cr2, 0, result.error_code)
        if gpa is None:
            frame = next((f for f in (*self._earlier_frames(v, gva), *self._past_frames(v, gva))
                          if f >= 0), -1)
            if frame < 0:
                return Observation(ObsKind.RAM, UNKNOWN_FRAME | (gva & 0xFFF), 0)
            hpa = (frame << PAGE_SHIFT) | (gva & 0xFFF)
            return Observation(ObsKind.RAM, hpa, self.phys.backing.read(hpa, width))
        pfn = self.phys.gfn_to_pfn(0, gpa >> PAGE_SHIFT)
        if pfn < 0:
            return Observation(ObsKind.MMIO, gpa, mmio_read_value(gpa, width))
        hpa = (pfn << PAGE_SHIFT) | (gpa & 0xFFF)
        return Observation(ObsKind.RAM, hpa, self.phys.backing.read(hpa, width))

    def _unexpected(self, v: int, result: OpResult) -> Observation:
        if result.end == "exception" and result.vector == GP_VECTOR:
            return GP
        if result.end == "exception" and result.vector == UD_VECTOR:
            return Observation(ObsKind.UD, detail=describe(result))
        self.dead = f"the agent on vCPU {v} ended with {describe(result)}"
        return Observation(ObsKind.VM_ERROR, detail=self.dead)

    def _access_paging_off(self, gva: int, kind: AccessKind, width: int, value: int
                           ) -> Observation:
        """The boot's store of the kernel half, while the vCPU is (virtually) in protected
        mode without paging: the VMM writes guest memory, which it may do only before the
        first KVM_RUN (KVM would not see an edit of a page table after it)."""
        if kind is AccessKind.FETCH:
            raise Unsupported("a fetch with paging off")
        gpa = gva & 0xFFFF_FFFF
        pfn = self.phys.gfn_to_pfn(0, gpa >> PAGE_SHIFT)
        if pfn < 0:
            raise Unsupported("an MMIO access with paging off")
        hpa = (pfn << PAGE_SHIFT) | (gpa & 0xFFF)
        if kind is AccessKind.READ:
            return Observation(ObsKind.RAM, hpa, int.from_bytes(
                self.guest.memory[hpa:hpa + width], "little"))
        if self.guest.ran:
            raise Unsupported("a store with paging off after the VM started running")
        self.guest.memory[hpa:hpa + width] = value.to_bytes(width, "little")
        self._sync()
        return Observation(ObsKind.RAM, hpa, value)

    def _cr_op(self, v: int, template: str, value: int) -> Observation:
        result = self.guest.run_op(v, template, rdi=value)
        self._sync()
        stopped = self._after(v, result)
        if stopped is not None:
            return stopped
        if result.end == "done":
            return DONE
        return self._unexpected(v, result)

    def write_cr0(self, v: int, value: int) -> Observation:
        stopped = self._stopped(v)
        if stopped is not None:
            return stopped
        c = self.vcpus[v]
        if not c.booted:
            return self._boot(v, value)
        if not value & CR0_PG:
            raise Unsupported("clearing CR0.PG leaves long mode, which this host cannot run")
        return self._cr_op(v, "mov_cr0", value)

    def _boot(self, v: int, cr0: int) -> Observation:
        """The CR0 write of the boot: with PG set, the vCPU enters 4-level paging with the CR3,
        CR4 and EFER the boot wrote, by KVM_SET_SREGS."""
        c = self.vcpus[v]
        if not cr0 & CR0_PG:
            c.cr0 = cr0
            return DONE
        mode = paging_mode(cr0, c.cr4, c.efer | EFER_LMA)
        if mode is not PagingMode.LONG4:
            raise Unsupported(f"booting into {mode.label} paging; this host runs long mode only")
        if c.cr3 >> PAGE_SHIFT not in AGENT_ROOTS:
            raise Unsupported(f"CR3 {c.cr3:#x} is not a root the agent is linked into")
        try:
            self.guest.boot(v, cr0, c.cr3, c.cr4, c.efer | EFER_LMA)
        except KvmError as exc:
            self.dead = str(exc)
            return Observation(ObsKind.VM_ERROR, detail=self.dead)
        c.booted = True
        c.cr0, c.cr3, c.cr4, c.efer = self.guest.control_registers(v)
        self._sync()
        return DONE

    def write_cr3(self, v: int, value: int) -> Observation:
        stopped = self._stopped(v)
        if stopped is not None:
            return stopped
        if not self.vcpus[v].booted:
            self.vcpus[v].cr3 = value
            return DONE
        if value >> PAGE_SHIFT not in AGENT_ROOTS:
            raise Unsupported(f"CR3 {value:#x} is not a root the agent is linked into")
        return self._cr_op(v, "mov_cr3", value)

    def write_cr4(self, v: int, value: int) -> Observation:
        return self._register_write(v, "cr4", "mov_cr4", value)

    def write_efer(self, v: int, value: int) -> Observation:
        return self._register_write(v, "efer", "wrmsr_efer", value)

    def _register_write(self, v: int, register: str, template: str, value: int
                        ) -> Observation:
        """Before the boot the VMM keeps the value for KVM_SET_SREGS; after it the guest
        writes the register itself."""
        stopped = self._stopped(v)
        if stopped is not None:
            return stopped
        if not self.vcpus[v].booted:
            setattr(self.vcpus[v], register, value)
            return DONE
        return self._cr_op(v, template, value)

    def invlpg(self, v: int, gva: int) -> Observation:
        stopped = self._stopped(v)
        if stopped is not None:
            return stopped
        if not self.vcpus[v].booted:
            raise Unsupported("INVLPG with paging off")
        return self._cr_op(v, "invlpg", gva)

    def smi(self, v: int) -> Observation:
        raise Unsupported("this host has no SMM (KVM_CAP_X86_SMM is 0)")

    def rsm(self, v: int) -> Observation:
        raise Unsupported("this host has no SMM (KVM_CAP_X86_SMM is 0)")

    # ------------------------------------------------------------------ VMM / host operations

    def set_memslot(self, upd: MemslotUpdate) -> Observation:
        """KVM_SET_USER_MEMORY_REGION in address space 0, after the world's own checks (the
        model and the reference refuse the same updates)."""
        if self.dead:
            return Observation(ObsKind.VM_ERROR, detail=self.dead)
        if upd.as_id != 0:
            raise Unsupported("address space 1 is SMM's, and this host has no SMM")
        slots = self.phys.slots
        try:
            old, new = slots.check(upd)
        except MemslotError as exc:
            return Observation(ObsKind.REJECTED, detail=str(exc))
        if new is old:
            return DONE
        after = slots.copy()
        after.install(old, new)
        for v, c in enumerate(self.vcpus):
            if c.booted and after.lookup(0, c.cr3 >> PAGE_SHIFT) is None:
                raise Unsupported(f"the update unmaps vCPU {v}'s root, through which the "
                                  "agent runs")
        try:
            if new is None:
                self.guest.unmap_world(upd.slot_id)
            else:  # a create, or a move (KVM_MR_MOVE: same slot, size and memory, new gpa)
                self.guest.map_world(new.slot_id, new.base_gfn, new.npages, new.hva)
        except KvmError as exc:
            self.dead = str(exc)
            return Observation(ObsKind.VM_ERROR, detail=self.dead)
        slots.install(old, new)
        return DONE

    def migrate_page(self, as_id: int, gfn: int) -> Observation:
        raise Unsupported("no host interface moves one page of a memslot (page migration)")

    def zap_all(self) -> Observation:
        if self.dead:
            return Observation(ObsKind.VM_ERROR, detail=self.dead)
        self.guest.zap_all()
        return DONE

    def shrink(self, nr_to_scan: int) -> Observation:
        raise Unsupported("no host interface runs the MMU shrinker on one VM")

    def set_max_pages(self, goal: int) -> Observation:
        if goal < 16:
            return Observation(ObsKind.REJECTED, detail="fewer than 16 shadow pages")
        if self.dead:
            return Observation(ObsKind.VM_ERROR, detail=self.dead)
        self._set_mmu_pages(goal)
        return DONE

    def _set_mmu_pages(self, goal: int) -> None:
        """KVM_SET_NR_MMU_PAGES; KVM refuses fewer than 64 pages, so a smaller limit becomes
        64 (only how soon shadow pages are recycled changes, which the guest cannot see)."""
        assert self.guest.vm is not None
        self.guest.vm.set_nr_mmu_pages(max(goal, MIN_MMU_PAGES))

