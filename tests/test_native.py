"""The compiled model (fuzzmmu.native): named by its sources, loaded only where asked and only
before the Python modules, and giving exactly the outcomes of the Python model."""

from __future__ import annotations

import ast
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fuzzmmu import native
from fuzzmmu.campaign.harness import mutate
from fuzzmmu.campaign.settings import SettingsError, settings_from_environment
from fuzzmmu.cli import main
from fuzzmmu.model.bugs import CATALOG
from fuzzmmu.oracle.executor import run
from fuzzmmu.program.codec import HEADER_SIZE, MAX_OPS, RECORD_SIZE, decode
from fuzzmmu.program.ops import Program
from fuzzmmu.program.text import parse_program

ROOT = Path(__file__).resolve().parent.parent
REPRODUCERS = ROOT / "tests" / "bugs" / "reproducers"
MAX_LEN = HEADER_SIZE + RECORD_SIZE * MAX_OPS


def test_the_compiled_sources_are_the_model_the_world_the_oracle_and_the_feedback() -> None:
    names = {native.module_name(p) for p in native.compiled_sources()}
    assert {"fuzzmmu.model.mmu.mmu", "fuzzmmu.world.memslots", "fuzzmmu.arch.walker",
            "fuzzmmu.oracle.reference", "fuzzmmu.oracle.executor",
            "fuzzmmu.campaign.feedback", "fuzzmmu.program.world"} <= names
    # Kept as Python: package __init__s, and the errors (builtin subclasses mypyc cannot make).
    assert "fuzzmmu.model.mmu.internal" not in names
    assert not any(n.endswith("__init__") for n in names)
    # The op classes and the codec stay Python (only the world's value helpers are compiled).
    assert not any(n.startswith(("fuzzmmu.program", "fuzzmmu.campaign.h", "fuzzmmu.kvm"))
                   for n in names - {"fuzzmmu.program.world"})


_CONSTANT = re.compile(r"_?[A-Z][A-Z0-9_]*")


def test_module_constants_of_compiled_modules_are_final() -> None:
    """mypyc inlines a Final constant or keeps it in a C static; any other module-level name
    is looked up in the module's dict at every use (a tenth of a compiled run once)."""
    plain = []
    for source in native.compiled_sources():
        for node in ast.parse(source.read_text()).body:
            if isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
                is_typevar = (isinstance(node.value, ast.Call)
                              and getattr(node.value.func, "id", "") == "TypeVar")
                plain += [f"{source.name}:{node.lineno} {n}" for n in names
                          if _CONSTANT.fullmatch(n) and not is_typevar]
            elif (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                  and _CONSTANT.fullmatch(node.target.id)
                  and "Final" not in ast.unparse(node.annotation)):
                plain.append(f"{source.name}:{node.lineno} {node.target.id}")
    assert plain == []


