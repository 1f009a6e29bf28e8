"""`fuzzmmu agreement`: how closely the model-as-KVM predicts real KVM, on random programs.

Each program (fuzzmmu.kvm.support.random_supported_program: 4-level, unsync on, what the host
can run) gets a three-way verdict (fuzzmmu.kvm.verdict). The figures: how many agree with the
SDM everywhere, how many are real KVM findings the model predicted, and the infidelities (the
model-as-KVM and real KVM differ), grouped by the two signatures, with the smallest program of
each group written out for triage; programs/s of each machine; how many programs took the
unsync path in the model-as-KVM.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fuzzmmu.kvm.support import random_supported_program, random_unsync_program
from fuzzmmu.kvm.target import KVM_POOLED
from fuzzmmu.kvm.verdict import ThreeWay, Verdict, explain, kvm_profile, three_way
from fuzzmmu.program.ops import Program
from fuzzmmu.program.text import format_program


def _signature(t: ThreeWay, which: str) -> str:
    outcome = t.kvm if which == "kvm" else t.as_kvm if which == "as_kvm" else t.clean
    if outcome.skipped:
        return "skipped"
    return outcome.divergence.signature if outcome.divergence is not None else "agrees"


@dataclass
class Group:
    verdict: Verdict
    kvm: str  # real KVM's signature (or "agrees")
    as_kvm: str  # the model-as-KVM's
    count: int = 0
    program: str = ""  # the smallest member's text form
    ops: int = 1 << 30
    explained_by: tuple[str, ...] = ()  # for a KVM finding: the mutants that alone predict it

    @property
    def name(self) -> str:
        why = f" ({', '.join(self.explained_by)})" if self.explained_by else ""
        return f"{self.verdict.value}: kvm {self.kvm} / model {self.as_kvm}{why}"


@dataclass
class AgreementResult:
    bugs: tuple[str, ...]
    seed: int
    programs: int = 0
    verdicts: Counter[Verdict] = field(default_factory=Counter)
    unsync: int = 0  # programs that made a page unsync in the model-as-KVM
    unsync_agree: int = 0  # ... and whose verdict is not an infidelity
    seconds: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    groups: dict[tuple[Verdict, str, str], Group] = field(default_factory=dict)

    @property
    def ran(self) -> int:
        """Programs real KVM ran (not skipped)."""
        return self.programs - self.verdicts[Verdict.SKIPPED]

    @property
    def agreement(self) -> float:
        """The share of the programs KVM ran where the model-as-KVM said what real KVM did."""
        same = self.verdicts[Verdict.AGREE] + self.verdicts[Verdict.KVM_FINDING]
        return same / self.ran if self.ran else 1.0

    @property
    def clean(self) -> bool:
        return not any(v.infidelity or v is Verdict.CLEAN_MODEL_DIVERGES
                       for v in self.verdicts)

    def add(self, t: ThreeWay) -> None:
        self.programs += 1
        self.verdicts[t.verdict] += 1
        if t.unsync:
            self.unsync += 1
            self.unsync_agree += not t.verdict.infidelity
        for i, s in enumerate(t.seconds):
            self.seconds[i] += s
        if t.verdict in (Verdict.AGREE, Verdict.SKIPPED):
            return
        key = (t.verdict, _signature(t, "kvm"), _signature(t, "as_kvm"))
        g = self.groups.get(key)
        if g is None:
            g = self.groups[key] = Group(*key)
            if t.verdict is Verdict.KVM_FINDING:
                g.explained_by = explain(t, self.bugs)
        g.count += 1
        if len(t.program.ops) < g.ops:
            g.ops, g.program = len(t.program.ops), format_program(t.program)

    def rates(self) -> tuple[float, float, float]:
        """Programs per second of the clean model, the model-as-KVM and real KVM."""
        clean, as_kvm, kvm = (self.programs / s if s > 0 else 0.0 for s in self.seconds)
        return clean, as_kvm, kvm

    def to_json(self) -> dict[str, Any]:
        clean, as_kvm, kvm = self.rates()
        return {"programs": self.programs, "seed": self.seed, "bugs": list(self.bugs),
                "ran_on_kvm": self.ran, "agreement": round(self.agreement, 6),
                "verdicts": {v.value: self.verdicts[v] for v in Verdict},
                "unsync_programs": self.unsync, "unsync_agree": self.unsync_agree,
                "programs_per_s": {"model": round(clean, 1), "model_as_kvm": round(as_kvm, 1),
                                   "kvm": round(kvm, 1)},
                "groups": [{"verdict": g.verdict.value, "kvm": g.kvm, "model_as_kvm": g.as_kvm,
                            "count": g.count, "ops": g.ops,
                            "explained_by": list(g.explained_by)}
                           for g in sorted(self.groups.values(), key=lambda g: -g.count)]}


def make_program(seed: int, k: int, n_ops: int) -> Program:
    """Program number ``k`` of a measurement: odd ones work on their own last-level table."""
    family = random_unsync_program if k % 2 else random_supported_program
    return family(random.Random(seed), n_ops)


def measure(programs: int, seed: int = 1, n_ops: int = 16, bugs: tuple[str, ...] | None = None,
            progress: Callable[[AgreementResult], None] | None = None,
            every_s: float = 5.0) -> AgreementResult:
    """Three-way verdicts of ``programs`` random supported programs, every other one of the
    family that works on its own last-level table (program k from seed ``seed`` + k, so any
    one can be made again alone: ``make_program(seed + k, k, n_ops)``)."""
    chosen = kvm_profile() if bugs is None else bugs
    result = AgreementResult(chosen, seed)
    next_report = time.monotonic() + every_s
    for k in range(programs):
        program = make_program(seed + k, k, n_ops)
        result.add(three_way(program, chosen, kvm_target=KVM_POOLED))
        if progress is not None and time.monotonic() >= next_report:
            next_report = time.monotonic() + every_s
            progress(result)
    return result


def write(result: AgreementResult, out: Path) -> None:
    """``out``/agreement.json, and each group's smallest program as ``out``/groups/N.txt."""
    folder = out / "groups"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.txt"):
        old.unlink()
    ordered = sorted(result.groups.values(), key=lambda g: -g.count)
    for n, g in enumerate(ordered, 1):
        lines = g.program.splitlines()
        note = [f"# {g.name} ({g.count} programs)"]
        (folder / f"{n}.txt").write_text("\n".join(lines[:1] + note + lines[1:]) + "\n")
    (out / "agreement.json").write_text(json.dumps(result.to_json(), indent=1) + "\n")
