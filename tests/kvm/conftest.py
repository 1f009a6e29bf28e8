"""The KVM target's tests: those that need a usable /dev/kvm take the ``kvm`` fixture, which
skips them with the reason when this machine has none (no device, no permission, a module
that cannot run the agent)."""

from __future__ import annotations

import functools

import pytest


@functools.cache
def kvm_problem() -> str | None:
    """Why real KVM cannot be used here, or None: the device opens and a booted VM runs the
    agent's first operation."""
    try:
        from fuzzmmu.kvm.device import KvmError
        from fuzzmmu.kvm.target import KVM
        from fuzzmmu.oracle.executor import run
        from fuzzmmu.program.text import parse_program
    except ImportError as exc:  # iced-x86 missing, say
        return f"cannot import the KVM target: {exc}"
    probe = parse_program("config boot=4level\nread cpu0 0xffffff80c0000000+0x0 cpl=0\n")
    try:
        outcome = run(probe, target=KVM)
    except KvmError as exc:
        return str(exc)
    if outcome.skipped or outcome.divergence is not None:
        return f"the agent does not run: {outcome.skipped or outcome.divergence}"
    return None


@pytest.fixture
def kvm() -> None:
    problem = kvm_problem()
    if problem is not None:
        pytest.skip(f"real KVM is not usable here: {problem}")
