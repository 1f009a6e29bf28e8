"""Process trees that do not outlive the campaign that started them.

libFuzzer's fork mode (``--jobs N``) starts its jobs with ``system()``: ``sh -c`` and a fresh
interpreter per job, children of libFuzzer and in its process group. Signalling libFuzzer alone
does not stop them: on SIGTERM it exits at once and its jobs carry on as orphans; SIGINT is
ignored by a process waiting in ``system()``. So the target runs in a session (and process
group) of its own and is always stopped as a group: SIGTERM (which every libFuzzer process
handles: final statistics, fork mode's temporary directory removed), a bounded wait, then
SIGKILL. In case the campaign process itself dies without stopping it (SIGKILL, a crash):

- libFuzzer gets SIGTERM from the kernel (``PR_SET_PDEATHSIG``, Linux);
- a small sentinel process, in a session of its own, holds the read end of a pipe that only the
  campaign process writes to; end of file without a word means the campaign is gone, and the
  sentinel stops the group the same way (what the parent-death signal cannot reach: fork
  mode's jobs, whose parent is a shell that does not die with libFuzzer).

libFuzzer's fork mode keeps its jobs' corpora and logs in a temporary directory. It removes it on
SIGTERM, not on SIGHUP or SIGKILL, and even on SIGTERM a job still writing into it can leave it
behind. So a tree may get a scratch directory of its own as ``TMPDIR``, removed once the tree is
gone: by ``close()``, or by the sentinel when the campaign died.

The tree of a process is read from ``/proc`` (each process's parent in ``/proc/PID/stat``), as
is its resident memory (``VmRSS`` in ``/proc/PID/status``); where there is no ``/proc`` those
readings are empty and the group is still stopped through its process group.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

PROC = Path("/proc")
# What stops a campaign started from a terminal (SIGINT, SIGHUP), by `timeout`, systemd, a batch
# scheduler or CI (SIGTERM).
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP")
                     if hasattr(signal, n))
# How long a stopped group gets to exit on SIGTERM before SIGKILL. libFuzzer exits within a
# fraction of a second (its handler calls _Exit); this only bounds a process that is stuck.
GRACE_S = 5.0

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    state: str
    start: int  # start time in clock ticks after boot: a reused pid has another one

    @property
    def zombie(self) -> bool:
        return self.state in ("Z", "X")


def proc_info(pid: int) -> ProcInfo | None:
    """``/proc/PID/stat`` parsed, or None when there is no such process (or no /proc)."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (OSError, ValueError):
        return None
    # Field 2 (the command name) is in parentheses and may itself hold spaces or parentheses:
    # the fixed fields start after the last ')'.
    fields = text.rpartition(")")[2].split()
    try:
        return ProcInfo(pid, int(fields[1]), int(fields[2]), fields[0], int(fields[19]))
    except (IndexError, ValueError):
        return None


def process_table() -> dict[int, ProcInfo]:
    """Every process ``/proc`` shows (threads are not listed there, only processes)."""
    try:
        names = os.listdir(PROC)
    except OSError:
        return {}
    table = {}
    for name in names:
        if name.isdigit():
            info = proc_info(int(name))
            if info is not None:
                table[info.pid] = info
    return table


