"""The KVM target's tests: those that need a usable /dev/kvm take the ``kvm`` fixture, which
skips them with the reason when this machine has none (no device, no permission, a module
that cannot run the agent)."""

from __future__ import annotations

import functools

import pytest

from fuzzmmu.kvm.support import kvm_problem

# Probed once per test process: the answer does not change while the tests run.
_problem = functools.cache(kvm_problem)


@pytest.fixture
def kvm() -> None:
    problem = _problem()
    if problem is not None:
        pytest.skip(f"real KVM is not usable here: {problem}")
