"""What a guest (or its VMM) observes from one operation: the common currency of the model
machine and the reference machine, compared by the oracle."""

from __future__ import annotations

import enum
from typing import Final

from fuzzmmu.arch.bits import pferr_str


class ObsKind(enum.Enum):
    # Members are singletons compared by identity, so identity is a valid hash. Enum's own
    # __hash__ is a Python function (hash of the name), which the compiled model calls through
    # the interpreter for every dict keyed by a member: ~50 calls a program. The hot enums say
    # so with this line.
    __hash__ = object.__hash__
    DONE = "done"  # the operation completed with nothing to observe
    RAM = "ram"  # a memory access at host frame address ``addr`` with ``value``
    MMIO = "mmio"  # an exit to the VMM's device model at guest-physical ``addr``
    PF = "#PF"  # a page fault delivered to the guest: CR2 ``addr``, ``error_code``
    GP = "#GP"  # a control-register load that faults
    UD = "#UD"  # an instruction not valid here (RSM outside SMM)
    SHUTDOWN = "shutdown"  # the vCPU shut down (failed RSM)
    REJECTED = "rejected"  # the VMM's ioctl was refused (bad memslot update)
    HANG = "hang"  # the model retried the access without end
    VM_ERROR = "vm-error"  # KVM_RUN failed: the VMM sees an error and stops the VM


class Observation:
    """One outcome. A plain class, not a NamedTuple: the compiled model makes two per step,
    and a NamedTuple is built by a Python-level ``__new__``."""

    __slots__ = ("addr", "detail", "error_code", "kind", "value")

    def __init__(self, kind: ObsKind, addr: int = 0, value: int = 0, error_code: int = 0,
                 detail: str = "") -> None:
        self.kind = kind
        self.addr = addr
        self.value = value
        self.error_code = error_code
        self.detail = detail

    def _key(self) -> tuple[ObsKind, int, int, int, str]:
        return (self.kind, self.addr, self.value, self.error_code, self.detail)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Observation):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"Observation(kind={self.kind!r}, addr={self.addr!r}, value={self.value!r}, "
                f"error_code={self.error_code!r}, detail={self.detail!r})")

    def __str__(self) -> str:
        k = self.kind
        if k is ObsKind.RAM:
            return f"RAM hpa={self.addr:#x} value={self.value:#x}"
        if k is ObsKind.MMIO:
            return f"MMIO gpa={self.addr:#x} value={self.value:#x}"
        if k is ObsKind.PF:
            return (f"#PF cr2={self.addr:#x} error={self.error_code:#x} "
                    f"({pferr_str(self.error_code)})")
        return f"{k.value}{': ' + self.detail if self.detail else ''}"


DONE: Final = Observation(ObsKind.DONE)
GP: Final = Observation(ObsKind.GP)


def mmio_read_value(gpa: int, size: int) -> int:
    """What the VMM's device model returns for an MMIO read (the same on both machines)."""
    return ((gpa * 0x9E3779B97F4A7C15) >> 13) & ((1 << (8 * size)) - 1)


class AccessKind(enum.Enum):
    __hash__ = object.__hash__  # see fuzzmmu.world.observe.ObsKind
    READ = "read"
    WRITE = "write"
    FETCH = "fetch"