def descendants(root: int, table: Mapping[int, ProcInfo] | None = None) -> list[ProcInfo]:
    """``root`` and every process below it, by parent links; empty when ``root`` is gone."""
    table = process_table() if table is None else table
    if root not in table:
        return []
    children: dict[int, list[int]] = {}
    for p in table.values():
        children.setdefault(p.ppid, []).append(p.pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(table[pid])
        todo += (c for c in children.get(pid, ()) if c in table and c != pid)
    return out


def alive(p: ProcInfo) -> bool:
    """Still running: the same process (same start time), not a zombie waiting to be reaped."""
    now = proc_info(p.pid)
    return now is not None and now.start == p.start and not now.zombie


def rss_kb(pid: int) -> int:
    """``VmRSS`` of a process in kB; 0 for a zombie, a process gone, or no /proc."""
    try:
        with (PROC / str(pid) / "status").open() as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclass(frozen=True)
class TreeMemory:
    rss_mb: float  # the sum of the processes' resident sets (shared pages count in each)
    processes: int


def tree_memory(root: int) -> TreeMemory | None:
    """Resident memory of ``root`` and its descendants; None when nothing of it is running."""
    members = [p for p in descendants(root) if not p.zombie]
    if not members:
        return None
    return TreeMemory(round(sum(rss_kb(p.pid) for p in members) / 1024, 1), len(members))


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    # prctl(2) takes unsigned longs after the option: without argtypes ctypes would pass C ints.
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                      ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


# Resolved here, once: the preexec function runs between fork and exec, where loading a library
# (which takes the dynamic loader's lock, perhaps held by another thread at the fork) must not
# happen.
_PRCTL = _load_prctl()


def parent_death_signal(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive ``sig`` when the thread that starts it
    exits (Linux; None elsewhere). The thread, not the process: start the child from a thread
    that outlives it (the main thread, or the one that waits for it)."""
    if _PRCTL is None:
        return None
    prctl, parent, number = _PRCTL, os.getpid(), int(sig)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, number, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the prctl: nobody would signal
            os._exit(1)

    return preexec


# Waits for end of file on stdin. A word first ("done") means the campaign stopped the group
# itself; end of file alone means the campaign died: stop the group as the campaign would have,
# then remove the tree's scratch directory (an empty argument: none).
# Zombies do not count as running (orphans wait for init to reap them, which may take a while).
_SENTINEL = """\
import os, shutil, signal, sys, time
pgid, grace, scratch = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
if sys.stdin.buffer.read():
    sys.exit(0)
def send(sig):
    try:
        os.killpg(pgid, sig)
        return True
    except OSError:
        return False
def running():
    try:
        names = os.listdir("/proc")
    except OSError:
        return send(0)
    for name in filter(str.isdigit, names):
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                return True
        except (OSError, ValueError, IndexError):
            continue
    return False
def wait():
    end = time.monotonic() + grace
    while time.monotonic() < end and running():
        time.sleep(0.1)
    return not running()
if send(signal.SIGTERM) and not wait():
    send(signal.SIGKILL)
    wait()
if scratch:
    shutil.rmtree(scratch, ignore_errors=True)
"""


class ProcessTree:
    """A command started in a session of its own, stopped as a whole (see the module doc)."""

    def __init__(self, cmd: list[str], *, env: Mapping[str, str] | None = None,
                 stdout: int | IO[Any] | None = None, stderr: int | IO[Any] | None = None,
                 grace: float = GRACE_S, scratch: bool = False) -> None:
        """``scratch``: the tree gets a fresh directory as ``TMPDIR``, removed with the tree."""
        self.grace = grace
        self.scratch: Path | None = None
        if scratch:
            self.scratch = Path(tempfile.mkdtemp(prefix="fuzzmmu-tree-"))
            env = {**(os.environ if env is None else env), "TMPDIR": str(self.scratch)}
        try:
            self.proc = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=stderr,
                                         start_new_session=True,
                                         preexec_fn=parent_death_signal())
        except BaseException:
            self._remove_scratch()
            raise
        self.pgid = self.proc.pid  # a session leader leads its own process group
        self._stopped = False
        self._sentinel: subprocess.Popen[bytes] | None = None
        self._pipe: int | None = None
        try:
            read, self._pipe = os.pipe()  # not inheritable: only this process holds the end
            try:
                self._sentinel = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", _SENTINEL, str(self.pgid), str(grace),
                     str(self.scratch or "")],
                    stdin=read, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    start_new_session=True)  # a signal for our group must not reach it
            finally:
                os.close(read)
        except BaseException:
            self.stop()
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def members(self) -> list[ProcInfo]:
        """What is running of the tree: the process group, and any descendant that left it."""
        table = process_table()
        found = {p.pid: p for p in table.values() if p.pgid == self.pgid}
        if self.proc.returncode is None:  # once reaped, its pid may be another process's
            found.update((p.pid, p) for p in descendants(self.proc.pid, table))
        return [p for p in found.values() if not p.zombie]

    def send(self, sig: int) -> None:
        """Send ``sig`` to the group. Safe in a signal handler and after the group is gone."""
        if self._stopped:  # an empty group's number may be reused: nothing to send any more
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, sig)

    def memory(self) -> TreeMemory | None:
        return tree_memory(self.proc.pid) if self.proc.poll() is None else None

    def stop(self, sig: int = signal.SIGTERM) -> float:
        """Stop the whole tree: ``sig``, up to ``grace`` seconds, then SIGKILL. Also sweeps up
        what outlived a libFuzzer that exited by itself. Returns the seconds it took."""
        start = time.monotonic()
        snapshot = self.members()
        if snapshot or self.proc.poll() is None:
            self.send(sig)
            for p in snapshot:
                if p.pgid != self.pgid:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(p.pid, sig)
        deadline = start + self.grace
        while True:
            self.proc.poll()  # reap libFuzzer as soon as it exits
            left = [p for p in snapshot if alive(p)] + [p for p in self.members()
                                                        if p.pid not in {q.pid for q in snapshot}]
            if not left:
                break
            if time.monotonic() >= deadline:
                self.send(signal.SIGKILL)
                for p in left:
                    if alive(p):
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.kill(p.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        try:
            self.proc.wait(timeout=self.grace)
        except subprocess.TimeoutExpired:  # only SIGKILL is left, and it was sent
            self.proc.kill()
            self.proc.wait()
        self._stopped = True
        return time.monotonic() - start

    def close(self) -> None:
        """Tell the sentinel the tree was stopped here, and let it go; remove the scratch
        directory. Call after stop()."""
        if self._pipe is not None:
            with contextlib.suppress(OSError):
                os.write(self._pipe, b"done")
            os.close(self._pipe)
            self._pipe = None
        if self._sentinel is not None:
            try:
                self._sentinel.wait(timeout=self.grace)
            except subprocess.TimeoutExpired:
                self._sentinel.kill()
                self._sentinel.wait()
            self._sentinel = None
        self._remove_scratch()

    def _remove_scratch(self) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


@contextlib.contextmanager
def handling(signals: tuple[signal.Signals, ...],
             handler: Callable[[int, object], None]) -> Iterator[None]:
    """``handler`` for ``signals`` inside the block, the previous handlers after it. Only the
    main thread may install handlers: elsewhere (a campaign run from a worker thread) the
    caller's own handling stays, as Ctrl-C's KeyboardInterrupt does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, previous in old.items():
            # None: a handler not installed from Python; the default is the closest to it.
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
