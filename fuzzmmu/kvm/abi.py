"""The /dev/kvm ABI this package uses: ioctl numbers and the structures they pass, as in
<linux/kvm.h> and <asm/kvm.h> (x86), written out with ctypes.

Only what a long-mode guest driven one step at a time needs: VM and vCPU creation, memslots,
CPUID, registers (also through the shared ``kvm_run`` page, KVM_CAP_SYNC_REGS), KVM_RUN and
KVM_SET_NR_MMU_PAGES. Numbers follow the _IO/_IOR/_IOW/_IOWR encoding of <asm-generic/ioctl.h>.
"""

from __future__ import annotations

import ctypes

KVMIO = 0xAE
KVM_API_VERSION = 12  # KVM_GET_API_VERSION has returned 12 since Linux 2.6.22


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(0, nr, 0)


def _ior(nr: int, size: int) -> int:
    return _ioc(2, nr, size)


def _iow(nr: int, size: int) -> int:
    return _ioc(1, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(3, nr, size)


class KvmRegs(ctypes.Structure):
    """struct kvm_regs."""

    _fields_ = [(name, ctypes.c_uint64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
        "r12", "r13", "r14", "r15", "rip", "rflags")]


class KvmSegment(ctypes.Structure):
    """struct kvm_segment: a segment register with its hidden (descriptor cache) part."""

    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint32),
                ("selector", ctypes.c_uint16), ("type", ctypes.c_uint8),
                ("present", ctypes.c_uint8), ("dpl", ctypes.c_uint8), ("db", ctypes.c_uint8),
                ("s", ctypes.c_uint8), ("l", ctypes.c_uint8), ("g", ctypes.c_uint8),
                ("avl", ctypes.c_uint8), ("unusable", ctypes.c_uint8),
                ("padding", ctypes.c_uint8)]


class KvmDtable(ctypes.Structure):
    """struct kvm_dtable: GDTR or IDTR."""

    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16),
                ("padding", ctypes.c_uint16 * 3)]


class KvmSregs(ctypes.Structure):
    """struct kvm_sregs."""

    _fields_ = [("cs", KvmSegment), ("ds", KvmSegment), ("es", KvmSegment),
                ("fs", KvmSegment), ("gs", KvmSegment), ("ss", KvmSegment),
                ("tr", KvmSegment), ("ldt", KvmSegment), ("gdt", KvmDtable),
                ("idt", KvmDtable), ("cr0", ctypes.c_uint64), ("cr2", ctypes.c_uint64),
                ("cr3", ctypes.c_uint64), ("cr4", ctypes.c_uint64), ("cr8", ctypes.c_uint64),
                ("efer", ctypes.c_uint64), ("apic_base", ctypes.c_uint64),
                ("interrupt_bitmap", ctypes.c_uint64 * 4)]


class KvmVcpuEvents(ctypes.Structure):
    """struct kvm_vcpu_events (64 bytes); only its size matters here (it sits in the sync
    registers after kvm_sregs)."""

    _fields_ = [("raw", ctypes.c_uint8 * 64)]


class KvmSyncRegs(ctypes.Structure):
    """struct kvm_sync_regs (KVM_CAP_SYNC_REGS): registers KVM copies to and from the shared
    kvm_run page around KVM_RUN, saving a KVM_GET/SET_REGS/SREGS ioctl per exit."""

    _fields_ = [("regs", KvmRegs), ("sregs", KvmSregs), ("events", KvmVcpuEvents)]


KVM_SYNC_X86_REGS = 1 << 0
KVM_SYNC_X86_SREGS = 1 << 1


class KvmRunIo(ctypes.Structure):
    """kvm_run.io (KVM_EXIT_IO): the data is at ``data_offset`` in the kvm_run mapping."""

    _fields_ = [("direction", ctypes.c_uint8), ("size", ctypes.c_uint8),
                ("port", ctypes.c_uint16), ("count", ctypes.c_uint32),
                ("data_offset", ctypes.c_uint64)]


