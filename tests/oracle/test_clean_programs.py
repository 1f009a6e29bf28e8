"""Programs that once made the clean model diverge (found by soaks and campaigns, minimized):
each now runs clean, the structural audit included. The divergences that turned out to be
KVM's own behaviour are also kept as mutants with reproducers (tests/bugs/reproducers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzzmmu.oracle.executor import run
from fuzzmmu.program.files import read_program

HERE = Path(__file__).parent / "clean"


@pytest.mark.parametrize("name", sorted(p.stem for p in HERE.glob("*.txt")))
def test_program_runs_clean(name: str) -> None:
    outcome = run(read_program(HERE / f"{name}.txt"), audit=True)
    assert outcome.divergence is None, outcome.divergence
    assert outcome.ops_run > 0
