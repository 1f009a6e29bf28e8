"""After a campaign: crash files grouped by signature, minimized to 1-minimal programs with
the same divergence, exported as pytest files that fail on the buggy model and pass on the
clean one."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from fuzzmmu.campaign.demo import run_exported
from fuzzmmu.campaign.export import export
from fuzzmmu.campaign.minimize import NotDivergent, minimize
from fuzzmmu.campaign.triage import CrashFileError, load_crash, triage, write_sidecar
from fuzzmmu.oracle.executor import run
from fuzzmmu.program.codec import encode
from fuzzmmu.program.files import read_program
from fuzzmmu.program.ops import Invlpg, MmuPages, Program, Shrink, ZapAll

REPRO = Path("tests/bugs/reproducers")


def _crash_dir(tmp_path: Path, bugs: dict[str, str]) -> Path:
    d = tmp_path / "crashes"
    d.mkdir()
    for n, (name, bug) in enumerate(bugs.items()):
        path = d / f"crash-{n:040x}"
        path.write_bytes(encode(read_program(REPRO / f"{name}.txt")))
        write_sidecar(load_crash(path, (bug,)), 1.0 + n)
    return d


def test_triage_groups_by_signature_and_names_the_smallest(tmp_path: Path) -> None:
    d = _crash_dir(tmp_path, {"misaligned-pt-write-two-sptes": "misaligned-pt-write-two-sptes",
                              "cr0wp-not-in-role": "cr0wp-not-in-role"})
    # a larger duplicate of the first: same signature, more ops
    big = read_program(REPRO / "misaligned-pt-write-two-sptes.txt")
    (d / f"crash-{9:040x}").write_bytes(encode(Program(big.header, (*big.ops[:5],
                                                                    *big.ops))))
    write_sidecar(load_crash(d / f"crash-{9:040x}", ("misaligned-pt-write-two-sptes",)), 9.0)
    groups, errors = triage(d)
    assert not errors
    assert [len(g.members) for g in groups] == [2, 1]
    assert groups[0].smallest.path.name == f"crash-{0:040x}"
    assert groups[0].signature != groups[1].signature


def test_corrupt_sidecar_is_a_clear_error(tmp_path: Path) -> None:
    d = _crash_dir(tmp_path, {"cr0wp-not-in-role": "cr0wp-not-in-role"})
    side = next(d.glob("*.json"))
    side.write_text("{not json")
    with pytest.raises(CrashFileError, match="JSON"):
        load_crash(d / side.name.removesuffix(".json"))
    side.write_text(json.dumps({"bugs": "cr0wp-not-in-role"}))
    with pytest.raises(CrashFileError, match="list of bug ids"):
        load_crash(d / side.name.removesuffix(".json"))
    groups, errors = triage(d)
    assert not groups and len(errors) == 1


def test_a_sidecar_without_a_target_is_a_model_crash(tmp_path: Path) -> None:
    """Sidecars written before campaigns could run on real KVM have no "target"."""
    d = _crash_dir(tmp_path, {"cr0wp-not-in-role": "cr0wp-not-in-role"})
    side = next(d.glob("*.json"))
    doc = json.loads(side.read_text())
    assert doc.pop("target") == "model"
    side.write_text(json.dumps(doc))
    crash = load_crash(d / side.name.removesuffix(".json"))
    assert crash.target == "model" and crash.divergence is not None
    groups, errors = triage(d)
    assert not errors and groups[0].target == "model"


@pytest.mark.parametrize("name", ["misaligned-pt-write-two-sptes", "inherited-access-shared-pt",
                                  "stale-gpte-revalidation-skipped"])
def test_minimized_program_is_1_minimal_with_the_same_signature(name: str) -> None:
    program = read_program(REPRO / f"{name}.txt")
    # pad the reproducer with ops that change nothing at the start, so there is something
    # to remove
    padding = (ZapAll(), Shrink(1), Invlpg(0, 0x8000), Invlpg(1, 0x8000), MmuPages(2000))
    padded = Program(program.header, (*padding, *program.ops))
    before = run(padded, [name]).divergence
    assert before is not None
    result = minimize(padded, [name])
    assert result.ops_after <= len(program.ops) and result.ops_before == len(padded.ops)
    _assert_1_minimal(result.program, [name], before.signature)


def test_minimizing_tests_candidates_with_the_simplified_header() -> None:
    """Found by the benchmark's 1-minimality check: once the header had been simplified, the
    minimizer went on testing candidates with the original one."""
    bugs = ["kvm.mmio-cache-ignores-smm"]
    program = read_program(Path(__file__).parent / "programs" / "header-simplified-early.txt")
    before = run(program, bugs).divergence
    assert before is not None
    result = minimize(program, bugs)
    assert result.program.header != program.header
    _assert_1_minimal(result.program, bugs, before.signature)


def _assert_1_minimal(program: Program, bugs: list[str], signature: str) -> None:
    after = run(program, bugs).divergence
    assert after is not None and after.signature == signature
    ops = program.ops
    for i in range(len(ops)):
        fewer = Program(program.header, ops[:i] + ops[i + 1:])
        d = run(fewer, bugs).divergence
        assert d is None or d.signature != signature, f"op {i} could go"


def test_minimize_refuses_a_program_that_does_not_diverge() -> None:
    with pytest.raises(NotDivergent):
        minimize(read_program("corpus/smm.txt"))


def test_exported_test_fails_on_the_buggy_model_and_passes_on_the_clean_one(
        tmp_path: Path) -> None:
    bug = "inherited-access-shared-pt"
    program = read_program(REPRO / f"{bug}.txt")
    d = run(program, [bug]).divergence
    assert d is not None
    out = tmp_path / "tests" / "regressions" / "test_cve_2021_38198.py"
    text = export(program, (bug,), d, out, "crash-1234")
    assert "eval(" not in text and "pickle" not in text
    assert "def test_cve_2021_38198()" in text and d.signature in text
    assert run_exported(out, (bug,)).startswith("FAILED")
    assert run_exported(out, ()) == "passed"


def test_a_test_exported_by_an_earlier_version_still_runs() -> None:
    """Exported tests live outside the repository: the import path they use (``run`` and
    ``parse_program``) stays stable across layout changes. This file was exported by fuzzmmu
    0.1, before the model moved to fuzzmmu.model."""
    old = Path(__file__).parent / "programs" / "exported_by_0_1.py"
    assert run_exported(old, ("misaligned-pt-write-two-sptes",)).startswith("FAILED")
    assert run_exported(old, ()) == "passed"


def test_export_embeds_the_program_as_data(tmp_path: Path) -> None:
    """The program is a string literal the text parser reads: quotes and backslashes that a
    hostile file might carry cannot become code (the text form only has world tokens)."""
    bug = "cr0wp-not-in-role"
    program = read_program(REPRO / f"{bug}.txt")
    d = run(program, [bug]).divergence
    assert d is not None
    out = tmp_path / "test_x.py"
    text = export(program, (bug,), d, out, "crash-\"'\\x00; import os")
    source_line = next(line for line in text.splitlines() if "exported by fuzzmmu" in line)
    assert "import os" in source_line  # in the docstring, as text
    assert re.search(r"^import os", text, re.M) is None
    assert run_exported(out, ()) == "passed"


def test_cli_pipeline_triage_minimize_export(tmp_path: Path) -> None:
    from fuzzmmu.cli import main

    d = _crash_dir(tmp_path, {"misaligned-pt-write-two-sptes": "misaligned-pt-write-two-sptes"})
    crash = next(p for p in d.iterdir() if p.suffix == "")
    assert main(["triage", str(d), "--json"]) == 0
    small = tmp_path / "small"
    assert main(["minimize", str(crash), "-o", str(small)]) == 0
    assert small.exists() and (tmp_path / "small.txt").exists()
    out = tmp_path / "test_small.py"
    assert main(["export", str(small), "-o", str(out)]) == 0  # bugs from the sidecar
    assert run_exported(out, ("misaligned-pt-write-two-sptes",)).startswith("FAILED")
    assert main(["export", str(shutil.copy(REPRO / "cr0wp-not-in-role.txt", tmp_path)),
                 "-o", str(tmp_path / "t.py")]) == 2  # no bugs: nothing diverges


def test_minimize_with_the_audit_shrinks_what_only_the_audit_sees(tmp_path: Path) -> None:
    """An audit violation (here a writable spte for a gfn shadowed in the other address space,
    with the mutant that allows it) replays only with the audit: `minimize --audit` keeps it."""
    from fuzzmmu.cli import main

    program = Path("tests/oracle/clean/writable-spte-over-stale-mmio-spte.txt")
    bug = ["--bug", "kvm.mmio-spte-counts-as-writable"]
    assert main(["minimize", str(program), *bug, "-o", str(tmp_path / "a")]) == 2
    assert main(["minimize", str(program), *bug, "-o", str(tmp_path / "b"), "--audit"]) == 0
    small = read_program(tmp_path / "b.txt")
    d = run(small, ["kvm.mmio-spte-counts-as-writable"], audit=True).divergence
    assert d is not None and d.signature.startswith("audit-violation:")
    assert len(small.ops) <= len(read_program(program).ops)
