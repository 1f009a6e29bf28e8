"""Divergences: the first place model and reference disagree, classified and signed for
deduplication."""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

from fuzzmmu.arch.bits import pferr_str
from fuzzmmu.world.observe import Observation, ObsKind


class DivergenceKind(enum.Enum):
    WRONG_TRANSLATION = "wrong-translation"
    MISSING_FAULT = "missing-fault"
    SPURIOUS_FAULT = "spurious-fault"
    WRONG_ERROR_CODE = "wrong-error-code"
    AD_MISMATCH = "ad-mismatch"
    MEMORY_MISMATCH = "memory-mismatch"
    MMIO_MISMATCH = "mmio-mismatch"
    STATE_MISMATCH = "state-mismatch"  # CR/EFER/PDPTE/SMM state the guest can read back
    WRONG_RESULT = "wrong-result"  # any other outcome (e.g. #GP where the load succeeds)
    MODEL_CRASH = "model-crash"  # an exception, a livelock or a failing KVM_RUN in the model
    AUDIT_VIOLATION = "audit-violation"


@dataclass(frozen=True)
class Divergence:
    kind: DivergenceKind
    op_index: int
    op: str  # the op's text form
    step: str  # the guest/VMM step of the op where it happened
    expected: str
    actual: str
    signature: str  # coarse and stable: what kind of disagreement, where

    @property
    def signature_id(self) -> str:
        return hashlib.sha1(self.signature.encode()).hexdigest()[:10]

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind.value, "op_index": self.op_index, "op": self.op,
                "step": self.step, "expected": self.expected, "actual": self.actual,
                "signature": self.signature}


def outcome_class(obs: Observation) -> str:
    """An observation without its addresses and data, for signatures."""
    if obs.kind is ObsKind.PF:
        return f"#PF({pferr_str(obs.error_code)})"
    return obs.kind.value


def classify(expected: Observation, actual: Observation) -> DivergenceKind:
    e, a = expected.kind, actual.kind
    if a in (ObsKind.HANG, ObsKind.VM_ERROR):
        return DivergenceKind.MODEL_CRASH
    mem = (ObsKind.RAM, ObsKind.MMIO)
    if e is ObsKind.PF and a in mem:
        return DivergenceKind.MISSING_FAULT
    if e in mem and a is ObsKind.PF:
        return DivergenceKind.SPURIOUS_FAULT
    if e is ObsKind.PF and a is ObsKind.PF:
        return DivergenceKind.WRONG_ERROR_CODE
    if e in mem and a in mem:
        if ObsKind.MMIO in (e, a):
            return DivergenceKind.MMIO_MISMATCH
        if expected.addr != actual.addr:
            return DivergenceKind.WRONG_TRANSLATION
        return DivergenceKind.MEMORY_MISMATCH
    return DivergenceKind.WRONG_RESULT


def make_signature(kind: DivergenceKind, step_kind: str, mode: str, expected: str,
                   actual: str) -> str:
    return f"{kind.value}:{step_kind}:{mode}:{expected}->{actual}"
