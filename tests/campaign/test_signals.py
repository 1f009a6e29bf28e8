"""Stopping `fuzzmmu fuzz` by a signal sent to its process alone (what `timeout`, systemd, a
batch scheduler or CI do) stops libFuzzer's whole process tree, fork mode's jobs included, and
leaves every crash file with its sidecars; the statistics carry the tree's resident memory.
Real, short campaigns (Linux: the tree is read from /proc)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fuzzmmu.campaign.processes import (
    ProcessTree,
    descendants,
    parent_death_signal,
    process_table,
    tree_memory,
)
from fuzzmmu.campaign.triage import is_crash_file
from fuzzmmu.program.codec import encode
from fuzzmmu.program.files import read_program

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")

REPRO = Path("tests/bugs/reproducers")
# libFuzzer exits within a fraction of a second of SIGTERM; the campaign escalates to SIGKILL
# after 5 s. Past this, something of the tree was left running.
STOP_WITHIN_S = 8.0
HARNESS = "shadow_mmu_fuzzer.py"


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(ppid, state, start time) from /proc, read here rather than through the code under
    test."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return int(fields[1]), fields[0], int(fields[19])


def _tree(root: int) -> dict[int, int]:
    """pid -> start time of ``root`` and all its descendants, by the parent links in /proc."""
    stats = {int(n): s for n in os.listdir("/proc") if n.isdigit() and (s := _stat(int(n)))}
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats and pid not in out:
            out[pid] = stats[pid][2]
            todo += [c for c, s in stats.items() if s[0] == pid]
    return out


def _alive(pid: int, start: int) -> bool:
    """The same process (a reused pid has another start time) and not a zombie: orphans end as
    zombies until init reaps them, which is not ours to wait for."""
    s = _stat(pid)
    return s is not None and s[2] == start and s[1] not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _harnesses(tree: dict[int, int]) -> int:
    return sum(1 for pid in tree if HARNESS in _cmdline(pid))


def _start(tmp_path: Path, jobs: int, *args: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "fuzzmmu.cli", "fuzz", "--corpus", str(tmp_path / "corpus"),
           "--crashes", str(tmp_path / "crashes"), "--stats", str(tmp_path / "stats.jsonl"),
           "--no-dashboard", "--seed", "1", "--max-time", "120", "--jobs", str(jobs), *args]
    # A temporary directory of its own: what the tree leaves there is seen.
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    # A session of its own: the signals of this test go to the campaign process alone, and no
    # terminal signal meant for pytest reaches it.
    return subprocess.Popen(cmd, stdout=(tmp_path / "out.txt").open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True, env=env)


def _stats(tmp_path: Path) -> list[dict]:
    path = tmp_path / "stats.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(x) for x in lines[:-1] + [x for x in lines[-1:] if x.endswith("}")]]


def _fuzzing(proc: subprocess.Popen[bytes], tmp_path: Path, jobs: int) -> dict[int, int]:
    """Wait until libFuzzer is really fuzzing (a statistics line counts programs run; in fork
    mode a job is running beside the parent); the campaign's tree at that moment."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / "out.txt").read_text()
        running = [s for s in _stats(tmp_path) if s.get("execs", 0) > 0]
        tree = _tree(proc.pid)
        if running and _harnesses(tree) >= (2 if jobs > 1 else 1):
            return tree
        time.sleep(0.1)
    raise AssertionError("the campaign never started fuzzing: "
                         + (tmp_path / "out.txt").read_text()[-2000:])


def _kill_leftovers(tree: dict[int, int]) -> None:
    for pid, start in tree.items():
        if _alive(pid, start):
            os.kill(pid, signal.SIGKILL)


def _running_on(tmp_path: Path) -> dict[int, int]:
    """Every live process whose command line names this test's directories: libFuzzer and any
    job, including one started after the tree was recorded."""
    found = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        pid = int(name)
        if str(tmp_path) in _cmdline(pid) and (s := _stat(pid)) and _alive(pid, s[2]):
            found[pid] = s[2]
    return found


def _wait_gone(tree: dict[int, int], tmp_path: Path) -> tuple[float, list[str]]:
    start = time.monotonic()
    while True:
        running = {**tree, **_running_on(tmp_path)}
        left = [f"{pid} {_cmdline(pid)[:120]}" for pid, t in running.items() if _alive(pid, t)]
        if not left or time.monotonic() - start > STOP_WITHIN_S:
            return time.monotonic() - start, left
        time.sleep(0.05)


def _seed_divergent(tmp_path: Path) -> None:
    """A corpus holding a reproducer: the jobs keep finding divergences (--keep-going), so crash
    files are being written and signed when the signal comes."""
    (tmp_path / "corpus").mkdir()
    program = read_program(REPRO / "cr0wp-not-in-role.txt")
    (tmp_path / "corpus" / "repro").write_bytes(encode(program))


