"""Crash files: what each one is (replayed, not trusted), and groups by divergence signature.

A crash file is the program's binary form as libFuzzer wrote it (``crash-<sha1>``). Beside it
the campaign writes ``<name>.txt`` (the text form) and ``<name>.json`` (the target it ran on,
the bugs that were on, the divergence, when it was found). The sidecar is data: parsed as JSON
and checked, never executed; a missing or unreadable sidecar only means the bugs must be given.
A sidecar without a target (written before real KVM could be fuzzed) is the model's.

A crash file found on real KVM replays there, as the campaign ran it: the program as this host
runs it (fuzzmmu.kvm.support.host_program), so its ``.txt`` is what diverged.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fuzzmmu.campaign.settings import TARGETS
from fuzzmmu.model.bugs import BugSet
from fuzzmmu.oracle.divergence import Divergence
from fuzzmmu.oracle.executor import MODEL, Target, run
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
    target: str = "model"  # what it replays on: "model" or "kvm" (fuzzmmu.campaign.settings)

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
    if doc.get("target", "model") not in TARGETS:
        raise CrashFileError(f"{side}: 'target' must be one of {', '.join(TARGETS)}")
    return doc


def executor_target(name: str) -> Target:
    """The executor's machine under test for a target name. The KVM target is imported only
    when asked for: replaying model crashes never loads it."""
    if name == "kvm":
        try:
            from fuzzmmu.kvm.target import KVM
        except ImportError as exc:  # iced-x86 missing, say
            raise CrashFileError(f"cannot import the KVM target: {exc}") from exc
        return KVM
    if name != "model":
        raise CrashFileError(f"unknown target {name!r} (one of {', '.join(TARGETS)})")
    return MODEL


def load_crash(path: Path, bugs: tuple[str, ...] | None = None,
               target: str | None = None) -> Crash:
    """Replay a crash file. ``bugs`` overrides the sidecar's, ``target`` the sidecar's target
    (without either: "model"). On real KVM the program is the one the host runs, and a host
    that cannot run the KVM target is a CrashFileError saying why."""
    try:
        program = read_program(path)
    except ProgramFileError as exc:
        raise CrashFileError(str(exc)) from exc
    side = read_sidecar(path)
    chosen = tuple(bugs) if bugs is not None else tuple(side.get("bugs", ()))
    BugSet(chosen)  # an unknown id is a clear error
    on = target if target is not None else str(side.get("target", "model"))
    if on == "kvm":
        if chosen:
            raise CrashFileError(f"{path}: bugs {list(chosen)} are mutants of the model; real "
                                 "KVM runs its own code")
        program, divergence = _replay_on_kvm(path, program)
    else:
        divergence = run(program, chosen, target=executor_target(on)).divergence
    found = side.get("found_after_s")
    return Crash(path, program, chosen, divergence,
                 float(found) if isinstance(found, (int, float)) else None, on)


def _replay_on_kvm(path: Path, program: Program) -> tuple[Program, Divergence | None]:
    """The program as the campaign ran it on this host, and its divergence there."""
    kvm = executor_target("kvm")
    from fuzzmmu.kvm.device import KvmError
    from fuzzmmu.kvm.support import host_program

    program = host_program(program)
    try:
        return program, run(program, target=kvm).divergence
    except KvmError as exc:
        raise CrashFileError(f"{path}: the KVM target cannot run on this host: {exc}") from exc


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
    doc = {"target": crash.target, "bugs": list(crash.bugs), "found_after_s": found_after,
           "ops": crash.ops, "divergence": None if d is None else d.to_json()}
    write_atomically(crash.path.with_name(crash.path.name + ".txt"),
                     format_program(crash.program))
    write_atomically(crash.path.with_name(crash.path.name + ".json"),
                     json.dumps(doc, indent=1) + "\n")


@dataclass
class Group:
    signature: str
    kind: str
    members: list[Crash] = field(default_factory=list)
    target: str = "model"  # a signature on the model and on real KVM are two findings

    @property
    def smallest(self) -> Crash:
        return min(self.members, key=lambda c: (c.ops, c.path.name))


def triage(directory: Path, bugs: tuple[str, ...] | None = None,
           target: str | None = None) -> tuple[list[Group], list[str]]:
    """Groups of crash files by signature (largest first), and the files that could not be
    used, with why. Each file replays on its sidecar's target unless ``target`` says."""
    groups: dict[tuple[str, str], Group] = {}
    errors = []
    for path in sorted(p for p in directory.iterdir() if is_crash_file(p)):
        try:
            crash = load_crash(path, bugs, target)
        except (CrashFileError, ValueError) as exc:
            errors.append(f"{path.name}: {exc}")
            continue
        kind = crash.divergence.kind.value if crash.divergence else "-"
        key = (crash.target, crash.signature)
        groups.setdefault(key, Group(crash.signature, kind, target=crash.target)
                          ).members.append(crash)
    ordered = sorted(groups.values(), key=lambda g: (-len(g.members), g.target, g.signature))
    return ordered, errors