def test_a_build_is_named_by_its_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    copy = tmp_path / "fuzzmmu"
    shutil.copytree(ROOT / "fuzzmmu", copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(native, "_PACKAGE", copy)
    before = native.digest()
    assert native.digest() == before
    (copy / "campaign" / "fuzz.py").write_text("# neither compiled nor imported by them\n")
    assert native.digest() == before
    (copy / "program" / "world.py").write_text("# imported: its constants are compiled in\n")
    assert native.digest() != before
    before = native.digest()
    (copy / "model" / "mmu" / "internal.py").write_text("# kept Python, yet inlined\n")
    changed = native.digest()
    assert changed != before
    (copy / "model" / "mmu" / "spte.py").write_text("# compiled\n")
    assert native.digest() != changed
    changed = native.digest()
    # which modules are compiled names the build too, not only their sources
    monkeypatch.setattr(native, "_COMPILED", (*native._COMPILED, "campaign/fuzz.py"))
    assert native.digest() != changed


def test_no_build_means_python(tmp_path: Path) -> None:
    assert not native.built(tmp_path)
    assert native.activate(tmp_path) is None
    assert native.active() is None  # this test process runs the Python model


def test_the_compiled_model_only_runs_where_no_line_is_watched() -> None:
    settings_from_environment({"FUZZMMU_NATIVE": "1", "FUZZMMU_FEEDBACK": "state"})
    with pytest.raises(SettingsError, match="no lines for line feedback"):
        settings_from_environment({"FUZZMMU_NATIVE": "1", "FUZZMMU_FEEDBACK": "lines"})
    with pytest.raises(SettingsError, match="no lines"):
        settings_from_environment({"FUZZMMU_NATIVE": "1", "FUZZMMU_FEEDBACK": "both"})


def test_fuzz_refuses_the_compiled_model_with_line_feedback(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fuzz", "--model", "compiled", "--feedback", "lines", "--max-time", "1"]) == 2
    assert "no lines for line feedback" in capsys.readouterr().err


def _inputs(n: int) -> list[bytes]:
    """Campaign-like inputs: random bytes and op-level mutations of the shipped seeds."""
    rng = random.Random(11)
    seeds = [p.read_bytes() for p in sorted((ROOT / "corpus").iterdir()) if p.suffix == ""]
    out = []
    for _ in range(n):
        if rng.random() < 1 / 3:
            out.append(rng.randbytes(rng.randint(0, MAX_LEN)))
        else:
            out.append(mutate(rng.choice(seeds), MAX_LEN, rng.getrandbits(32)))
    return out


_RUN_COMPILED = """
import json, sys
from fuzzmmu import native
import fuzzmmu.model.mmu.mmu as mmu
from fuzzmmu.oracle.executor import run
from fuzzmmu.program.codec import decode
from fuzzmmu.program.text import parse_program
cases = json.loads(sys.stdin.read())
out = []
for form, data, bugs in reversed(cases):  # another order than the Python run's
    o = run(decode(bytes.fromhex(data)) if form == "hex" else parse_program(data), bugs)
    d = o.divergence
    out.append(None if d is None else [d.kind.value, d.op_index, d.signature])
print(json.dumps({"active": str(native.active()), "module": mmu.__file__,
                  "outcomes": out[::-1]}))
"""


def test_compiled_and_python_models_give_the_same_outcomes() -> None:
    problem = native.compiler_problem()
    if problem is not None and not native.built():
        pytest.skip(f"no compiled model can be built here: {problem}")
    path = native.build().path  # or the build made before (CI makes it once)
    mutants = [b.id for b in CATALOG if b.available]
    # Campaign-like inputs, clean and under the mutants in turn, and every mutant's
    # reproducer under its mutant (a divergence of each kind the catalog has).
    cases = [("hex", data.hex(), [] if i % 2 else [mutants[(i // 2) % len(mutants)]])
             for i, data in enumerate(_inputs(400))]
    cases += [("text", (REPRODUCERS / f"{bug}.txt").read_text(), [bug]) for bug in mutants]
    expected = []
    for form, data, bugs in cases:
        program: Program = (decode(bytes.fromhex(data)) if form == "hex"
                            else parse_program(data))
        d = run(program, bugs).divergence
        expected.append(None if d is None else [d.kind.value, d.op_index, d.signature])
    env = {**os.environ, "FUZZMMU_NATIVE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _RUN_COMPILED], input=json.dumps(cases),
                          capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout)
    assert got["active"] == str(path)
    assert got["module"].endswith(native._EXT)  # the compiled module ran, not the source
    assert sum(o is not None for o in expected) >= len(mutants)
    assert got["outcomes"] == expected


def test_the_compiled_model_must_come_before_its_modules(tmp_path: Path) -> None:
    # A finished build as far as activate() can tell: it refuses before loading anything.
    build = native.build_dir(tmp_path)
    build.mkdir(parents=True)
    (build / native._DONE).write_text("")
    script = ("import sys\nimport fuzzmmu.model.mmu.spte\nfrom fuzzmmu import native\n"
              "native.activate(__import__('pathlib').Path(sys.argv[1]))\n")
    env = {k: v for k, v in os.environ.items() if k != "FUZZMMU_NATIVE"}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT, check=False)
    assert proc.returncode != 0
    assert re.search(r"must be activated before fuzzmmu\.\S+ is imported", proc.stderr)


def test_compile_check_says_whether_a_build_is_there(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FUZZMMU_NATIVE_CACHE", str(tmp_path))
    assert main(["compile", "--check"]) == 1
    assert "not built" in capsys.readouterr().out
    build = native.build_dir()
    assert build.parent == tmp_path
    build.mkdir()
    (build / native._DONE).write_text("")
    assert main(["compile", "--check"]) == 0
    out = capsys.readouterr().out
    assert "built" in out and "not built" not in out
