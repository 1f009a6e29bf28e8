#!/usr/bin/env python3
"""Atheris fuzz target: differential fuzzing of KVM's shadow MMU model against the x86
reference (fuzzmmu). libFuzzer owns argv; pass flags through untouched.

Which historical KVM bugs the model re-creates comes from the environment, since argv belongs
to libFuzzer:
  FUZZMMU_BUGS=id[,id...]   mutants to enable (see `fuzzmmu bugs`), default none
  FUZZMMU_CONFIG=file       or a file with one bug id per line (# comments)
  FUZZMMU_AUDIT=1           also check the model's structural invariants after every op
  FUZZMMU_BYTE_SHARE=0.2    share of mutations left to libFuzzer's byte mutator (1: bytes only)
"""

import os
import sys

import atheris

with atheris.instrument_imports(include=["fuzzmmu"]):
    from fuzzmmu.campaign.harness import crossover, mutate, test_one_input
    from fuzzmmu.campaign.settings import settings_from_environment

SETTINGS = settings_from_environment(os.environ)


def TestOneInput(data: bytes) -> None:
    test_one_input(data, SETTINGS.bugs, SETTINGS.audit)


def CustomMutator(data: bytes, max_size: int, seed: int) -> bytes:
    return mutate(data, max_size, seed, atheris.Mutate, SETTINGS.byte_share)


def CustomCrossover(data1: bytes, data2: bytes, max_size: int, seed: int) -> bytes:
    return crossover(data1, data2, max_size, seed)


def main() -> None:
    if SETTINGS.byte_share >= 1.0:
        atheris.Setup(sys.argv, TestOneInput)
    else:
        atheris.Setup(sys.argv, TestOneInput, custom_mutator=CustomMutator,
                      custom_crossover=CustomCrossover)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
