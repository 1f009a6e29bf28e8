"""/dev/kvm from Python: the system, a VM and its vCPUs, with the standard library only
(os, fcntl, mmap, ctypes, signal).

Each class owns file descriptors and mappings and releases them in ``close()``. Errors are
``KvmError``; ``KvmUnavailable`` (a subclass) says that this host cannot run a VM at all, with
the reason, so that callers can skip instead of failing.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import signal
import threading
from types import FrameType

from fuzzmmu.kvm import abi

KVM_PATH = "/dev/kvm"


class KvmError(RuntimeError):
    """An ioctl on /dev/kvm, a VM or a vCPU failed."""


class KvmUnavailable(KvmError):
    """This host cannot run the KVM target (no /dev/kvm, no permission, an unusable module)."""


class KvmTimeout(KvmError):
    """KVM_RUN did not return within the watchdog's time (the guest loops)."""


def _ioctl(fd: int, request: int, arg: int | ctypes.Structure | ctypes.Array = 0,
           what: str = "") -> int:
    try:
        if isinstance(arg, int):
            return fcntl.ioctl(fd, request, arg)
        return fcntl.ioctl(fd, request, arg, True)
    except OSError as exc:
        raise KvmError(f"{what or hex(request)} failed: {os.strerror(exc.errno or 0)}") from exc


_supported_cpuid: bytes | None = None


