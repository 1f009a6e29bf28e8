"""`fuzzmmu replay`: exit status 0 (agree), 1 (divergence), 2 (unusable input); the text and
binary forms of a program give the same result; --json, --bug, --trace."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fuzzmmu.cli import main
from fuzzmmu.model.bugs import CATALOG
from fuzzmmu.oracle.executor import run
from fuzzmmu.program.files import read_program, write_program

# seed bug 1: an 8-byte store across PT entries 0 and 1 clears entry 1's P bit
MISALIGNED = (Path(__file__).resolve().parent / "bugs" / "reproducers"
              / "misaligned-pt-write-two-sptes.txt").read_text()
BUG = "misaligned-pt-write-two-sptes"
NONPAE = """\
# fuzzmmu program v1
config policy=zap mmio-gen-bits=19 maxphyaddr=40 mmu-pages=2000 boot=32bit
map cpu0 root=current current 0x1000 -> 0x5 P|W|U|A|D level=1 upper=W|U|A pool=0x8
read cpu0 0x1000+0x0 width=8 cpl=3
"""
RACE = """\
# fuzzmmu program v1
config policy=zap mmio-gen-bits=19 maxphyaddr=40 mmu-pages=2000 boot=4level
map cpu0 root=current current 0x1000 -> 0x5 P|W|U|A|D level=1 upper=W|U|A pool=0x8
interleave at=faultin
  read cpu0 0x1000+0x0 width=8 cpl=0
  pte cpu1 table=0xa index=1 -> 0x7 P|W|U|A|D width=8
read cpu0 0x1000+0x0 width=8 cpl=0
"""
DIVERGENCE_KEYS = {"kind", "op_index", "op", "step", "expected", "actual", "signature"}


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich wraps at 80 columns off a terminal, even inside a path; messages are compared
    whole."""
    monkeypatch.setenv("COLUMNS", "1000")


def replay(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str]:
    code = main(["replay", *map(str, argv)])
    return code, capsys.readouterr().out


