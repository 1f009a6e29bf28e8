#!/usr/bin/env python3
"""Atheris fuzz target: differential fuzzing of KVM's shadow MMU model against the x86
reference (fuzzmmu). libFuzzer owns argv; pass flags through untouched.

Which historical KVM bugs the model re-creates comes from the environment, since argv belongs
to libFuzzer:
  FUZZMMU_BUGS=id[,id...]   mutants to enable (see `fuzzmmu bugs`), default none
  FUZZMMU_CONFIG=file       or a file with one bug id per line (# comments)
  FUZZMMU_AUDIT=1           also check the model's structural invariants after every op
  FUZZMMU_BYTE_SHARE=0.2    share of mutations left to libFuzzer's byte mutator (1: bytes only)
  FUZZMMU_FEEDBACK=lines    what the coverage counters see: lines (Atheris's instrumentation of
                            the model and the walker), state (the model's state features, the
                            code uninstrumented) or both
  FUZZMMU_CENSUS=dir        with state feedback: write the counters hit per feature family
                            there about once a second (features-PID.json)
  FUZZMMU_TARGET=model      what the inputs run on: model, or kvm (this machine's /dev/kvm:
                            each input as the host can run it, no bugs, line feedback from
                            the reference walker and the KVM target's code)
  FUZZMMU_SUPPRESS=file     divergence signatures (one a line, # comment lines) to record and
                            go on from instead of raising
  FUZZMMU_SUPPRESSED_LOG=f  where each suppressed divergence's signature is appended
  FUZZMMU_NATIVE=1          run the compiled model (fuzzmmu.native, `fuzzmmu compile`) where
                            it is built for these sources; state feedback only
"""

import importlib.util
import os
import pkgutil
import sys

import atheris

# Coverage feedback comes from the system under test (fuzzmmu.model, fuzzmmu.world, or with
# FUZZMMU_TARGET=kvm the KVM target's code in fuzzmmu.kvm) and the reference walker
# (fuzzmmu.arch). The decoder, executor, oracle, campaign and UI code would only add noise to
# the coverage map and cost instrumentation time on every input (about 10% of the
# throughput), so they are excluded; so is fuzzmmu.kvm.support, which adapts every input to
# the host (its lines say which ops were dropped, not what KVM did). instrument_imports()
# honours only top-level package names in `include` and exact module names in `exclude`:
# every module of those packages is listed, found on disk without importing them.
UNINSTRUMENTED_PACKAGES = ("program", "oracle", "campaign", "ui", "bench")
UNINSTRUMENTED_MODULES = ("fuzzmmu.kvm.support",)


def uninstrumented_modules() -> list[str]:
    spec = importlib.util.find_spec("fuzzmmu")  # a top-level package: nothing is imported
    assert spec is not None and spec.submodule_search_locations is not None
    names = list(UNINSTRUMENTED_MODULES)
    for sub in UNINSTRUMENTED_PACKAGES:
        package = f"fuzzmmu.{sub}"
        paths = [os.path.join(root, sub) for root in spec.submodule_search_locations]
        names += [package, *(f"{package}.{m.name}" for m in pkgutil.iter_modules(paths))]
    return names


# The settings decide what to instrument, so they are read first (the settings module and the
# bug catalog it imports stay uninstrumented: neither is the system under test).
from fuzzmmu.campaign.settings import settings_from_environment  # noqa: E402

SETTINGS = settings_from_environment(os.environ)

if SETTINGS.feedback.lines:
    with atheris.instrument_imports(include=["fuzzmmu"], exclude=uninstrumented_modules()):
        from fuzzmmu.campaign.harness import (
            Suppression,
            exit_on_error,
            mutate,
            test_one_input,
        )

        if SETTINGS.target == "kvm":
            # Loaded here, not at the first input, so that its modules are instrumented.
            import fuzzmmu.kvm.target  # noqa: F401
else:
    from fuzzmmu.campaign.harness import (
        Suppression,
        exit_on_error,
        mutate,
        test_one_input,
    )

if SETTINGS.feedback.state:
    from fuzzmmu.campaign.feedback import CounterMap

    COUNTERS = CounterMap(atheris, census=SETTINGS.census)
else:
    COUNTERS = None


SUPPRESS = (Suppression(frozenset(SETTINGS.suppress), SETTINGS.suppressed_log)
            if SETTINGS.suppress else None)


def TestOneInput(data: bytes) -> None:
    test_one_input(data, SETTINGS.bugs, SETTINGS.audit, COUNTERS, target=SETTINGS.target,
                   suppress=SUPPRESS)


@exit_on_error
def CustomMutator(data: bytes, max_size: int, seed: int) -> bytes:
    return mutate(data, max_size, seed, atheris.Mutate, SETTINGS.byte_share)


def main() -> None:
    if SETTINGS.byte_share >= 1.0:
        atheris.Setup(sys.argv, TestOneInput)
    else:
        # No custom crossover: libFuzzer would pick it for half of its mutations (its
        # MutationDispatcher chooses between the custom mutator and the custom crossover),
        # and a splice of two programs, a prefix of one and a suffix of the other, seldom
        # keeps what either reached. Without it the campaign ran 17% more programs a second
        # and found at least as much (README, Performance).
        atheris.Setup(sys.argv, TestOneInput, custom_mutator=CustomMutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
