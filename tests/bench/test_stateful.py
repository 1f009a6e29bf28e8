"""The Hypothesis state machine over fuzzmmu's operations: a property test of the clean model,
and the in-process search engines of the benchmark."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

from fuzzmmu.bench.engines import hypothesis_search, random_search
from fuzzmmu.bench.stateful import ShadowMmuMachine
from fuzzmmu.oracle.executor import run
from fuzzmmu.program.codec import MAX_OPS, decode, encode
from fuzzmmu.program.strategies import record_count

EASY = "walk-addr-access-checks.accessed-bit"


class CleanModel(ShadowMmuMachine):
    """Whatever Hypothesis does, the clean model agrees with the reference."""


TestCleanModel = CleanModel.TestCase
TestCleanModel.settings = settings(max_examples=40, stateful_step_count=30, deadline=None,
                                   suppress_health_check=[HealthCheck.too_slow])


class AuditedCleanModel(ShadowMmuMachine):
    """... and keeps its own structural invariants after every op."""

    audit = True


TestAuditedCleanModel = AuditedCleanModel.TestCase
TestAuditedCleanModel.settings = settings(max_examples=15, stateful_step_count=20,
                                          deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])


def test_hypothesis_search_finds_an_easy_mutant_and_its_program_replays() -> None:
    s = hypothesis_search([EASY], 1, budget=300)
    assert s.found and s.program is not None and s.divergence is not None
    assert s.programs >= 1
    # Built op by op with Executor.step, the program diverges the same way when run whole,
    # and it stays encodable like any campaign crash.
    assert record_count(s.program) <= MAX_OPS
    assert decode(encode(s.program)) == s.program
    again = run(s.program, [EASY]).divergence
    assert again is not None and again.signature == s.divergence.signature
    assert run(s.program).divergence is None


def test_hypothesis_search_is_deterministic_in_its_seed() -> None:
    a, b = hypothesis_search([EASY], 7, 300), hypothesis_search([EASY], 7, 300)
    assert (a.program, a.programs) == (b.program, b.programs)


def test_random_search_finds_an_easy_mutant() -> None:
    s = random_search([EASY], 1, budget=300)
    assert s.found and s.divergence is not None and s.program is not None
    assert run(s.program, [EASY]).divergence == s.divergence


def test_searches_on_the_clean_model_run_out_of_time() -> None:
    for search in (random_search, hypothesis_search):
        s = search([], 3, budget=1.0)
        assert not s.found and s.programs > 0 and s.program is None
        assert s.seconds >= 1.0
