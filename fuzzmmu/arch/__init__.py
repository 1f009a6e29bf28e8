"""The architectural reference: x86 paging as the SDM defines it. Knows nothing of KVM.

Stable API (external checks build on it)::

    from fuzzmmu.arch import CpuState, Access, WalkResult, walk
"""

from fuzzmmu.arch.walker import (
    Access,
    CpuState,
    NonCanonicalAddress,
    PdpteLoadError,
    WalkResult,
    WalkStep,
    load_pdptrs,
    mode_from_label,
    walk,
    walk_trace,
)

__all__ = [
    "Access",
    "CpuState",
    "NonCanonicalAddress",
    "PdpteLoadError",
    "WalkResult",
    "WalkStep",
    "load_pdptrs",
    "mode_from_label",
    "walk",
    "walk_trace",
]
