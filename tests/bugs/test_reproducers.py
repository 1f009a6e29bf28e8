"""Every mutant of the catalog is reachable, and the oracle sees it: its reproducer (a
hand-written program under reproducers/) diverges with the mutant on, with the expected kind at
the expected op, and runs clean with it off."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from fuzzmmu.model.bugs import CATALOG, BugSet, UnknownBugError
from fuzzmmu.oracle.executor import run
from fuzzmmu.program.files import read_program
from fuzzmmu.program.generate import random_program

HERE = Path(__file__).parent / "reproducers"
AVAILABLE = [b for b in CATALOG if b.available]


def expectation(path: Path) -> tuple[str, str, int]:
    text = path.read_text()
    bug = re.search(r"^# bug: (\S+)$", text, re.M)
    expect = re.search(r"^# expect: (\S+) at op (\d+)$", text, re.M)
    assert bug and expect, f"{path.name} lacks '# bug:' or '# expect:'"
    return bug.group(1), expect.group(1), int(expect.group(2))


def test_every_available_mutant_has_a_reproducer() -> None:
    files = {p.stem for p in HERE.glob("*.txt")}
    assert {b.id for b in AVAILABLE} == files


@pytest.mark.parametrize("bug", [b.id for b in AVAILABLE])
def test_reproducer_diverges_only_with_its_mutant(bug: str) -> None:
    path = HERE / f"{bug}.txt"
    named, kind, op_index = expectation(path)
    assert named == bug
    program = read_program(path)
    clean = run(program, audit=True)
    assert clean.divergence is None, clean.divergence
    buggy = run(program, [bug]).divergence
    assert buggy is not None, f"{bug}: no divergence with the mutant on"
    assert (buggy.kind.value, buggy.op_index) == (kind, op_index), buggy


def test_pending_mutants_say_why_and_cannot_be_enabled() -> None:
    pending = [b for b in CATALOG if not b.available]
    for b in pending:
        assert b.pending
        with pytest.raises(UnknownBugError, match="pending"):
            BugSet([b.id])


def test_unknown_bug_id_lists_the_known_ones() -> None:
    with pytest.raises(UnknownBugError) as err:
        BugSet(["no-such-bug"])
    assert "misaligned-pt-write-two-sptes" in str(err.value)


def test_all_mutants_at_once_never_break_the_harness() -> None:
    """With every mutant on, long random programs may diverge anyhow, but always as an
    outcome: run() itself never raises."""
    everything = [b.id for b in AVAILABLE]
    for seed in range(12):
        program = random_program(random.Random(seed), 40)
        outcome = run(program, everything, audit=True)
        d = outcome.divergence
        if d is None:
            assert outcome.ops_run == len(program.ops)
        else:  # an outcome: the op it names is the last one run (-1: the boot)
            assert -1 <= d.op_index < len(program.ops) and outcome.ops_run == d.op_index + 1