class KvmRunMmio(ctypes.Structure):
    """kvm_run.mmio (KVM_EXIT_MMIO): a read is completed by filling ``data`` and re-entering."""

    _fields_ = [("phys_addr", ctypes.c_uint64), ("data", ctypes.c_uint8 * 8),
                ("len", ctypes.c_uint32), ("is_write", ctypes.c_uint8)]


class KvmRunInternal(ctypes.Structure):
    """kvm_run.internal (KVM_EXIT_INTERNAL_ERROR)."""

    _fields_ = [("suberror", ctypes.c_uint32), ("ndata", ctypes.c_uint32),
                ("data", ctypes.c_uint64 * 16)]


class _ExitUnion(ctypes.Union):
    _fields_ = [("io", KvmRunIo), ("mmio", KvmRunMmio), ("internal", KvmRunInternal),
                ("hardware_exit_reason", ctypes.c_uint64), ("padding", ctypes.c_uint8 * 256)]


class _SyncUnion(ctypes.Union):
    _fields_ = [("regs", KvmSyncRegs), ("padding", ctypes.c_uint8 * 2048)]


class KvmRun(ctypes.Structure):
    """struct kvm_run, the page shared with KVM at offset 0 of the vCPU fd's mapping."""

    _fields_ = [("request_interrupt_window", ctypes.c_uint8),
                ("immediate_exit", ctypes.c_uint8), ("padding1", ctypes.c_uint8 * 6),
                ("exit_reason", ctypes.c_uint32),
                ("ready_for_interrupt_injection", ctypes.c_uint8),
                ("if_flag", ctypes.c_uint8), ("flags", ctypes.c_uint16),
                ("cr8", ctypes.c_uint64), ("apic_base", ctypes.c_uint64),
                ("exit", _ExitUnion), ("kvm_valid_regs", ctypes.c_uint64),
                ("kvm_dirty_regs", ctypes.c_uint64), ("s", _SyncUnion)]


class KvmUserspaceMemoryRegion(ctypes.Structure):
    """struct kvm_userspace_memory_region (KVM_SET_USER_MEMORY_REGION)."""

    _fields_ = [("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("guest_phys_addr", ctypes.c_uint64), ("memory_size", ctypes.c_uint64),
                ("userspace_addr", ctypes.c_uint64)]


class KvmCpuidEntry2(ctypes.Structure):
    """struct kvm_cpuid_entry2."""

    _fields_ = [("function", ctypes.c_uint32), ("index", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("eax", ctypes.c_uint32), ("ebx", ctypes.c_uint32),
                ("ecx", ctypes.c_uint32), ("edx", ctypes.c_uint32),
                ("padding", ctypes.c_uint32 * 3)]


MAX_CPUID_ENTRIES = 256


class KvmCpuid2(ctypes.Structure):
    """struct kvm_cpuid2 with room for MAX_CPUID_ENTRIES entries."""

    _fields_ = [("nent", ctypes.c_uint32), ("padding", ctypes.c_uint32),
                ("entries", KvmCpuidEntry2 * MAX_CPUID_ENTRIES)]


# The ioctls (the size in the number is that of the fixed part of the argument).
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, 8)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_NR_MMU_PAGES = _io(0x44)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, ctypes.sizeof(KvmUserspaceMemoryRegion))
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, ctypes.sizeof(KvmRegs))
KVM_SET_REGS = _iow(0x82, ctypes.sizeof(KvmRegs))
KVM_GET_SREGS = _ior(0x83, ctypes.sizeof(KvmSregs))
KVM_SET_SREGS = _iow(0x84, ctypes.sizeof(KvmSregs))
KVM_SET_CPUID2 = _iow(0x90, 8)

# KVM_CHECK_EXTENSION capabilities.
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SYNC_REGS = 74
KVM_CAP_X86_SMM = 117

# kvm_run.exit_reason values.
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
EXIT_NAMES = {0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG", 5: "HLT",
              6: "MMIO", 7: "IRQ_WINDOW_OPEN", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR",
              17: "INTERNAL_ERROR", 24: "SYSTEM_EVENT"}
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

# struct kvm_run.s sits at this offset (after the 256-byte exit union and the two masks).
assert KvmRun.s.offset == 304, KvmRun.s.offset
assert ctypes.sizeof(KvmSregs) == 312
