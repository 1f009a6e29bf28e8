#!/usr/bin/env python3
"""Same outcomes across an executor change: record what every program of a fixed sample does,
clean and under mutants, and compare two recordings.

    python bench/outcomes.py inputs N -o inputs.hex [--seed S]   # the sample (campaign-like)
    python bench/outcomes.py run inputs.hex -o out.jsonl [--bugs all|ID,...] [--shuffle S]
    python bench/outcomes.py compare old.jsonl new.jsonl

``inputs`` writes N inputs as hex lines: a third uniformly random bytes (as the random
engine draws them), two thirds chains of op-level mutations of the shipped corpus (what a
campaign runs). ``run`` runs each input clean and, with ``--bugs all``, under one mutant of
the catalog picked by the input's line number (every mutant sees the same number of inputs);
each line records the outcome: divergence or not, kind, op index and signature. Run it with
another checkout on PYTHONPATH to record that version. ``--shuffle`` runs the inputs in a
shuffled order (the records are written in input order): outcomes must not depend on what
ran before in the process.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from fuzzmmu.campaign.harness import mutate
from fuzzmmu.oracle.executor import run
from fuzzmmu.program.codec import HEADER_SIZE, MAX_OPS, RECORD_SIZE, decode

try:
    from fuzzmmu.model.bugs import CATALOG
except ImportError:  # a checkout from before the model moved to fuzzmmu.model
    from fuzzmmu.shadow.bugs import CATALOG  # type: ignore[no-redef]

MAX_LEN = HEADER_SIZE + RECORD_SIZE * MAX_OPS
CORPUS = Path(__file__).resolve().parent.parent / "corpus"


def make_inputs(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    seeds = [p.read_bytes() for p in sorted(CORPUS.iterdir()) if p.suffix == ""]
    pool = list(seeds)
    out = []
    for _ in range(n):
        if rng.random() < 1 / 3:
            data = rng.randbytes(rng.randint(0, MAX_LEN))
        else:
            data = mutate(rng.choice(pool), MAX_LEN, rng.getrandbits(32))
            if len(pool) < 4000:
                pool.append(data)
            else:
                pool[rng.randrange(len(seeds), len(pool))] = data
        out.append(data)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("inputs")
    a.add_argument("n", type=int)
    a.add_argument("-o", required=True)
    a.add_argument("--seed", type=int, default=1)
    b = sub.add_parser("run")
    b.add_argument("inputs")
    b.add_argument("-o", required=True)
    b.add_argument("--bugs", default="", help="'all': one mutant per input, in turn")
    b.add_argument("--mutants", default="", help="with --bugs all: the mutants to take turns "
                   "(default: every available one; give the same list to both checkouts)")
    b.add_argument("--shuffle", type=int, default=None)
    c = sub.add_parser("compare")
    c.add_argument("old")
    c.add_argument("new")
    args = ap.parse_args()

    if args.cmd == "inputs":
        data = make_inputs(args.n, args.seed)
        Path(args.o).write_text("".join(d.hex() + "\n" for d in data))
        return 0
    if args.cmd == "run":
        inputs = [bytes.fromhex(line) for line in Path(args.inputs).read_text().splitlines()]
        mutants = ([m for m in args.mutants.split(",") if m] if args.mutants
                   else [b.id for b in CATALOG if b.available])
        order = list(range(len(inputs)))
        if args.shuffle is not None:
            random.Random(args.shuffle).shuffle(order)
        records: list[str] = [""] * len(inputs)
        start = time.perf_counter()
        steps = 0
        for i in order:
            if args.bugs == "all":
                bugs: tuple[str, ...] = (mutants[i % len(mutants)],)
            else:
                bugs = tuple(x for x in args.bugs.split(",") if x)
            out = run(decode(inputs[i]), bugs)
            steps += out.steps_run
            d = out.divergence
            records[i] = json.dumps([i, list(bugs), None if d is None else
                                     [d.kind.value, d.op_index, d.signature]])
        took = time.perf_counter() - start
        Path(args.o).write_text("".join(r + "\n" for r in records))
        print(f"{len(inputs)} programs in {took:.1f} s: {len(inputs) / took:.0f} programs/s, "
              f"{steps / took:.0f} steps/s", file=sys.stderr)
        return 0
    old = Path(args.old).read_text().splitlines()
    new = Path(args.new).read_text().splitlines()
    if len(old) != len(new):
        print(f"different lengths: {len(old)} vs {len(new)}")
        return 1
    diffs = [(o, n) for o, n in zip(old, new, strict=True) if o != n]
    divs = sum(1 for line in old if not line.endswith("null]"))
    print(f"{len(old)} outcomes ({divs} divergences), {len(diffs)} differ")
    for o, n in diffs[:20]:
        print(f"  old {o}\n  new {n}")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
