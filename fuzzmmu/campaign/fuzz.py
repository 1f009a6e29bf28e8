"""`fuzzmmu fuzz`: a campaign around libFuzzer, with a live dashboard.

The inputs run on the model (the default) or on this machine's real KVM (``target="kvm"``:
each input as the host can run it, fuzzmmu.kvm.support.host_program); the crash files replay
on the target that found them. Divergences whose signature the suppression file lists are
recorded by the target (one line each in ``suppressed.log`` beside the statistics) and the
campaign goes on past them.

libFuzzer (through the Atheris target in harnesses/) owns scheduling, corpus management and
forking: ``--jobs N`` (or ``--keep-going``) runs it in fork mode. This driver prepares the
corpus (seeded from corpus/ when empty, resumed otherwise), starts the target, reads its status
lines, replays each new crash file to sign and classify it (writing ``.txt``/``.json`` beside
it), shows the dashboard, appends a JSON line of statistics every second (with the resident
memory of libFuzzer's whole process tree), and stops at ``--max-time``, at the first divergence
unless ``--keep-going``, or on SIGINT (Ctrl-C), SIGTERM or SIGHUP sent to it alone: libFuzzer
runs in a process group of its own (fuzzmmu.campaign.processes), which is stopped as a whole
before the last crash files are signed, so every crash file gets its sidecars.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from fuzzmmu.campaign.corpus import HARNESS, SEEDS, binary_seeds, corpus_stats
from fuzzmmu.campaign.feedback import read_census
from fuzzmmu.campaign.processes import STOP_SIGNALS, ProcessTree, handling
from fuzzmmu.campaign.settings import ENV_SUPPRESS, Feedback, TargetSettings
from fuzzmmu.campaign.triage import Crash, is_crash_file, load_crash, write_sidecar
from fuzzmmu.program.codec import HEADER_SIZE, MAX_OPS, RECORD_SIZE
from fuzzmmu.program.ops import Program

MAX_LEN = HEADER_SIZE + RECORD_SIZE * MAX_OPS
DICTIONARY = HARNESS.with_suffix(".dict")

# libFuzzer status lines, in-process ("#123 NEW cov: ...") and fork mode ("#123: cov: ...").
_STATUS = re.compile(
    r"#(?P<execs>\d+):?\s+(?:\w+\s+)?cov: (?P<cov>\d+) ft: (?P<ft>\d+) corp: (?P<corp>\d+)"
    r"(?:/\S+)?(?: lim: \d+)? exec/s:? (?P<rate>\d+)(?: rss: (?P<rss>\d+)Mb)?"
    r"(?: oom/timeout/crash: (?P<oom>\d+)/(?P<timeout>\d+)/(?P<crash>\d+))?")

@dataclass
class CampaignConfig:
    bugs: tuple[str, ...] = ()
    max_time: int | None = None
    jobs: int = 1
    corpus: Path = Path(".fuzzmmu/corpus")
    crashes: Path = Path("crashes")
    seed: int | None = None
    keep_going: bool = False
    libfuzzer_args: tuple[str, ...] = ()
    audit: bool = False
    byte_share: float = 0.2
    feedback: Feedback = Feedback.LINES
    stats: Path = Path(".fuzzmmu/stats.jsonl")
    seeds: Path = SEEDS
    dashboard: bool = True
    target: str = "model"  # or "kvm": this machine's /dev/kvm (fuzzmmu.campaign.settings)
    suppress: Path | None = None  # a file of divergence signatures to record and go on from
    native: bool = False  # the target processes run the compiled model (fuzzmmu.native)


@dataclass
class Stats:
    started: float = field(default_factory=time.monotonic)
    execs: int = 0
    cov: int = 0
    ft: int = 0
    corpus: int = 0
    rate: int = 0
    rss: int = 0  # libFuzzer's own figure: its peak, of its process alone (none in fork mode)
    tree_rss: float | None = None  # MB resident in libFuzzer's process tree, when last measured
    processes: int = 0  # in that tree
    first_divergence: float | None = None
    suppressed: int = 0  # divergences the target recorded instead of raising
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=6))

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def update(self, line: str) -> None:
        m = _STATUS.search(line)
        if m is None:
            return
        self.execs = int(m["execs"])
        self.cov, self.ft, self.corpus = int(m["cov"]), int(m["ft"]), int(m["corp"])
        self.rate = int(m["rate"])
        if m["rss"]:
            self.rss = int(m["rss"])


@dataclass
class CampaignResult:
    stats: Stats
    crashes: list[Crash]
    returncode: int
    interrupted: bool
    stopped_by: str | None = None  # the signal's name
    # libFuzzer ended with an error and no crash file to show for it (it could not start, or
    # died), or with one whose replay shows no divergence (an out-of-memory, a timeout, the
    # target itself failing): what it printed last. A campaign that ran nothing must not read
    # as a clean one, and a crash that is no divergence needs libFuzzer's word on it.
    failure: str | None = None
    unreadable: list[str] = field(default_factory=list)  # crash files that could not be replayed

    @property
    def divergences(self) -> list[Crash]:
        return [c for c in self.crashes if c.divergence is not None]

    @property
    def not_reproduced(self) -> list[Crash]:
        """Crash files whose replay shows no divergence: libFuzzer's own findings (oom-,
        timeout-, slow-unit-) or a crash of the target that the replay did not repeat."""
        return [c for c in self.crashes if c.divergence is None]

    @property
    def failed(self) -> bool:
        """Something other than a divergence went wrong: a campaign that cannot say it ran
        clean."""
        return self.failure is not None or bool(self.unreadable or self.not_reproduced)


def target_command(cfg: CampaignConfig) -> list[str]:
    cmd = [sys.executable, str(HARNESS), str(cfg.corpus), f"-artifact_prefix={cfg.crashes}/",
           f"-max_len={MAX_LEN}", "-print_final_stats=1"]
    if DICTIONARY.exists():
        cmd.append(f"-dict={DICTIONARY}")
    if cfg.seed is not None:
        cmd.append(f"-seed={cfg.seed}")
    if cfg.max_time:
        cmd.append(f"-max_total_time={cfg.max_time}")
    if cfg.jobs > 1 or cfg.keep_going:
        cmd.append(f"-fork={cfg.jobs}")
        if cfg.keep_going:
            cmd.append("-ignore_crashes=1")
    return cmd + list(cfg.libfuzzer_args)


def target_environment(cfg: CampaignConfig) -> dict[str, str]:
    env = dict(os.environ)
    census = census_dir(cfg) if cfg.feedback.state else None
    env.update(TargetSettings(cfg.bugs, cfg.audit, cfg.byte_share, cfg.feedback, census,
                              cfg.target, suppressed_log=suppressed_log(cfg),
                              native=cfg.native).environment())
    if cfg.suppress is not None:  # the target reads the signatures from the file itself
        env[ENV_SUPPRESS] = str(cfg.suppress.absolute())
    else:
        env.pop(ENV_SUPPRESS, None)  # one set in the caller's environment is not this campaign's
    # Fork mode re-executes the target by its path: its shebang must find this Python.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def census_dir(cfg: CampaignConfig) -> Path:
    """Where the target processes count their state features (fuzzmmu.campaign.feedback)."""
    return cfg.stats.parent / "census"


def suppressed_log(cfg: CampaignConfig) -> Path:
    """Where the target processes append the signature of each suppressed divergence."""
    return cfg.stats.parent / "suppressed.log"


def prepare(cfg: CampaignConfig) -> int:
    """Create the directories; seed an empty corpus. Returns how many seeds were copied."""
    cfg.corpus.mkdir(parents=True, exist_ok=True)
    cfg.crashes.mkdir(parents=True, exist_ok=True)
    cfg.stats.parent.mkdir(parents=True, exist_ok=True)
    census = census_dir(cfg)
    census.mkdir(exist_ok=True)
    for old in census.glob("features-*.json"):  # an earlier campaign's counts
        old.unlink(missing_ok=True)
    suppressed_log(cfg).write_bytes(b"")  # so is an earlier campaign's log
    if any(cfg.corpus.iterdir()):
        return 0
    seeds = binary_seeds(cfg.seeds) if cfg.seeds.is_dir() else []
    for s in seeds:
        shutil.copy(s, cfg.corpus / s.name)
    return len(seeds)


class Campaign:
    def __init__(self, cfg: CampaignConfig, console: Console) -> None:
        self.cfg = cfg
        self.console = console
        self.stats = Stats()
        self.crashes: dict[str, Crash] = {}
        self.known: set[str] = set()
        self.ops: Counter[str] = Counter()
        self.modes: Counter[str] = Counter()
        self.corpus_files = 0
        self.state_features: dict[str, int] = {}
        self._next_corpus_scan = 0.0
        self._suppressed_read = 0  # bytes of the suppressed log counted so far
        # The corpus as the target runs it: on real KVM, each program as the host can run it.
        self._adapt: Callable[[Program], Program] | None = None
        if cfg.target == "kvm":
            from fuzzmmu.kvm.support import host_program

            self._adapt = host_program
        self.stop_signal: signal.Signals | None = None
        self._target: ProcessTree | None = None
        self.tail: deque[str] = deque(maxlen=40)  # libFuzzer's last lines, for a failure report
        self.unreadable: list[str] = []

    # -- what happens

    def _read(self, stream: object) -> None:
        for raw in iter(stream.readline, b""):  # type: ignore[attr-defined]
            line = raw.decode("utf-8", "replace").rstrip()
            self.stats.update(line)
            if line:
                self.stats.lines.append(line)
                if not line.startswith("INFO: Instrumenting"):
                    self.tail.append(line)

    def _scan_crashes(self, final: bool = False) -> None:
        for path in sorted(self.cfg.crashes.iterdir()):
            if self.stop_signal is not None and not final:
                return  # stop the process tree first; the final scan signs the rest
            if path.name in self.known or not is_crash_file(path):
                continue
            self.known.add(path.name)
            try:
                crash = load_crash(path, self.cfg.bugs, self.cfg.target)
            except ValueError as exc:
                self.stats.lines.append(f"could not replay {path.name}: {exc}")
                self.unreadable.append(f"{path}: {exc}")
                continue
            found = round(self.stats.elapsed, 2)
            if crash.divergence is not None and self.stats.first_divergence is None:
                self.stats.first_divergence = found
            crash.found_after = found
            write_sidecar(crash, found)
            self.crashes[path.name] = crash

    def _scan_corpus(self) -> None:
        if time.monotonic() < self._next_corpus_scan:
            return
        self._next_corpus_scan = time.monotonic() + 5
        st = corpus_stats(self.cfg.corpus, limit=400, adapt=self._adapt)
        self.ops, self.modes, self.corpus_files = st.ops, st.modes, st.files
        if self.cfg.feedback.state:
            self.state_features = read_census(census_dir(self.cfg))

    def _count_suppressed(self) -> None:
        """Count the suppressed log's new complete lines (one per suppressed divergence); only
        what was added since the last count is read."""
        try:
            with suppressed_log(self.cfg).open("rb") as f:
                f.seek(self._suppressed_read)
                new = f.read()
        except FileNotFoundError:
            return
        complete = new[:new.rfind(b"\n") + 1]  # a line being written is counted next time
        self.stats.suppressed += complete.count(b"\n")
        self._suppressed_read += len(complete)

    def _measure_memory(self) -> None:
        mem = self._target.memory() if self._target is not None else None
        if mem is not None:  # keep the last reading once the tree is gone
            self.stats.tree_rss, self.stats.processes = mem.rss_mb, mem.processes

    def _record(self, out: object) -> None:
        s = self.stats
        sigs = Counter(c.signature for c in self.crashes.values())
        line = {"t": round(s.elapsed, 2), "execs": s.execs, "exec_per_s": s.rate, "cov": s.cov,
                "ft": s.ft, "corpus": s.corpus, "rss_mb": s.rss, "tree_rss_mb": s.tree_rss,
                "processes": s.processes,
                "divergences": sum(1 for c in self.crashes.values() if c.divergence),
                "signatures": dict(sigs), "first_divergence_s": s.first_divergence,
                "suppressed": s.suppressed}
        if self.state_features:
            line["state_features"] = dict(self.state_features)
        out.write(json.dumps(line) + "\n")  # type: ignore[attr-defined]
        out.flush()  # type: ignore[attr-defined]

    # -- the dashboard

    def render(self) -> Group:
        s, cfg = self.stats, self.cfg
        limit = f" / {cfg.max_time}s" if cfg.max_time else ""
        head = Table.grid(padding=(0, 2))
        for _ in range(4):
            head.add_column()
        head.add_row("elapsed", f"{s.elapsed:6.0f}s{limit}", "programs", f"{s.execs:,}")
        head.add_row("programs/s", f"{s.rate:,}", "coverage", f"{s.cov:,} edges, {s.ft:,} "
                     "features")
        memory = "-" if s.tree_rss is None else f"{s.tree_rss:,.0f} MB in {s.processes} " \
                                                 f"process{'es' if s.processes != 1 else ''}"
        head.add_row("corpus", f"{max(s.corpus, self.corpus_files):,} programs", "memory",
                     memory)
        first = "-" if s.first_divergence is None else f"{s.first_divergence:.1f}s"
        head.add_row("jobs", str(cfg.jobs), "first divergence", first)
        if cfg.suppress is not None:
            head.add_row("suppressed", f"{s.suppressed:,} divergences", "signatures from",
                         escape(str(cfg.suppress)))
        if cfg.feedback.state:
            fams = self.state_features
            head.add_row("state features", f"{sum(fams.values()):,}" if fams else "-",
                         "by family", ", ".join(f"{k} {n:,}" for k, n in fams.items() if n)
                         or "-")
        if cfg.target == "kvm":
            title = "target: real KVM (/dev/kvm)"
        else:
            title = (f"target: {'compiled ' if cfg.native else ''}model - bugs: "
                     f"{', '.join(cfg.bugs) or 'none (the clean model)'}")
        top = Panel(head, title=f"fuzzmmu campaign - {escape(title)}", title_align="left")
        div = Table(title="divergences", title_justify="left", expand=True)
        for col in ("kind", "signature", "count", "first at", "smallest file"):
            div.add_column(col, overflow="fold")
        groups: dict[str, list[Crash]] = {}
        for c in self.crashes.values():
            groups.setdefault(c.signature, []).append(c)
        for sig, members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            kind = members[0].divergence.kind.value if members[0].divergence else "-"
            firsts = [m.found_after for m in members if m.found_after is not None]
            small = min(members, key=lambda m: (m.ops, m.path.name))
            div.add_row(kind, escape(sig), str(len(members)),
                        f"{min(firsts):.1f}s" if firsts else "-", small.path.name)
        if not groups:
            div.add_row("-", "none yet", "", "", "")
        ex = Table(title="what the corpus exercises", title_justify="left", expand=True)
        ex.add_column("op kinds (programs)", overflow="fold")
        ex.add_column("guest modes (programs)", overflow="fold")
        ex.add_row(", ".join(f"{k} {n}" for k, n in self.ops.most_common(14)) or "-",
                   ", ".join(f"{k} {n}" for k, n in self.modes.most_common()) or "-")
        log = "\n".join(escape(x[:160]) for x in s.lines)
        return Group(top, div, ex, Panel(log or "starting...", title="libFuzzer",
                                         title_align="left"))

    # -- the run

    def run(self) -> CampaignResult:
        cfg = self.cfg
        copied = prepare(cfg)
        for p in cfg.crashes.iterdir():  # crashes from earlier campaigns are not news
            if is_crash_file(p):
                self.known.add(p.name)
        if copied:
            self.console.print(f"seeded {cfg.corpus} with {copied} programs from {cfg.seeds}")
        with handling(STOP_SIGNALS, self._on_signal):
            return self._run(cfg)

    def _run(self, cfg: CampaignConfig) -> CampaignResult:
        target = ProcessTree(target_command(cfg), env=target_environment(cfg),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, scratch=True)
        self._target = target
        if self.stop_signal is not None:  # it came while libFuzzer was being started
            target.send(signal.SIGTERM)
        reader = threading.Thread(target=self._read, args=(target.proc.stderr,), daemon=True)
        reader.start()
        interrupted = False
        next_record = 0.0
        with cfg.stats.open("a") as out:
            out.write(json.dumps({"campaign": "start", "target": cfg.target,
                                  "bugs": list(cfg.bugs), "jobs": cfg.jobs,
                                  "feedback": cfg.feedback.value,
                                  "compiled_model": cfg.native,
                                  "corpus": str(cfg.corpus), "max_time": cfg.max_time,
                                  "suppress": None if cfg.suppress is None
                                  else str(cfg.suppress)}) + "\n")
            live = Live(self.render(), console=self.console, auto_refresh=False,
                        transient=False) if cfg.dashboard else None
            try:
                if live is not None:
                    live.start()
                while True:
                    if self.stop_signal is not None:
                        interrupted = True
                        break
                    done = target.proc.poll() is not None
                    self._scan_crashes()
                    self._scan_corpus()
                    if time.monotonic() >= next_record or done:
                        if not done:
                            self._measure_memory()
                        self._count_suppressed()
                        self._record(out)
                        next_record = time.monotonic() + 1
                        if live is None:
                            self._progress()
                    if live is not None:
                        live.update(self.render(), refresh=True)
                    if done:
                        break
                    time.sleep(0.25)
            except KeyboardInterrupt:  # where no handler could be installed (not the main thread)
                interrupted = True
            finally:
                # Whatever ended the loop (a signal, libFuzzer exiting, an error here), nothing
                # of the tree may outlive the campaign, and no crash file may appear after the
                # last scan: stop it all first, then sign what is there.
                target.stop()
                target.close()
                reader.join(timeout=5)
                self._scan_crashes(final=True)
                self._count_suppressed()
                self._record(out)
                if live is not None:
                    live.update(self.render(), refresh=True)
                    live.stop()
        code = target.proc.returncode or 0
        failure = None
        unexplained = any(c.divergence is None for c in self.crashes.values())
        if code and not interrupted and not self.unreadable and (
                unexplained or not self.crashes):
            what = ("a crash file that replays without a divergence" if self.crashes
                    else "no crash file")
            failure = (f"libFuzzer exited with code {code} after {self.stats.execs:,} programs "
                       f"and left {what}; its last lines:\n" + "\n".join(self.tail))
        return CampaignResult(self.stats, list(self.crashes.values()), code, interrupted,
                              self.stop_signal.name if self.stop_signal is not None else None,
                              failure, list(self.unreadable))

    def _on_signal(self, signum: int, frame: object) -> None:
        """A stop signal becomes an orderly stop, not an exception raised wherever the main
        thread happens to be (half-way through signing a crash file, say). libFuzzer's group is
        told at once, so that it stops even while this process is busy; the loop then waits
        for it. A second signal means: do not wait."""
        if self.stop_signal is None:
            self.stop_signal = signal.Signals(signum)
            if self._target is not None:
                # SIGTERM whatever came: every libFuzzer process handles it (SIGHUP would leave
                # fork mode's temporary directory behind; SIGINT is ignored by fork mode's
                # parent while it waits for a job).
                self._target.send(signal.SIGTERM)
        elif self._target is not None:
            self._target.send(signal.SIGKILL)

    def _progress(self) -> None:
        s = self.stats
        self.console.print(f"[{s.elapsed:5.0f}s] {self.cfg.target}: programs {s.execs} "
                           f"({s.rate}/s) cov {s.cov} ft {s.ft} corpus {s.corpus} divergences "
                           f"{sum(1 for c in self.crashes.values() if c.divergence)}"
                           + (f" suppressed {s.suppressed}"
                              if self.cfg.suppress is not None else "")
                           + (f" state features {sum(self.state_features.values())}"
                              if self.state_features else ""), highlight=False)


def summary(console: Console, result: CampaignResult) -> None:
    s = result.stats
    how = "finished"
    if result.interrupted:
        how = f"stopped by {result.stopped_by}" if result.stopped_by else "stopped"
    console.print(f"{how} after {s.elapsed:.0f}s: "
                  f"{s.execs:,} programs ({s.rate}/s at the end), coverage {s.cov} edges, "
                  f"corpus {s.corpus}", highlight=False)
    if s.suppressed:
        console.print(f"{s.suppressed:,} divergence(s) with a suppressed signature recorded and "
                      "passed over", highlight=False)
    for bad in result.unreadable:
        console.print(f"[red]could not replay[/] {escape(bad)}", highlight=False)
    if result.failure is not None:
        console.print(f"[red]the fuzz target failed:[/] {escape(result.failure)}",
                      highlight=False)
    for c in sorted(result.not_reproduced, key=lambda c: c.path.name):
        console.print(f"[red]a crash file that replays without a divergence[/] {c.path}",
                      highlight=False)
    divs = result.divergences
    if not divs:
        if not result.failed:
            console.print("[green]no divergence[/]")
        return
    first = min(divs, key=lambda c: (c.found_after or 0.0, c.path.name))
    console.print(f"[red]{len(divs)} divergent program(s)[/]; first after "
                  f"{s.first_divergence:.1f}s: {first.path}", highlight=False)
    for c in sorted(divs, key=lambda c: c.path.name):
        console.print(f"  {c.path}  {escape(c.signature)}", highlight=False)
