"""Crash files: what each one is (replayed, not trusted), and groups by divergence signature.

A crash file is the program's binary form as libFuzzer wrote it (``crash-<sha1>``). Beside it
the campaign writes ``<name>.txt`` (the text form) and ``<name>.json`` (the bugs that were on,
the divergence, when it was found). The sidecar is data: parsed as JSON and checked, never
executed; a missing or unreadable sidecar only means the bugs must be given.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fuzzmmu.model.bugs import BugSet
from fuzzmmu.oracle.divergence import Divergence
from fuzzmmu.oracle.executor import run
from fuzzmmu.program.files import ProgramFileError, read_program
from fuzzmmu.program.ops import Program
from fuzzmmu.program.text import format_program

CRASH_PREFIXES = ("crash-", "leak-", "timeout-", "oom-", "slow-unit-")


class CrashFileError(ValueError):
    """A crash file (or its sidecar) that cannot be used."""


@dataclass
class Crash:
    path: Path
    program: Program
    bugs: tuple[str, ...]
    divergence: Divergence | None
    found_after: float | None = None

    @property
    def ops(self) -> int:
        return len(self.program.ops)

    @property
    def signature(self) -> str:
        return self.divergence.signature if self.divergence else "no divergence on replay"


def is_crash_file(p: Path) -> bool:
    return p.is_file() and p.name.startswith(CRASH_PREFIXES) and p.suffix not in (".txt",
                                                                                  ".json")


def read_sidecar(path: Path) -> dict[str, Any]:
    side = path.with_name(path.name + ".json")
    if not side.exists():
        return {}
    try:
        doc = json.loads(side.read_text())
    except (OSError, ValueError) as exc:
        raise CrashFileError(f"{side}: not a readable JSON sidecar ({exc})") from exc
    if not isinstance(doc, dict):
        raise CrashFileError(f"{side}: a sidecar holds a JSON object")
    bugs = doc.get("bugs", [])
    if not isinstance(bugs, list) or not all(isinstance(b, str) for b in bugs):
        raise CrashFileError(f"{side}: 'bugs' must be a list of bug ids")
    return doc


def load_crash(path: Path, bugs: tuple[str, ...] | None = None) -> Crash:
    """Replay a crash file. ``bugs`` overrides the sidecar's."""
    try:
        program = read_program(path)
    except ProgramFileError as exc:
        raise CrashFileError(str(exc)) from exc
    side = read_sidecar(path)
    chosen = tuple(bugs) if bugs is not None else tuple(side.get("bugs", ()))
    BugSet(chosen)  # an unknown id is a clear error
    outcome = run(program, chosen)
    found = side.get("found_after_s")
    return Crash(path, program, chosen, outcome.divergence,
                 float(found) if isinstance(found, (int, float)) else None)


def write_atomically(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all: a process stopped half-way (a campaign killed, a
    signal) leaves the old file or none, never a truncated one. The temporary file is in the
    same directory (``os.replace`` is atomic only within a file system) and its name, starting
    with a dot, is never taken for a crash file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_sidecar(crash: Crash, found_after: float | None) -> None:
    """Write ``<crash>.txt`` then ``<crash>.json``, each atomically: a ``.json`` present means
    both are complete."""
    d = crash.divergence
    doc = {"bugs": list(crash.bugs), "found_after_s": found_after, "ops": crash.ops,
           "divergence": None if d is None else d.to_json()}
    write_atomically(crash.path.with_name(crash.path.name + ".txt"),
                     format_program(crash.program))
    write_atomically(crash.path.with_name(crash.path.name + ".json"),
                     json.dumps(doc, indent=1) + "\n")


@dataclass
class Group:
    signature: str
    kind: str
    members: list[Crash] = field(default_factory=list)

    @property
    def smallest(self) -> Crash:
        return min(self.members, key=lambda c: (c.ops, c.path.name))


def triage(directory: Path, bugs: tuple[str, ...] | None = None) -> tuple[list[Group], list[str]]:
    """Groups of crash files by signature (largest first), and the files that could not be
    used, with why."""
    groups: dict[str, Group] = {}
    errors = []
    for path in sorted(p for p in directory.iterdir() if is_crash_file(p)):
        try:
            crash = load_crash(path, bugs)
        except (CrashFileError, ValueError) as exc:
            errors.append(f"{path.name}: {exc}")
            continue
        kind = crash.divergence.kind.value if crash.divergence else "-"
        groups.setdefault(crash.signature, Group(crash.signature, kind)).members.append(crash)
    ordered = sorted(groups.values(), key=lambda g: (-len(g.members), g.signature))
    return ordered, errors
