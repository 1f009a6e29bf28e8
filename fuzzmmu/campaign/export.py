"""Export a divergent program as a standalone pytest regression test.

The test embeds the program's text form as a string literal (written with repr(), so any text
is a safe literal) and rebuilds the program with the text parser: no eval, no pickle, no code
from the crash file. It asserts that model and reference agree, so it fails while the model
has the bug and passes once it is fixed.
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


def render_test(program: Program, bugs: tuple[str, ...], divergence: Divergence,
                source: str, name: str) -> str:
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
        "PROGRAM = (",
        *(f"    {line!r}" for line in format_program(program).splitlines(keepends=True)),
        ")",
        "",
        "",
        f"def {name}() -> None:",
        "    outcome = run(parse_program(PROGRAM), BUGS)",
        "    assert outcome.divergence is None, (",
        '        f"{outcome.divergence.kind.value} at op {outcome.divergence.op_index}: "',
        '        f"expected {outcome.divergence.expected}, got {outcome.divergence.actual} "',
        '        f"[{outcome.divergence.signature}]")',
        "",
    ]
    return "\n".join(lines)


def export(program: Program, bugs: tuple[str, ...], divergence: Divergence, out: Path,
           source: str) -> str:
    text = render_test(program, bugs, divergence, source, test_name(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text
