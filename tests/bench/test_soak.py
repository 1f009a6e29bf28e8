"""`fuzzmmu soak`: small soaks end to end (clean, with a mutant through the Python API, stopped
by a signal), the work split, and the flags it refuses."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from fuzzmmu.bench.soak import SoakConfig, SoakError, parse_engines, plan_workers, run_soak
from fuzzmmu.cli import main
from fuzzmmu.oracle.executor import run
from fuzzmmu.program.files import read_program

# Found within a few programs by every engine (README, Performance).
MUTANT = "walk-addr-access-checks.error-code"
# For the short Atheris campaign: a mutant that few seeds trigger. One that most seeds trigger
# crashes every fork-mode job at once, and libFuzzer reports no programs within seconds.
RARE_MUTANT = "walk-addr-access-checks.fixed-fault"


def soak_cli(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fuzzmmu.cli", "soak", *map(str, argv)],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "COLUMNS": "200"})


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def test_a_clean_soak_counts_every_program_and_exits_0(tmp_path: Path) -> None:
    res = soak_cli("--programs", 300, "--jobs", 2, "--engines", "random,generator",
                   "--out", tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads((tmp_path / "soak.json").read_text())
    assert data["programs"] == 300 and data["divergences"] == 0 and data["groups"] == []
    assert data["errors"] == [] and data["unreproduced"] == []
    engines = data["engines"]
    assert list(engines) == ["random", "generator"]
    for e in engines.values():
        # 150 each, 75 in each worker; the audit on programs 0 of every 100 of each worker
        assert e["programs"] == 150 and e["workers"] == 2 and e["audited"] == 2
        assert e["seconds"] > 0 and e["programs_per_s"] > 0
        assert 0 <= e["cut"] <= 3  # outside KVM's contract: rare
    assert "cut short" in res.stdout
    assert data["audited"] == 4 and data["programs_per_s"] > 0
    assert data["settings"]["bugs"] == [] and data["settings"]["jobs"] == 2
    assert data["commit"] is None or len(data["commit"]) == 40
    assert data["date"]
    assert "no divergence" in res.stdout and "programs/s" in res.stdout
    assert not (tmp_path / "divergences").exists()


def _groups(out: Path) -> dict[str, int]:
    data = json.loads((out / "soak.json").read_text())
    return {g["signature"]: g["count"] for g in data["groups"]}


def test_a_mutant_is_found_minimized_and_grouped_the_same_way_every_time(
        tmp_path: Path) -> None:
    cfg = SoakConfig(programs=80, jobs=2, engines=("random", "generator"), out=tmp_path / "a")
    result = run_soak(cfg, quiet(), bugs=(MUTANT,))
    assert result.exit_code == 1
    data = json.loads((tmp_path / "a" / "soak.json").read_text())
    assert data["settings"]["bugs"] == [MUTANT] and data["programs"] == 80
    groups = data["groups"]
    assert groups and sum(g["count"] for g in groups) == data["divergences"] > 0
    assert sum(e["divergences"] for e in data["engines"].values()) == data["divergences"]
    assert len({g["signature"] for g in groups}) == len(groups)
    for g in groups:
        assert g["minimized"] is not None, g
        assert g["minimized_ops"] <= g["ops"]
        # The minimized program, and every program kept, diverges with the group's signature
        # under the mutant, and not on the clean model.
        small = read_program(tmp_path / "a" / g["file"])
        assert run(small, [MUTANT]).divergence.signature == g["signature"]
        assert run(small).divergence is None
        assert 1 <= len(g["kept"]) <= g["count"]
        for kept in g["kept"]:
            program = read_program(tmp_path / "a" / kept)
            assert read_program(tmp_path / "a" / f"{kept}.txt") == program
            assert run(program, [MUTANT]).divergence.signature == g["signature"]
    # Deterministic per seed: the same programs, so the same groups.
    again = run_soak(SoakConfig(programs=80, jobs=2, engines=("random", "generator"),
                                out=tmp_path / "b", minimize_runs=0), quiet(), bugs=(MUTANT,))
    assert again.exit_code == 1
    assert _groups(tmp_path / "b") == _groups(tmp_path / "a")


def test_the_hypothesis_engine_counts_its_programs_and_reports_what_it_finds(
        tmp_path: Path) -> None:
    result = run_soak(SoakConfig(programs=12, jobs=1, engines=("hypothesis",), out=tmp_path,
                                 audit_every=5), quiet(), bugs=(MUTANT,))
    t = result.engines["hypothesis"]
    assert t.programs == 12 and t.audited == 3  # programs 0, 5 and 10
    assert result.errors == []
    assert result.groups and result.exit_code == 1
    for g in result.groups.values():
        assert g.engines == {"hypothesis": g.count}
        assert g.minimized is not None


def test_a_time_budget_stops_the_soak(tmp_path: Path) -> None:
    start = time.monotonic()
    result = run_soak(SoakConfig(max_time=2, jobs=2, engines=("random", "generator"),
                                 out=tmp_path, progress_every=0.5), quiet())
    assert time.monotonic() - start < 20
    assert result.exit_code == 0 and result.errors == []
    assert all(t.programs > 0 and t.workers == 2 for t in result.engines.values())
    assert 1.5 < result.seconds < 15


def _children(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                out.append(int(name))
    return out


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_sigterm_stops_every_worker_and_still_writes_the_report(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "fuzzmmu.cli", "soak", "--max-time", "100",
                             "--jobs", "2", "--engines", "random", "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        # the first progress line: the workers are running
        for line in proc.stdout:
            if "programs (" in line:
                break
        workers = _children(proc.pid)
        assert workers
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in out
    data = json.loads((tmp_path / "soak.json").read_text())
    assert data["stopped_by"] == "SIGTERM" and data["errors"] == []
    assert data["engines"]["random"]["programs"] > 0
    # The workers, and multiprocessing's resource tracker (which goes when its pipe from the
    # soak closes, a moment after the soak): none outlives the soak.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_running(pid) for pid in workers):
        time.sleep(0.1)
    assert not [pid for pid in workers if _running(pid)]


def test_the_work_is_shared_out_engine_by_engine_then_worker_by_worker() -> None:
    cfg = SoakConfig(programs=301, jobs=2, engines=("random", "generator", "hypothesis"),
                     seed=7)
    plans = plan_workers(cfg, (), None)
    assert [p.seed for p in plans] == [7, 8]
    assert [p.quotas for p in plans] == [(51, 50, 50), (50, 50, 50)]
    # fewer programs than workers and engines: no worker is started with nothing to do
    plans = plan_workers(SoakConfig(programs=1, jobs=4, engines=("random", "generator")), (),
                         None)
    assert [(p.index, p.engines, p.quotas) for p in plans] == [(0, ("random",), (1,))]
    # a time budget only: every worker runs every engine until the end
    plans = plan_workers(SoakConfig(max_time=5, jobs=2), (), 123.0)
    assert all(p.quotas == (None,) * 4 and p.deadline == 123.0 for p in plans)


@pytest.mark.parametrize(("argv", "message"), [
    ([], "--programs N, --max-time S or both"),
    (["--programs", "0"], "--programs must be at least 1"),
    (["--programs", "10", "--jobs", "0"], "--jobs must be at least 1"),
    (["--max-time", "0"], "--max-time must be more than 0"),
    (["--programs", "10", "--audit-every", "-1"], "--audit-every must be at least 0"),
    (["--programs", "10", "--engines", "random,nope"], "unknown engine 'nope'"),
    (["--programs", "10", "--engines", ","], "--engines needs at least one"),
])
def test_bad_flags_are_a_clear_error(argv: list[str], message: str,
                                     capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["soak", *argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_python_api_refuses_unknown_bugs_and_engines(tmp_path: Path) -> None:
    with pytest.raises(SoakError, match="no-such-bug"):
        run_soak(SoakConfig(programs=1, out=tmp_path), quiet(), bugs=("no-such-bug",))
    with pytest.raises(SoakError, match="unknown engine"):
        run_soak(SoakConfig(programs=1, engines=("bytes",), out=tmp_path), quiet())
    assert parse_engines("random, generator,random") == ("random", "generator")


def test_a_short_atheris_campaign_is_counted_and_its_crash_files_read_back(
        tmp_path: Path) -> None:
    result = run_soak(SoakConfig(max_time=4, jobs=1, engines=("atheris",), out=tmp_path,
                                 audit_every=10), quiet(), bugs=(RARE_MUTANT,))
    t = result.engines["atheris"]
    assert result.errors == [] and result.unreproduced == []
    assert t.programs > 0 and t.audited > 0  # libFuzzer's count; the corpus sample audited
    assert result.groups and result.exit_code == 1
    for g in result.groups.values():
        assert g.engines == {"atheris": g.count} and g.minimized is not None
        assert all(k.startswith(f"programs/{g.signature_id}/atheris-w0-") for k in g.kept)
    crashes = list((tmp_path / "atheris" / "w0" / "crashes").glob("crash-*.json"))
    assert len(crashes) == result.divergences - sum(
        1 for g in result.groups.values() for k in g.kept if "-corpus-" in k)


def test_an_out_folder_that_is_not_a_soaks_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "programs").mkdir()
    (tmp_path / "programs" / "mine.txt").write_text("not a soak's")
    with pytest.raises(SoakError, match="not a soak's output"):
        run_soak(SoakConfig(programs=1, engines=("random",), out=tmp_path), quiet())
    assert (tmp_path / "programs" / "mine.txt").exists()
