"""The op-level generator: deterministic, and a swarm restricts it to its kinds."""

from __future__ import annotations

import random

import pytest

from fuzzmmu.program.generate import OP_KINDS, Generator, kinds_of, op_kind
from fuzzmmu.program.ops import Interleave


def test_same_seed_same_program() -> None:
    assert Generator(random.Random(7)).program(20) == Generator(random.Random(7)).program(20)


def test_without_a_swarm_every_kind_is_drawn() -> None:
    gen = Generator(random.Random(1))
    assert {op_kind(gen.op()) for _ in range(2000)} == {k for k, _ in OP_KINDS}


@pytest.mark.parametrize("kinds", [{"pte"}, {"smm", "memslot"}, {"interleave", "cr3"},
                                   {"interleave"}])
def test_a_swarm_draws_only_its_kinds(kinds: set[str]) -> None:
    gen = Generator(random.Random(3), kinds=kinds)
    drawn = {op_kind(gen.op()) for _ in range(500)}
    allowed = kinds | ({"access"} if kinds == {"interleave"} else set())
    assert drawn == allowed
    if "interleave" in kinds:  # an interleave's first part is a plain op
        ops = [gen.op() for _ in range(200)]
        assert any(isinstance(op, Interleave) for op in ops)


def test_kinds_of_a_program() -> None:
    program = Generator(random.Random(5), kinds={"access", "invlpg"}).program(30)
    # The first two ops of a generated program are maps (something to translate).
    assert kinds_of(program) == {"map", "access", "invlpg"}


def test_a_swarm_mostly_of_interleaves_draws_without_recursing() -> None:
    # An interleave's first part is a plain op of the swarm; drawn as "any op, again while an
    # interleave" each retry could nest a whole interleave, and with interleaves 80% of the
    # swarm the nesting did not end (a campaign's mutator died of RecursionError).
    for seed in range(200):
        gen = Generator(random.Random(seed), kinds={"interleave", "memslot"})
        for _ in range(50):
            op = gen.op()
            if isinstance(op, Interleave):
                assert not isinstance(op.first, Interleave)