class Kvm:
    """The KVM subsystem (an open /dev/kvm): capabilities and VM creation."""

    def __init__(self, path: str | None = None) -> None:
        path = path or KVM_PATH
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise KvmUnavailable(f"{path} does not exist (no KVM module loaded?)") from exc
        except PermissionError as exc:
            raise KvmUnavailable(f"{path}: permission denied (needs the kvm group or root)"
                                 ) from exc
        except OSError as exc:
            raise KvmUnavailable(f"{path}: {exc.strerror}") from exc
        try:
            version = fcntl.ioctl(self.fd, abi.KVM_GET_API_VERSION, 0)
        except OSError as exc:
            os.close(self.fd)
            raise KvmUnavailable(f"{path} is not a KVM device: {exc.strerror}") from exc
        if version != abi.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmUnavailable(f"KVM API version {version}, expected {abi.KVM_API_VERSION}")
        self.vcpu_mmap_size = _ioctl(self.fd, abi.KVM_GET_VCPU_MMAP_SIZE, 0,
                                     "KVM_GET_VCPU_MMAP_SIZE")

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, abi.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def supported_cpuid(self) -> abi.KvmCpuid2:
        """KVM_GET_SUPPORTED_CPUID: the CPUID leaves KVM can present to a guest (asked once
        per process; each call returns a copy to modify)."""
        global _supported_cpuid
        if _supported_cpuid is None:
            cpuid = abi.KvmCpuid2()
            cpuid.nent = abi.MAX_CPUID_ENTRIES
            _ioctl(self.fd, abi.KVM_GET_SUPPORTED_CPUID, cpuid, "KVM_GET_SUPPORTED_CPUID")
            _supported_cpuid = bytes(cpuid)
        return abi.KvmCpuid2.from_buffer_copy(_supported_cpuid)

    def create_vm(self) -> Vm:
        fd = _ioctl(self.fd, abi.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        return Vm(self, fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Vm:
    """One VM: memslots, the shadow-page limit, vCPUs."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self.vcpus: list[Vcpu] = []
        self.watchdog = Watchdog()
        self.watchdog.install()

    def set_memory_region(self, slot: int, gpa: int, size: int, uaddr: int) -> None:
        """KVM_SET_USER_MEMORY_REGION: create (size > 0), move (same slot, new gpa) or delete
        (size 0) a memslot. Deleting or moving one zaps every shadow page
        (kvm_arch_flush_shadow_memslot() with KVM_X86_QUIRK_SLOT_ZAP_ALL)."""
        region = abi.KvmUserspaceMemoryRegion(slot, 0, gpa, size, uaddr if size else 0)
        _ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION, region,
               f"KVM_SET_USER_MEMORY_REGION(slot {slot}, gpa {gpa:#x}, {size:#x} bytes)")

    def set_nr_mmu_pages(self, pages: int) -> None:
        """KVM_SET_NR_MMU_PAGES: the shadow-page limit (KVM refuses fewer than 64,
        KVM_MIN_ALLOC_MMU_PAGES)."""
        _ioctl(self.fd, abi.KVM_SET_NR_MMU_PAGES, pages, f"KVM_SET_NR_MMU_PAGES({pages})")

    def create_vcpu(self) -> Vcpu:
        index = len(self.vcpus)
        fd = _ioctl(self.fd, abi.KVM_CREATE_VCPU, index, "KVM_CREATE_VCPU")
        vcpu = Vcpu(self, index, fd)
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus = []
        self.watchdog.uninstall()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Watchdog:
    """A limit on the CPU time of one KVM_RUN: SIGPROF's handler raises, the ioctl returns
    EINTR and Python propagates the exception (PEP 475 retries only when the handler
    returns). A guest that loops burns CPU time, in the guest or in KVM, so the profiling
    timer (ITIMER_PROF) sees it; SIGALRM and the real-time timer stay libFuzzer's, whose
    -timeout runs on them. Each VM's watchdog is installed while the VM is in use (from its
    creation, or from leaving a pool, to its closing or return to the pool); each KVM_RUN only
    arms and disarms the timer. One handler serves every installed watchdog, in whatever
    order they come and go: it is set when the first is installed and the previous one is
    restored when the last goes (only one KVM_RUN runs at a time: signals reach only the main
    thread, and elsewhere there is no watchdog)."""

    _users = 0  # installed watchdogs
    _previous: object = None  # SIGPROF's handler before the first was installed
    _armed = False  # a KVM_RUN is under the timer

    def __init__(self) -> None:
        self.installed = False

    @staticmethod
    def _fire(signum: int, frame: FrameType | None) -> None:
        if Watchdog._armed:
            Watchdog._armed = False
            raise KvmTimeout("KVM_RUN did not return in time")

    def install(self) -> None:
        if self.installed or threading.current_thread() is not threading.main_thread():
            return
        if Watchdog._users == 0:
            Watchdog._previous = signal.signal(signal.SIGPROF, Watchdog._fire)
        Watchdog._users += 1
        self.installed = True

    def uninstall(self) -> None:
        if not self.installed:
            return
        self.installed = False
        Watchdog._users -= 1
        if Watchdog._users == 0:
            signal.setitimer(signal.ITIMER_PROF, 0)
            Watchdog._armed = False
            # None: the previous handler was not installed from Python; the default is the
            # closest to it (SIGPROF is nobody else's here).
            previous = Watchdog._previous if Watchdog._previous is not None else signal.SIG_DFL
            signal.signal(signal.SIGPROF, previous)  # type: ignore[arg-type]

    def arm(self, seconds: float) -> None:
        if self.installed:
            Watchdog._armed = True
            signal.setitimer(signal.ITIMER_PROF, seconds)

    def disarm(self) -> None:
        if Watchdog._armed:
            Watchdog._armed = False
            signal.setitimer(signal.ITIMER_PROF, 0)


class Vcpu:
    """One vCPU and its kvm_run page. Registers travel through the sync-register area of
    kvm_run (KVM_CAP_SYNC_REGS): KVM fills ``regs``/``sregs`` at every exit and loads those
    marked dirty at the next KVM_RUN."""

    def __init__(self, vm: Vm, index: int, fd: int) -> None:
        self.vm = vm
        self.index = index
        self.fd = fd
        self._map = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_state: abi.KvmRun | None = abi.KvmRun.from_buffer(self._map)
        self.run_state.kvm_valid_regs = abi.KVM_SYNC_X86_REGS | abi.KVM_SYNC_X86_SREGS
        self._watchdog = vm.watchdog

    @property
    def kvm_run(self) -> abi.KvmRun:
        if self.run_state is None:
            raise KvmError(f"vCPU {self.index} is closed")
        return self.run_state

    @property
    def regs(self) -> abi.KvmRegs:
        """The general registers as of the last exit; changes are loaded at the next run
        once ``mark_regs_dirty()`` is called."""
        return self.kvm_run.s.regs.regs

    @property
    def sregs(self) -> abi.KvmSregs:
        return self.kvm_run.s.regs.sregs

    def mark_regs_dirty(self) -> None:
        self.kvm_run.kvm_dirty_regs |= abi.KVM_SYNC_X86_REGS

    def mark_sregs_dirty(self) -> None:
        self.kvm_run.kvm_dirty_regs |= abi.KVM_SYNC_X86_SREGS

    def set_cpuid(self, cpuid: abi.KvmCpuid2) -> None:
        _ioctl(self.fd, abi.KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2")

    def get_sregs(self) -> abi.KvmSregs:
        sregs = abi.KvmSregs()
        _ioctl(self.fd, abi.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs: abi.KvmSregs) -> None:
        _ioctl(self.fd, abi.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def get_regs(self) -> abi.KvmRegs:
        regs = abi.KvmRegs()
        _ioctl(self.fd, abi.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def set_regs(self, regs: abi.KvmRegs) -> None:
        _ioctl(self.fd, abi.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def run(self, timeout: float) -> int:
        """KVM_RUN until the next exit to userspace; returns kvm_run.exit_reason. Raises
        KvmTimeout when the watchdog fires."""
        self._watchdog.arm(timeout)
        try:
            fcntl.ioctl(self.fd, abi.KVM_RUN, 0)
        except OSError as exc:
            if exc.errno == errno.EINTR:
                raise KvmTimeout("KVM_RUN was interrupted") from exc
            raise KvmError(f"KVM_RUN failed: {os.strerror(exc.errno or 0)}") from exc
        finally:
            self._watchdog.disarm()
        return int(self.kvm_run.exit_reason)

    def fill_io_in(self) -> None:
        """Answer a KVM_EXIT_IO read (IN) with zeros: the data goes at ``data_offset`` inside
        the kvm_run mapping and is read by KVM at the next KVM_RUN."""
        io = self.kvm_run.exit.io
        start = int(io.data_offset)
        self._map[start:start + io.size * io.count] = bytes(io.size * io.count)

    def close(self) -> None:
        self.run_state = None  # drop the ctypes view before the mapping goes
        if not self._map.closed:
            self._map.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
