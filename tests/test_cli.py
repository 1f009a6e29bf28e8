"""The `fuzzmmu` command line: --version and walk."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fuzzmmu import __version__
from fuzzmmu.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_version_via_console_script() -> None:
    out = subprocess.run([sys.executable, "-m", "fuzzmmu.cli", "--version"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"fuzzmmu {__version__}"


def test_walk_demo_prints_every_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_cli(capsys, "walk", "--demo")
    assert code == 0
    assert "ok: gpa 0x5008 (4 KiB page, rights u-x)" in out
    assert "#PF error code 0x7 = P|W|U" in out
    assert "#PF error code 0x15 = P|U|FETCH" in out
    assert "ok: gpa 0x201234 (2 MiB page" in out
    assert "#PF error code 0x4 = U" in out


def test_walk_from_flags_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_cli(capsys, "walk", "--mode", "32bit", "--cr3", "0x1000",
                        "--entry", "0x1000=0x2007", "--entry", "0x2004=0x3007",
                        "--gva", "0x1abc", "--access", "write", "--flag", "user", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["ok"] and doc["gpa"] == 0x3ABC and doc["level"] == 1
    assert [s["level"] for s in doc["steps"]] == [2, 1]


def test_walk_from_file_sets_ad(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "pae.txt"
    spec.write_text("mode pae\ncr3 0x1000\nset-ad\naccess write\ngva 0x40000123\n"
                    "0x1008 = 0x2001   # PDPTE[1]\n0x2000 = 0x3003\n0x3000 = 0x4003\n")
    code, out = run_cli(capsys, "walk", str(spec))
    assert code == 0
    assert "ok: gpa 0x4123" in out
    assert "A/D: entry at 0x3000 0x4003 -> 0x4063" in out


def test_walk_fault_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_cli(capsys, "walk", "--mode", "4level", "--cr3", "0x1000", "--gva", "0x0")
    assert code == 1
    assert "#PF error code 0x0 = 0" in out


@pytest.mark.parametrize("argv,message", [
    (["--mode", "6level"], "unknown paging mode"),
    (["--entry", "zz=1"], "an entry is 'GPA = VALUE'"),
    (["--flag", "bogus"], "unknown setting 'bogus'"),
    (["--mode", "pae", "--cr3", "0x1000", "--entry", "0x1000=0x8000000000000001"],
     "#GP(0) loading PDPTE0"),
    (["/nonexistent/tables.txt"], "cannot read"),
])
def test_walk_bad_input(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    code = main(["walk", *argv])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert message in err


def test_walk_non_canonical(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_cli(capsys, "walk", "--mode", "4level", "--gva", "0x800000000000")
    assert code == 1
    assert "not canonical" in out


def test_bugs_table_and_json(capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    from fuzzmmu.model.bugs import CATALOG

    monkeypatch.setenv("COLUMNS", "300")
    code, out = run_cli(capsys, "bugs")
    assert code == 0 and "misaligned-pt-write-two-sptes" in out and "pending" in out
    code, out = run_cli(capsys, "bugs", "--json")
    doc = json.loads(out)
    assert [d["id"] for d in doc] == [b.id for b in CATALOG]
    assert all({"summary", "fix", "year", "seed", "needs", "available"} <= d.keys() for d in doc)
    assert sum(d["seed"] for d in doc) >= 5
