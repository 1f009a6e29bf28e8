"""Three-way verdicts: one program on the reference, the model and real KVM.

The reference says what the SDM allows; the clean model follows it; the model with the mutants
that describe current KVM (``kvm_profile``) is the model's claim of what real KVM does. Running
all three tells a real KVM finding (KVM departs from the SDM, as the model predicts) from a
model infidelity (the model's claim and real KVM differ) and from a clean model that is wrong.

The model-as-KVM is a model of this host's KVM (``AS_HOST``): unsync pages on whatever the
program's header says (real KVM may always make a last-level shadow page unsync), and every
CPL0 access emulated (a kvm_pvm host runs no guest instruction at CPL0 natively:
docs/kvm-target.md §1), no MMIO sptes (its KVM runs with mmio_caching=N), and a #PF of a CPL3
access that drops the MMIO gva cache for the address whatever its error code (as measured
there). The clean model runs the program as written.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

from fuzzmmu.kvm.target import KVM
from fuzzmmu.model.bugs import CATALOG, BugSet
from fuzzmmu.model.machine import Machine
from fuzzmmu.model.mmu.internal import MmuConfig
from fuzzmmu.oracle.divergence import Divergence
from fuzzmmu.oracle.executor import Outcome, Target, run
from fuzzmmu.oracle.reference import ReferenceMachine
from fuzzmmu.program.ops import Op, Program

# Catalogued with an old fix, yet what modern KVM does again (the catalog entry says so:
# kvm_init_shadow_mmu() forces role.efer_nx=1); tests/kvm/programs/ shows it on real KVM.
ALSO_CURRENT = ("efer-nxe-not-in-role",)


def kvm_profile() -> tuple[str, ...]:
    """The catalogued mutants that describe current KVM (year "current", and ALSO_CURRENT):
    where the model believes KVM as it is departs from the SDM."""
    return tuple(b.id for b in CATALOG
                 if (b.year == "current" or b.id in ALSO_CURRENT) and b.available)


def _make_as_host(program: Program, bugs: BugSet) -> Machine:
    h = program.header
    return Machine(MmuConfig(h.policy, h.mmio_gen_bits, h.maxphyaddr, h.mmu_pages, unsync=True,
                             emulate_cpl0=True, mmio_caching=False,
                             user_fault_clears_mmio_cache=True), bugs)


AS_HOST = Target("model-as-kvm", _make_as_host, speculative=True)


class Verdict(enum.Enum):
    AGREE = "agree"  # no divergence anywhere
    KVM_FINDING = "kvm-finding"  # real KVM departs from the SDM, as the model-as-KVM predicts
    KVM_UNPREDICTED = "kvm-unpredicted"  # real KVM departs, the model-as-KVM not (so): infidelity
    MODEL_ONLY = "model-only"  # the model-as-KVM departs where real KVM does not: infidelity
    CLEAN_MODEL_DIVERGES = "clean-model-diverges"  # a fault of the model (or of the oracle)
    SKIPPED = "skipped"  # real KVM cannot run the program (or it left KVM's contract)

    @property
    def infidelity(self) -> bool:
        return self in (Verdict.KVM_UNPREDICTED, Verdict.MODEL_ONLY)


class UnsyncSeen:
    """Whether the model made a shadow page unsync at some op (KVM's mmu_unsync counter)."""

    def __init__(self) -> None:
        self.seen = False

    def __call__(self, op: Op, model: Machine, ref: ReferenceMachine) -> None:
        self.end(model, ref)

    def end(self, model: Machine, ref: ReferenceMachine) -> None:
        self.seen = self.seen or model.kvm.stat.mmu_unsync > 0


@dataclass(frozen=True)
class ThreeWay:
    program: Program
    clean: Outcome  # the clean model
    as_kvm: Outcome  # the model with ``kvm_profile()`` (and unsync pages on)
    kvm: Outcome  # real KVM
    verdict: Verdict
    unsync: bool  # the model-as-KVM made a shadow page unsync: the program took that path
    seconds: tuple[float, float, float]  # spent on the clean model, the model-as-KVM, real KVM


def same_divergence(a: Divergence | None, b: Divergence | None) -> bool:
    """The same departure from the SDM: none on both, or the same kind at the same op."""
    if a is None or b is None:
        return a is b
    return a.kind is b.kind and a.op_index == b.op_index


def classify(clean: Outcome, as_kvm: Outcome, kvm: Outcome) -> Verdict:
    if clean.divergence is not None:
        return Verdict.CLEAN_MODEL_DIVERGES
    if kvm.skipped:
        return Verdict.SKIPPED
    k, m = kvm.divergence, as_kvm.divergence
    if as_kvm.skipped and k is None:
        return Verdict.SKIPPED  # the model's run left KVM's contract: nothing to compare
    if k is None:
        return Verdict.AGREE if m is None else Verdict.MODEL_ONLY
    return Verdict.KVM_FINDING if same_divergence(k, m) else Verdict.KVM_UNPREDICTED


def three_way(program: Program, bugs: tuple[str, ...] | None = None, *,
              kvm_target: Target = KVM) -> ThreeWay:
    """Run ``program`` on the clean model, the model-as-KVM (``bugs``, default
    ``kvm_profile()``) and real KVM (which may raise fuzzmmu.kvm.device.KvmError when the
    host has no usable /dev/kvm): a fresh VM, or ``kvm_target``'s (``KVM_POOLED`` for a
    measurement of many programs)."""
    t0 = time.perf_counter()
    clean = run(program)
    t1 = time.perf_counter()
    seen = UnsyncSeen()
    as_kvm = run(program, kvm_profile() if bugs is None else bugs, observe=seen,
                 target=AS_HOST)
    t2 = time.perf_counter()
    kvm = run(program, target=kvm_target)
    t3 = time.perf_counter()
    return ThreeWay(program, clean, as_kvm, kvm, classify(clean, as_kvm, kvm), seen.seen,
                    (t1 - t0, t2 - t1, t3 - t2))


def explain(t: ThreeWay, bugs: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """For a KVM finding: the mutants of ``bugs`` (default ``kvm_profile()``) that each alone
    make the model-as-KVM depart from the SDM as real KVM did."""
    found = []
    for bug in kvm_profile() if bugs is None else bugs:
        if same_divergence(run(t.program, (bug,), target=AS_HOST).divergence,
                           t.kvm.divergence):
            found.append(bug)
    return tuple(found)
