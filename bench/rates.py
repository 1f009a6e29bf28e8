#!/usr/bin/env python3
"""How often programs of one distribution reproduce each mutant: the same N programs run
under every mutant of the catalog (or those named), without feedback or mutation.

    python bench/rates.py DIST N [--seed S] [--bugs ID,...] > rates.jsonl

DIST is ``uniform`` (uniformly random bytes, as the random engine draws them), ``swarm``
(the generator from a random swarm, as a campaign's fresh programs are drawn) or ``omit``
(the same swarms with every kept kind at the generator's own weight: omission alone). One
JSON line per mutant: programs that diverged, and the index of the first. Run it with
another checkout on PYTHONPATH to measure that version.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable

from fuzzmmu import native

native.activate()  # before the modules it compiles are imported

from fuzzmmu.bench.engines import MAX_LEN  # noqa: E402
from fuzzmmu.campaign.harness import random_swarm  # noqa: E402
from fuzzmmu.model.bugs import CATALOG  # noqa: E402
from fuzzmmu.oracle.executor import run  # noqa: E402
from fuzzmmu.program.codec import decode  # noqa: E402
from fuzzmmu.program.generate import Generator  # noqa: E402
from fuzzmmu.program.ops import Program  # noqa: E402


def _uniform(rng: random.Random) -> Program:
    return decode(rng.randbytes(rng.randint(0, MAX_LEN)))


def _swarm(rng: random.Random) -> Program:
    return Generator(rng, kinds=random_swarm(rng)).program(rng.randint(2, 24))


def _omit(rng: random.Random) -> Program:
    return Generator(rng, kinds=frozenset(random_swarm(rng))).program(rng.randint(2, 24))


DISTRIBUTIONS: dict[str, Callable[[random.Random], Program]] = {
    "uniform": _uniform, "swarm": _swarm, "omit": _omit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dist", choices=sorted(DISTRIBUTIONS))
    parser.add_argument("n", type=int)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--bugs", help="comma-separated mutant ids (default: the catalog)")
    args = parser.parse_args()
    bugs = args.bugs.split(",") if args.bugs else [b.id for b in CATALOG if b.available]
    rng = random.Random(args.seed)
    draw = DISTRIBUTIONS[args.dist]
    programs = [draw(rng) for _ in range(args.n)]
    for bug in bugs:
        start = time.monotonic()
        hits = [i for i, p in enumerate(programs) if run(p, [bug]).divergence is not None]
        print(json.dumps({"dist": args.dist, "bug": bug, "n": args.n, "hits": len(hits),
                          "first": hits[0] if hits else None,
                          "seconds": round(time.monotonic() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
