"""One benchmark task in a fresh process: ``python -m fuzzmmu.bench.worker TASK_JSON``.

Tasks: ``{"task": "search", "engine": "random"|"hypothesis", "bugs": [...], "seed": N,
"budget": S}`` and ``{"task": "minimize", "program": TEXT, "bugs": [...], "max_runs": N}``.
The result is one JSON object on stdout's last line. A fresh process per task keeps trials
independent of each other and lets them run side by side, one per core.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from fuzzmmu.bench.engines import Engine, Search, hypothesis_search, random_search
from fuzzmmu.campaign.minimize import minimize
from fuzzmmu.oracle.executor import run
from fuzzmmu.program.ops import Program
from fuzzmmu.program.text import format_program, parse_program

_SEARCHES = {Engine.RANDOM: random_search, Engine.HYPOTHESIS: hypothesis_search}


def search_json(s: Search) -> dict[str, Any]:
    d = s.divergence
    return {"found": s.found, "seconds": round(s.seconds, 3), "programs": s.programs,
            "program": format_program(s.program) if s.program is not None else None,
            "kind": d.kind.value if d is not None else None,
            "signature": d.signature if d is not None else None}


def minimize_json(text: str, bugs: list[str], max_runs: int) -> dict[str, Any]:
    """Minimize and check the result: it still diverges with the same signature, and no single
    op can go (``one_minimal`` means both)."""
    program = parse_program(text)
    start = time.monotonic()
    result = minimize(program, bugs, max_runs=max_runs)
    seconds = time.monotonic() - start
    small = result.program

    def same(p: Program) -> bool:
        d = run(p, bugs).divergence
        return d is not None and d.signature == result.signature

    one_minimal = same(small) and not any(
        same(Program(small.header, small.ops[:i] + small.ops[i + 1:]))
        for i in range(len(small.ops)))
    return {"ops_before": result.ops_before, "ops_after": result.ops_after,
            "runs": result.runs, "seconds": round(seconds, 3), "exhausted": result.exhausted,
            "one_minimal": one_minimal, "program": format_program(small)}


def main(argv: list[str]) -> int:
    task = json.loads(argv[1])
    if task["task"] == "search":
        search = _SEARCHES[Engine(task["engine"])]
        out = search_json(search(task["bugs"], task["seed"], task["budget"]))
    elif task["task"] == "minimize":
        out = minimize_json(task["program"], task["bugs"], task["max_runs"])
    else:
        raise SystemExit(f"unknown task {task['task']!r}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
