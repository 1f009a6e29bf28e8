#!/usr/bin/env python3
"""Throughput of two checkouts side by side: the campaign harness under libFuzzer and the
uninstrumented executor, each pair run at the same time on the same machine.

    python bench/throughput.py OLD_CHECKOUT NEW_CHECKOUT [--seconds 60] [--programs 3000]
                               [--feedback lines,state] [--native]

For the harness: each checkout's harnesses/shadow_mmu_fuzzer.py under libFuzzer for
``--seconds`` from a copy of the same seed corpus (NEW_CHECKOUT/corpus) with the same seed,
``-print_final_stats=1``; programs/s is libFuzzer's average (over the time it ran: a run that
stops at a divergence says so and keeps its directory). For a
NEW feedback other than ``lines`` (FUZZMMU_FEEDBACK), the new harness runs once more beside
the old one. Uninstrumented: the same ``--programs`` programs (campaign-like mutants of the
seed corpus, bench/outcomes.py's sample) through ``run()``, in CPU seconds, with steps/s.
With ``--native`` the new checkout runs its compiled model (FUZZMMU_NATIVE=1, built first with
``fuzzmmu compile``) wherever no line of it is watched: the uninstrumented loop and the harness
with state feedback. Both checkouts need the same Python environment (this interpreter's).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_RATE = re.compile(r"stat::average_exec_per_sec:\s+(\d+)")
_UNITS = re.compile(r"stat::number_of_executed_units:\s+(\d+)")
_LOOP = """
import sys, time
from pathlib import Path
from fuzzmmu.oracle.executor import run
from fuzzmmu.program.codec import decode
programs = [decode(bytes.fromhex(x)) for x in Path(sys.argv[1]).read_text().splitlines()]
start = time.process_time()
steps = sum(run(p).steps_run for p in programs)
took = time.process_time() - start
print(f"{len(programs) / took:.1f} {steps / took:.1f}")
"""


def _env(checkout: Path, feedback: str = "lines", native: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUZZMMU_")}
    env["PYTHONPATH"] = str(checkout)
    env["FUZZMMU_FEEDBACK"] = feedback
    if native:
        env["FUZZMMU_NATIVE"] = "1"
    return env


def harness_pair(old: Path, new: Path, seconds: int, feedback: str, seeds: list[Path],
                 native: bool = False) -> tuple[float, float]:
    """Both harnesses at once; their programs/s."""
    procs = []
    for checkout in (old, new):
        work = Path(tempfile.mkdtemp(prefix="fuzzmmu-tp-"))
        (work / "corpus").mkdir()
        for s in seeds:
            shutil.copy(s, work / "corpus" / s.name)
        cmd = [sys.executable, str(checkout / "harnesses" / "shadow_mmu_fuzzer.py"),
               str(work / "corpus"), f"-max_total_time={seconds}", "-print_final_stats=1",
               "-seed=7", "-max_len=516", f"-artifact_prefix={work}/"]
        fb = feedback if checkout == new else "lines"
        # stderr to a file: a pipe read only after the other run ends would fill and stall it
        with (work / "stderr").open("w") as log:
            procs.append((subprocess.Popen(cmd, cwd=work,
                                           env=_env(checkout, fb, native and checkout == new
                                                    and fb == "state"),
                                           stdout=subprocess.DEVNULL, stderr=log), work))
    rates = []
    for proc, work in procs:
        proc.wait(timeout=seconds + 300)
        err = (work / "stderr").read_text()
        rate, units = _RATE.search(err), _UNITS.search(err)
        if rate is None or units is None:
            raise SystemExit(f"no final stats from {work}:\n{err[-2000:]}")
        crashes = [p.name for p in work.iterdir() if p.name.startswith("crash-")]
        if crashes:  # libFuzzer stops at the first divergence: its rate covers less time
            print(f"  ({work}: stopped at a divergence after {units.group(1)} programs: "
                  f"{crashes[0]})")
        else:
            shutil.rmtree(work, ignore_errors=True)
        rates.append(float(rate.group(1)))
    return rates[0], rates[1]


def loop_pair(old: Path, new: Path, sample: Path, native: bool = False
              ) -> list[tuple[float, float]]:
    procs = [subprocess.Popen([sys.executable, "-c", _LOOP, str(sample)],
                              env=_env(c, native=native and c == new),
                              cwd=tempfile.gettempdir(), stdout=subprocess.PIPE, text=True)
             for c in (old, new)]
    out = []
    for p in procs:
        text, _ = p.communicate(timeout=3600)
        rate, steps = text.split()
        out.append((float(rate), float(steps)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--programs", type=int, default=3000)
    ap.add_argument("--feedback", default="lines", help="comma-separated FUZZMMU_FEEDBACK "
                    "values for the new harness")
    ap.add_argument("--native", action="store_true",
                    help="the new checkout runs its compiled model where no line is watched")
    args = ap.parse_args()
    old, new = args.old.resolve(), args.new.resolve()
    seeds = sorted(p for p in (new / "corpus").iterdir() if p.suffix == "")
    sample_dir = Path(tempfile.mkdtemp(prefix="fuzzmmu-tp-"))
    try:
        sample = sample_dir / "inputs.hex"
        subprocess.run([sys.executable, str(new / "bench" / "outcomes.py"), "inputs",
                        str(args.programs), "-o", str(sample)], env=_env(new), check=True)
        (o_rate, o_steps), (n_rate, n_steps) = loop_pair(old, new, sample, args.native)
    finally:
        shutil.rmtree(sample_dir, ignore_errors=True)
    print(f"uninstrumented run(), {args.programs} programs (CPU time, side by side):")
    print(f"  old {o_rate:8.1f} programs/s {o_steps:9.1f} steps/s")
    print(f"  new {n_rate:8.1f} programs/s {n_steps:9.1f} steps/s   ({n_rate / o_rate:.2f}x)")
    for feedback in args.feedback.split(","):
        o, n = harness_pair(old, new, args.seconds, feedback, seeds, args.native)
        print(f"harness under libFuzzer, {args.seconds} s side by side, new with "
              f"FUZZMMU_FEEDBACK={feedback}:")
        print(f"  old {o:8.1f} programs/s\n  new {n:8.1f} programs/s   ({n / o:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