def replay_error(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> str:
    """A usage error: exit status 2, stdout empty (a --json reader sees no half output), the
    message on stderr."""
    code = main(["replay", *map(str, argv)])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    return err


def words(text: str) -> str:
    """The output with its whitespace (and any line wrapping) normalised."""
    return " ".join(text.split())


@pytest.fixture
def progs(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, text in (("misaligned", MISALIGNED), ("nonpae", NONPAE), ("race", RACE)):
        path = tmp_path / f"{name}.txt"
        path.write_text(text)
        out[name] = path
        binary = tmp_path / f"{name}.bin"
        write_program(binary, read_program(path))
        out[f"{name}.bin"] = binary
    return out


# ---------------------------------------------------------------------- exit status


def test_clean_program_exits_0(capsys: pytest.CaptureFixture[str], progs: dict[str, Path]
                               ) -> None:
    code, out = replay(capsys, progs["nonpae"])
    assert code == 0
    assert "no divergence (2 ops" in words(out)


def test_misaligned_example_diverges_only_with_its_bug(
        capsys: pytest.CaptureFixture[str], progs: dict[str, Path]) -> None:
    code, out = replay(capsys, progs["misaligned"])
    assert code == 0 and "no divergence" in out
    code, out = replay(capsys, progs["misaligned"], "--bug", BUG)
    assert code == 1
    text = words(out)
    assert "missing-fault at op 6: access: read cpu0 0x1000" in text
    assert "expected (reference): #PF cr2=0x1000" in text
    assert "actual (model): RAM hpa=0x6000" in text
    assert "signature: missing-fault:access/read:4level:#PF(0)->ram" in text
    assert f"bugs: {BUG}" in text
    # The view of both machines before the diverging access.
    assert "reference walk of 0x1000" in text
    assert "model: shadow tables and host TLB" in text


def test_exit_status_through_the_console_script(progs: dict[str, Path]) -> None:
    cmd = [sys.executable, "-m", "fuzzmmu.cli", "replay", "--json"]
    ok = subprocess.run([*cmd, str(progs["misaligned"])], capture_output=True, text=True)
    bad = subprocess.run([*cmd, str(progs["misaligned"]), "--bug", BUG], capture_output=True,
                         text=True)
    unusable = subprocess.run([*cmd, str(progs["misaligned"]) + ".missing"],
                              capture_output=True, text=True)
    assert (ok.returncode, bad.returncode, unusable.returncode) == (0, 1, 2)
    assert json.loads(ok.stdout)["divergence"] is None
    assert json.loads(bad.stdout)["divergence"]["kind"] == "missing-fault"
    assert "Traceback" not in ok.stderr + bad.stderr + unusable.stderr


# ---------------------------------------------------------------------- forms and --json


@pytest.mark.parametrize("name", ["misaligned", "nonpae", "race"])
@pytest.mark.parametrize("bugs", [[], ["--bug", BUG]])
def test_text_and_binary_forms_give_the_same_result(
        capsys: pytest.CaptureFixture[str], progs: dict[str, Path], name: str,
        bugs: list[str]) -> None:
    code_t, out_t = replay(capsys, progs[name], "--json", *bugs)
    code_b, out_b = replay(capsys, progs[f"{name}.bin"], "--json", *bugs)
    code_s, out_s = replay(capsys, str(progs[f"{name}.bin"]) + ".txt", "--json", *bugs)
    assert code_t == code_b == code_s
    assert json.loads(out_t) == json.loads(out_b) == json.loads(out_s)


def test_json_shape_without_divergence(capsys: pytest.CaptureFixture[str],
                                       progs: dict[str, Path]) -> None:
    code, out = replay(capsys, progs["race"], "--json")
    assert code == 0
    assert len(out.strip().splitlines()) == 1
    assert json.loads(out) == {"divergence": None, "ops": 3, "bugs": [], "skipped": None}


def test_json_shape_with_divergence(capsys: pytest.CaptureFixture[str],
                                    progs: dict[str, Path]) -> None:
    code, out = replay(capsys, progs["misaligned"], "--json", "--bug", BUG, "--bug", BUG)
    assert code == 1
    doc = json.loads(out)
    assert set(doc) == {"divergence", "ops", "bugs", "skipped"}
    assert doc["ops"] == 7 and doc["bugs"] == [BUG]
    d = doc["divergence"]
    assert set(d) >= DIVERGENCE_KEYS
    assert d["kind"] == "missing-fault" and d["op_index"] == 6
    assert d["op"] == "read cpu0 0x1000+0x0 width=8 cpl=0"
    assert d["expected"].startswith("#PF cr2=0x1000") and d["actual"].startswith("RAM ")
    assert d["signature"] == "missing-fault:access/read:4level:#PF(0)->ram"
    # The same divergence as the executor's.
    direct = run(read_program(progs["misaligned"]), [BUG], audit=True).divergence
    assert direct is not None and d == direct.to_json()


def test_no_audit_flag(capsys: pytest.CaptureFixture[str], progs: dict[str, Path]) -> None:
    code, out = replay(capsys, progs["misaligned"], "--json", "--no-audit", "--bug", BUG)
    assert code == 1 and json.loads(out)["divergence"]["op_index"] == 6


# ---------------------------------------------------------------------- --bug


def test_unknown_bug_is_exit_2_listing_the_known_ids(
        capsys: pytest.CaptureFixture[str], progs: dict[str, Path]) -> None:
    err = replay_error(capsys, progs["misaligned"], "--bug", "no-such-bug")
    text = words(err)
    assert "error: unknown bug id 'no-such-bug'; known ids:" in text
    for bug in CATALOG:
        assert bug.id in text


def test_pending_bug_is_exit_2(capsys: pytest.CaptureFixture[str], progs: dict[str, Path]
                               ) -> None:
    pending = [b for b in CATALOG if not b.available]
    if not pending:
        pytest.skip("no pending mutant in the catalog")
    err = replay_error(capsys, progs["misaligned"], "--json", "--bug", pending[0].id)
    assert "pending" in err


# ---------------------------------------------------------------------- --trace


@pytest.mark.parametrize(("name", "bugs"), [("nonpae", []), ("race", []),
                                            ("misaligned", ["--bug", BUG])])
def test_trace_prints_every_step(capsys: pytest.CaptureFixture[str], progs: dict[str, Path],
                                 name: str, bugs: list[str]) -> None:
    code, out = replay(capsys, progs[name], "--trace", *bugs)
    outcome = run(read_program(progs[name]), [b for b in bugs if b != "--bug"], audit=True,
                  trace=True)
    assert code == (1 if outcome.divergence else 0)
    # (the view after a divergence has a table titled "model: shadow tables ...")
    lines = [line.strip() for line in out.splitlines()
             if not line.startswith("model: shadow tables")]
    assert sum(line.startswith("model: ") for line in lines) == len(outcome.trace)
    assert sum(line.startswith("reference: ") for line in lines) == len(outcome.trace)
    assert outcome.steps_run == len(outcome.trace)
    text = words(out)
    for entry in outcome.trace:
        assert words(entry.step) in text
    assert text.count("DIFFERS") == sum(not t.matched for t in outcome.trace)


# ---------------------------------------------------------------------- unusable files


def test_missing_file_is_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = replay_error(capsys, tmp_path / "nope.bin")
    assert err.strip() == f"error: cannot read {tmp_path / 'nope.bin'}: No such file or directory"


def test_directory_is_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = replay_error(capsys, tmp_path, "--json")
    assert err.strip() == f"error: cannot read {tmp_path}: Is a directory"


@pytest.mark.parametrize(("body", "line", "message"), [
    ("smi cpu0\nfrobnicate cpu0\n", 3, "unknown operation 'frobnicate'"),
    ("read cpu0 0x1234000\n", 2, "address 0x1234000 is not one of the world's"),
    ("smi cpu0\nconfig policy=zap\n", 3, "config must come before the operations"),
])
def test_corrupt_text_file_is_exit_2_with_the_line(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, body: str, line: int,
        message: str) -> None:
    path = tmp_path / "corrupt.txt"
    path.write_text("# fuzzmmu program v1\n" + body)
    err = replay_error(capsys, path, "--json")
    assert err.strip() == f"error: {path}: line {line}: {message}"


def test_line_of_only_settings_is_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path
                                         ) -> None:
    path = tmp_path / "corrupt.txt"
    path.write_text("# fuzzmmu program v1\nwidth=8\n")
    err = replay_error(capsys, path)
    assert "line 2" in err