@pytest.mark.parametrize(("sig", "jobs"), [
    pytest.param(sig, jobs, id=f"{sig.name}-jobs{jobs}")
    for sig, jobs in [(signal.SIGTERM, 1), (signal.SIGHUP, 1), (signal.SIGINT, 1),
                      (signal.SIGTERM, 2), (signal.SIGHUP, 2), (signal.SIGINT, 2),
                      # the campaign itself dies: nothing of the tree may outlive it either
                      (signal.SIGKILL, 2)]])
def test_a_signal_to_the_campaign_alone_stops_its_whole_tree(tmp_path: Path, sig: int,
                                                            jobs: int) -> None:
    args: tuple[str, ...] = ()
    if jobs > 1:
        _seed_divergent(tmp_path)
        args = ("--bug", "cr0wp-not-in-role", "--keep-going")
    proc = _start(tmp_path, jobs, *args)
    tree: dict[int, int] = {proc.pid: 0}
    try:
        tree = _fuzzing(proc, tmp_path, jobs)
        # What there is to stop: the campaign, libFuzzer, and in fork mode the jobs (sh and an
        # interpreter each) beside the parent.
        assert _harnesses(tree) >= (2 if jobs > 1 else 1), tree
        os.kill(proc.pid, sig)
        took, left = _wait_gone(tree, tmp_path)
        assert not left, f"still running {took:.1f}s after {signal.Signals(sig).name}: {left}"
        rc = proc.wait(timeout=5)
    finally:
        _kill_leftovers({**tree, **_running_on(tmp_path)})
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = (tmp_path / "out.txt").read_text()
    # Nothing of the tree's temporary files is left (fork mode's directory of job corpora and
    # logs included), whatever stopped it: the campaign, or its sentinel when it was killed.
    assert not list((tmp_path / "tmp").iterdir())
    crashes = [p for p in (tmp_path / "crashes").iterdir() if is_crash_file(p)]
    if sig == signal.SIGKILL:
        assert rc == -signal.SIGKILL
        # Killed, it signs nothing more; but what it wrote is whole.
        for side in (tmp_path / "crashes").glob("*.json"):
            assert "bugs" in json.loads(side.read_text())
        return
    assert rc in (0, 1), out  # 1: divergences were found
    assert f"stopped by {signal.Signals(sig).name}" in out, out
    if jobs > 1:
        assert crashes, "the keep-going campaign found nothing: the sidecar check would be moot"
    for crash in crashes:
        txt = crash.with_name(crash.name + ".txt")
        side = crash.with_name(crash.name + ".json")
        assert txt.exists() and side.exists(), f"{crash.name} has no sidecars: {out[-2000:]}"
        assert txt.read_text().startswith("# fuzzmmu")
        assert json.loads(side.read_text())["bugs"] == list(args[1:2])
    assert not [p.name for p in (tmp_path / "crashes").iterdir() if p.name.startswith(".")]
    if sig == signal.SIGTERM and jobs > 1:
        # The corpus fork mode's parent was merging into when it stopped is resumed.
        again = subprocess.run(
            [sys.executable, "-m", "fuzzmmu.cli", "fuzz", "--corpus", str(tmp_path / "corpus"),
             "--crashes", str(tmp_path / "again"), "--stats", str(tmp_path / "again.jsonl"),
             "--no-dashboard", "--seed", "2", "--max-time", "1"],
            capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and "seeded" not in again.stdout, again.stdout
        lines = [json.loads(x) for x in (tmp_path / "again.jsonl").read_text().splitlines()]
        assert max(x.get("execs", 0) for x in lines) > 0


def test_stats_carry_the_resident_memory_of_the_tree(tmp_path: Path) -> None:
    proc = _start(tmp_path, 1)
    tree: dict[int, int] = {proc.pid: 0}
    try:
        tree = _fuzzing(proc, tmp_path, 1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # a line measured while libFuzzer ran
            lines = [s for s in _stats(tmp_path) if s.get("execs", 0) > 0 and s.get("rss_mb")]
            if lines:
                break
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=STOP_WITHIN_S)
    finally:
        _kill_leftovers(tree)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert lines, _stats(tmp_path)
    line = lines[-1]
    # One process, libFuzzer's (not the campaign's, not the sentinel's): its resident memory is
    # at most the peak libFuzzer itself reports (rss_mb), and not far below it. An interpreter
    # with the model loaded is tens of MB.
    assert line["processes"] == 1, line
    assert 20 <= line["tree_rss_mb"] <= 4096, line
    assert 0.5 * line["rss_mb"] <= line["tree_rss_mb"] <= 1.25 * line["rss_mb"] + 5, line


def test_process_tree_reads_and_stops_a_tree_that_ignores_sigterm(tmp_path: Path) -> None:
    """The unit under the campaign, on a tree of plain interpreters: a child that ignores
    SIGTERM is killed after the grace period, and nothing is left."""
    script = ("import os, signal, subprocess, sys, tempfile, time\n"
              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              "tempfile.mkstemp(dir=os.environ['TMPDIR'])\n"
              "time.sleep(60)\n")
    tree = ProcessTree([sys.executable, "-c", script], grace=1.0, scratch=True)
    scratch = tree.scratch
    assert scratch is not None and scratch.is_dir()
    try:
        deadline = time.monotonic() + 10
        while ((len(descendants(tree.pid)) < 2 or not list(scratch.iterdir()))
               and time.monotonic() < deadline):
            time.sleep(0.05)
        members = descendants(tree.pid, process_table())
        assert len(members) == 2 and all(p.pgid == tree.pid for p in members)
        mem = tree.memory()
        assert mem is not None and mem.processes == 2 and 5 < mem.rss_mb < 500
        took = tree.stop()
    finally:
        tree.close()
    assert 0.9 <= took < 4, took  # waited the grace period, then SIGKILL
    assert tree.proc.returncode == -signal.SIGKILL
    assert not [p for p in members if _alive(p.pid, p.start)]
    assert tree_memory(tree.pid) is None
    assert not scratch.exists()  # what the tree wrote in its TMPDIR went with it


def test_the_sentinel_stops_the_tree_and_removes_its_scratch_when_the_owner_dies(
        tmp_path: Path) -> None:
    """An owner that dies without stopping its tree (SIGKILL, here os._exit): the sentinel
    stops the tree, SIGKILL after the grace period for a process that ignores SIGTERM, then
    removes the scratch directory the tree wrote into."""
    sleeper = ("import os, signal, tempfile, time\n"
               "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
               "tempfile.mkstemp(dir=os.environ['TMPDIR'])\n"
               "time.sleep(60)\n")
    owner = ("import os, sys, time\n"
             "from fuzzmmu.campaign.processes import ProcessTree\n"
             "tree = ProcessTree([sys.executable, '-c', sys.argv[1]], grace=1.0, scratch=True)\n"
             "while not os.listdir(tree.scratch):\n"
             "    time.sleep(0.05)\n"
             "print(tree.pid, tree.scratch, flush=True)\n"
             "os._exit(0)\n")
    out = subprocess.run([sys.executable, "-c", owner, sleeper], capture_output=True, text=True,
                         timeout=30, check=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    pid_text, scratch_text = out.stdout.split()
    pid, scratch = int(pid_text), Path(scratch_text)
    assert scratch.parent == tmp_path
    deadline = time.monotonic() + 10
    while scratch.exists() or ((s := _stat(pid)) is not None and s[1] not in ("Z", "X")):
        assert time.monotonic() < deadline, f"{pid} or {scratch} outlived the owner"
        time.sleep(0.05)


def test_the_parent_death_signal_reaches_the_child() -> None:
    if parent_death_signal() is None:
        pytest.skip("no prctl(PR_SET_PDEATHSIG) here")
    # A middle process starts a sleeper with the parent-death signal, prints its pid and dies.
    middle = ("import subprocess, sys\n"
              "from fuzzmmu.campaign.processes import parent_death_signal\n"
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],\n"
              "                     preexec_fn=parent_death_signal())\n"
              "print(p.pid, flush=True)\n")
    out = subprocess.run([sys.executable, "-c", middle], capture_output=True, text=True,
                         timeout=30, check=True)
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 5
    while (s := _stat(pid)) is not None and s[1] not in ("Z", "X"):
        assert time.monotonic() < deadline, f"{pid} outlived its parent"
        time.sleep(0.05)


def test_sidecars_are_written_whole_or_not_at_all(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from fuzzmmu.campaign.triage import load_crash, write_sidecar

    crash_file = tmp_path / "crash-0"
    crash_file.write_bytes(encode(read_program(REPRO / "cr0wp-not-in-role.txt")))
    crash = load_crash(crash_file, ("cr0wp-not-in-role",))
    write_sidecar(crash, 1.0)
    side = tmp_path / "crash-0.json"
    before = side.read_text()

    def interrupted(src: str, dst: str) -> None:  # stopped between writing and renaming
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_sidecar(crash, 2.0)
    assert side.read_text() == before  # the old sidecar, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crash-0", "crash-0.json",
                                                          "crash-0.txt"]
