"""Export a divergent program as a standalone pytest regression test.

The test embeds the program's text form as a string literal (written with repr(), so any text
is a safe literal) and rebuilds the program with the text parser: no eval, no pickle, no code
from the crash file. It asserts that model and reference agree, so it fails while the model
has the bug and passes once it is fixed.

A divergence found on real KVM exports as a test of real KVM: it runs the program on this
machine's /dev/kvm (``run(program, target=KVM)``) and skips, with the reason, where real KVM
is unusable (fuzzmmu.kvm.support.kvm_problem) or cannot run the program.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from fuzzmmu.oracle.divergence import Divergence
from fuzzmmu.program.ops import Program
from fuzzmmu.program.text import format_program


def test_name(out: Path) -> str:
    name = re.sub(r"\W", "_", out.stem)
    if not name.startswith("test_"):
        name = "test_" + name
    return name


# The end of every exported test: the message names what the divergence still is.
_ASSERT_AGREES = [
    "    assert outcome.divergence is None, (",
    '        f"{outcome.divergence.kind.value} at op {outcome.divergence.op_index}: "',
    '        f"expected {outcome.divergence.expected}, got {outcome.divergence.actual} "',
    '        f"[{outcome.divergence.signature}]")',
    "",
]


def _program_literal(program: Program) -> list[str]:
    """``PROGRAM = (...)``: the text form as string literals, one a line (repr: any text is a
    safe literal)."""
    return ["PROGRAM = (",
            *(f"    {line!r}" for line in format_program(program).splitlines(keepends=True)),
            ")"]


def render_test(program: Program, bugs: tuple[str, ...], divergence: Divergence,
                source: str, name: str, target: str = "model") -> str:
    if target == "kvm":
        return _render_kvm_test(program, divergence, source, name)
    d = divergence
    doc = textwrap.fill(
        f"The guest program below makes fuzzmmu's model of KVM's shadow MMU and the "
        f"architectural x86 reference disagree: {d.kind.value} at op {d.op_index} "
        f"({d.step}). The reference expects {d.expected}; the model gives {d.actual}.",
        width=92)
    lines = [
        f'"""Regression test exported by fuzzmmu from {source}.',
        "",
        doc,
        "",
        f"Signature: {d.signature}",
        f"Bugs enabled in the model: {', '.join(bugs) or 'none (the model as shipped)'}",
        "",
        "The test fails while the model behaves this way and passes once it is fixed.",
        '"""',
        "",
        "from fuzzmmu.oracle.executor import run",
        "from fuzzmmu.program.text import parse_program",
        "",
        f"BUGS = {tuple(bugs)!r}",
        f"SIGNATURE = {d.signature!r}",
        *_program_literal(program),
        "",
        "",
        f"def {name}() -> None:",
        "    outcome = run(parse_program(PROGRAM), BUGS)",
        *_ASSERT_AGREES,
    ]
    return "\n".join(lines)


def _render_kvm_test(program: Program, divergence: Divergence, source: str, name: str) -> str:
    d = divergence
    doc = textwrap.fill(
        f"The guest program below makes this machine's real KVM (its shadow MMU, through "
        f"/dev/kvm) and the architectural x86 reference disagree: {d.kind.value} at op "
        f"{d.op_index} ({d.step}). The reference expects {d.expected}; KVM gives {d.actual}.",
        width=92)
    lines = [
        f'"""Regression test of real KVM exported by fuzzmmu from {source}.',
        "",
        doc,
        "",
        f"Signature: {d.signature}",
        "",
        "The test fails while this KVM behaves this way and passes once it is fixed; it skips",
        "where /dev/kvm is unusable or the host cannot run the program.",
        '"""',
        "",
        "import pytest",
        "",
        "from fuzzmmu.kvm.support import kvm_problem",
        "from fuzzmmu.oracle.executor import run",
        "from fuzzmmu.program.text import parse_program",
        "",
        f"SIGNATURE = {d.signature!r}",
        *_program_literal(program),
        "",
        "",
        f"def {name}() -> None:",
        "    problem = kvm_problem()",
        "    if problem is not None:",
        '        pytest.skip(f"real KVM is not usable here: {problem}")',
        "    from fuzzmmu.kvm.target import KVM  # after the check: it needs iced-x86",
        "",
        "    outcome = run(parse_program(PROGRAM), target=KVM)",
        "    if outcome.skipped:",
        '        pytest.skip(f"this host cannot run the program: {outcome.skipped}")',
        *_ASSERT_AGREES,
    ]
    return "\n".join(lines)


def export(program: Program, bugs: tuple[str, ...], divergence: Divergence, out: Path,
           source: str, target: str = "model") -> str:
    text = render_test(program, bugs, divergence, source, test_name(out), target)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text
