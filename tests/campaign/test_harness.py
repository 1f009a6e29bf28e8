"""The fuzz target's pieces: the mutator and crossover stay inside the program space, and a
divergence of each kind surfaces as its own exception from its own function."""

from __future__ import annotations

import traceback

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzzmmu.campaign import harness
from fuzzmmu.campaign.harness import RAISERS, crossover, mutate
from fuzzmmu.oracle.divergence import Divergence, DivergenceKind
from fuzzmmu.program.codec import HEADER_SIZE, MAX_OPS, RECORD_SIZE, decode, encode
from fuzzmmu.program.files import read_program

MAX_LEN = HEADER_SIZE + RECORD_SIZE * MAX_OPS


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=700), st.integers(0, 2**32 - 1),
       st.integers(min_value=HEADER_SIZE, max_value=MAX_LEN))
def test_mutate_any_bytes_gives_a_valid_program_within_max_size(data: bytes, seed: int,
                                                                max_size: int) -> None:
    out = mutate(data, max_size, seed)
    assert len(out) <= max_size
    program = decode(out)
    assert decode(encode(program)) == program
    assert mutate(data, max_size, seed) == out  # deterministic in (data, max_size, seed)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=600), st.binary(max_size=600), st.integers(0, 2**32 - 1))
def test_crossover_gives_a_valid_program(a: bytes, b: bytes, seed: int) -> None:
    out = crossover(a, b, MAX_LEN, seed)
    assert len(out) <= MAX_LEN
    decode(out)
    assert crossover(a, b, MAX_LEN, seed) == out


def test_mutate_uses_the_byte_mutator_for_its_share() -> None:
    calls = []

    def byte_mutator(data: bytes, max_size: int) -> bytes:
        calls.append(len(data))
        return data[::-1]

    for seed in range(200):
        mutate(b"\x00" * 20, MAX_LEN, seed, byte_mutator, byte_share=0.25)
    assert 25 <= len(calls) <= 80
    calls.clear()
    for seed in range(50):
        mutate(b"\x00" * 20, MAX_LEN, seed, byte_mutator, byte_share=0.0)
    assert not calls


def test_one_input_is_quiet_without_divergence() -> None:
    harness.test_one_input(encode(read_program("corpus/4level-basic.txt")))


def test_one_input_raises_the_kind_of_the_divergence() -> None:
    data = encode(read_program("tests/bugs/reproducers/misaligned-pt-write-two-sptes.txt"))
    with pytest.raises(harness.MissingFault) as err:
        harness.test_one_input(data, ("misaligned-pt-write-two-sptes",))
    assert err.value.divergence.kind is DivergenceKind.MISSING_FAULT


def test_every_kind_has_its_own_exception_and_top_frame() -> None:
    seen_types, seen_frames = set(), set()
    for kind in DivergenceKind:
        d = Divergence(kind, 0, "op", "step", "e", "a", f"{kind.value}:x")
        with pytest.raises(harness.DivergenceFound) as err:
            RAISERS[kind](d)
        seen_types.add(type(err.value))
        seen_frames.add(traceback.extract_tb(err.value.__traceback__)[-1].name)
    assert len(seen_types) == len(seen_frames) == len(DivergenceKind)
