"""What a run of the executor leaves behind, as plain JSON data, and a fixed set of programs
to compare runs on: used in-process by test_executor.py and, for cross-process determinism,
as ``python -c "import runsummary; runsummary.main()"`` (prints the summaries as JSON)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

from fuzzmmu.model.bugs import CATALOG
from fuzzmmu.oracle.executor import Outcome, run
from fuzzmmu.program.codec import decode
from fuzzmmu.program.generate import random_program
from fuzzmmu.program.ops import Program
from fuzzmmu.program.text import parse_program

ALL_BUGS = tuple(b.id for b in CATALOG if b.available)

# seed bug 1: an 8-byte store across PT entries 0 and 1 clears entry 1's P bit
MISALIGNED = (Path(__file__).resolve().parents[1] / "bugs" / "reproducers"
              / "misaligned-pt-write-two-sptes.txt").read_text()
MISALIGNED_BUG = "misaligned-pt-write-two-sptes"

# A race the model resolves in the second order: cpu1 rewrites the PTE while cpu0's fault on
# it is between the guest walk and mmu_lock; KVM notices (gpte_changed) and retries.
RACE = """\
# fuzzmmu program v1
config policy=zap mmio-gen-bits=19 maxphyaddr=40 mmu-pages=2000 boot=4level
map cpu0 root=current current 0x1000 -> 0x5 P|W|U|A|D level=1 upper=W|U|A pool=0x8
interleave at=faultin
  read cpu0 0x1000+0x0 width=8 cpl=0
  pte cpu1 table=0xa index=1 -> 0x7 P|W|U|A|D width=8
read cpu0 0x1000+0x0 width=8 cpl=0
"""


def cases() -> list[tuple[str, Program, tuple[str, ...]]]:
    """(name, program, bugs): hand-written programs with and without their bug, random
    programs with every mutant on (many diverge, in many ways) and without, decoded bytes."""
    out = [("misaligned", parse_program(MISALIGNED), ()),
           ("misaligned+bug", parse_program(MISALIGNED), (MISALIGNED_BUG,)),
           ("race", parse_program(RACE), ()),
           ("race+all", parse_program(RACE), ALL_BUGS)]
    for seed in range(40):
        out.append((f"gen{seed}+all", random_program(random.Random(seed), 40), ALL_BUGS))
    for seed in range(10):
        out.append((f"gen{seed}", random_program(random.Random(seed), 40), ()))
    for seed in range(10):
        rng = random.Random(10_000 + seed)
        data = bytes(rng.randrange(256) for _ in range(4 + 8 * 64))
        out.append((f"bytes{seed}+all", decode(data), ALL_BUGS))
    return out


def summary(outcome: Outcome) -> dict[str, Any]:
    d = outcome.divergence
    return {"divergence": None if d is None else d.to_json(),
            "signature_id": None if d is None else d.signature_id,
            "ops_run": outcome.ops_run, "steps_run": outcome.steps_run,
            "div_step": outcome.div_step, "bugs": list(outcome.bugs),
            "trace": [[t.op_index, t.step, t.model, t.reference, t.matched]
                      for t in outcome.trace]}


def run_all() -> dict[str, dict[str, Any]]:
    return {name: summary(run(p, bugs, trace=True)) for name, p, bugs in cases()}


def main() -> None:
    json.dump(run_all(), sys.stdout, sort_keys=True)


if __name__ == "__main__":
    main()
