"""The `fuzzmmu` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from fuzzmmu import __version__
from fuzzmmu.campaign.settings import Feedback

if TYPE_CHECKING:  # imported where used: a subcommand loads only what it needs
    from fuzzmmu.campaign.triage import Crash
    from fuzzmmu.program.ops import Program

# A 4-level example: a user read-only page, a user no-execute page and a supervisor 2 MiB page.
DEMO_SPEC = """\
mode 4level
cr3 0x1000
nxe
0x1000 = 0x2027     # PML4E[0] -> PDPT at 0x2000, P|W|U|A
0x2000 = 0x3027     # PDPTE[0] -> PD at 0x3000,   P|W|U|A
0x3000 = 0x4027     # PDE[0]   -> PT at 0x4000,   P|W|U|A
0x3008 = 0x2000a3   # PDE[1]   -> 2 MiB page at 0x200000, P|W|A|PS (supervisor)
0x4008 = 0x5025     # PTE[1]   -> 0x5000, P|U|A (read-only)
0x4010 = 0x8000000000006067  # PTE[2] -> 0x6000, P|W|U|A|D|NX
"""
DEMO_WALKS = (
    (0x1008, "read", True, "user read of a read-only user page"),
    (0x1008, "write", True, "user write to it: protection fault"),
    (0x1008, "write", False, "supervisor write with CR0.WP=1: protection fault"),
    (0x2000, "fetch", True, "user fetch from an NX page"),
    (0x201234, "read", False, "supervisor read in the 2 MiB page"),
    (0x201234, "read", True, "user read of the supervisor 2 MiB page"),
    (0x3000, "read", True, "a not-present PTE"),
)


def _cmd_walk(args: argparse.Namespace, console: Console) -> int:
    from fuzzmmu.arch.walker import Access, NonCanonicalAddress, walk_trace
    from fuzzmmu.ui.tablespec import TableSpec, TableSpecError
    from fuzzmmu.ui.walkview import show_walk, walk_json

    spec = TableSpec()
    try:
        if args.demo:
            spec.parse_text(DEMO_SPEC, "demo")
        if args.file:
            try:
                text = Path(args.file).read_text()
            except OSError as exc:
                raise TableSpecError(f"cannot read {args.file}: {exc.strerror}") from exc
            spec.parse_text(text, args.file)
        for key in ("mode", "cr3", "gva", "access", "maxphyaddr", "pkru", "pages"):
            value = getattr(args, key)
            if value is not None:
                spec.set(key, value, f"--{key}")
        for flag in args.flag:
            spec.set(flag, None, "--flag")
        for entry in args.entry:
            spec.add_entry(entry, "--entry")
        mem, cpu, acc = spec.build()
    except TableSpecError as exc:
        return _fail(str(exc))

    if args.demo and args.gva is None:
        for gva, kind, user, what in DEMO_WALKS:
            console.rule(what)
            show_walk(console, mem, cpu, gva,
                      Access(write=kind == "write", fetch=kind == "fetch", user=user))
        return 0
    set_ad = "set-ad" in spec.flags
    try:
        if args.json:
            res, steps = walk_trace(mem, cpu, spec.gva, acc, set_ad=set_ad)
            print(json.dumps(walk_json(cpu, spec.gva, acc, res, steps)))
        else:
            res = show_walk(console, mem, cpu, spec.gva, acc, set_ad=set_ad)
    except NonCanonicalAddress as exc:
        console.print(f"[red]{exc}[/]")
        return 1
    return 0 if res.ok else 1


def _fail(message: str) -> int:
    """A usage error: the message on stderr, unwrapped so a path or id stays whole; status 2."""
    err = Console(stderr=True, soft_wrap=True, highlight=False)
    err.print(f"[red]error:[/] {escape(message)}")
    return 2


def _bug_error(bugs: Sequence[str]) -> str | None:
    from fuzzmmu.model.bugs import BugSet, UnknownBugError

    try:
        BugSet(bugs)
    except UnknownBugError as exc:
        return str(exc)
    return None


def _cmd_replay(args: argparse.Namespace, console: Console) -> int:
    from fuzzmmu.oracle.executor import run
    from fuzzmmu.program.files import ProgramFileError, read_program
    from fuzzmmu.ui.replayview import capture, replay_json, show_replay

    try:
        program = read_program(args.file)
    except ProgramFileError as exc:
        return _fail(str(exc))
    if args.target == "kvm":
        return _replay_on_kvm(args, console, program)
    if args.target == "all":
        return _replay_three_way(args, console, program)
    problem = _bug_error(args.bug)
    if problem:
        return _fail(problem)
    audit = not args.no_audit
    outcome = run(program, args.bug, audit=audit, trace=args.trace)
    if outcome.divergence is not None and outcome.div_step >= 0 and not args.json:
        # Deterministic: the same run again, looking at both machines before the step.
        outcome = run(program, args.bug, audit=audit, trace=args.trace,
                      explain=(outcome.div_step, capture))
    if args.json:
        print(json.dumps(replay_json(outcome)))
    else:
        show_replay(console, outcome, trace=args.trace)
    return 1 if outcome.divergence is not None else 0


def _replay_on_kvm(args: argparse.Namespace, console: Console, program: Program) -> int:
    """`replay --target kvm`: real KVM instead of the model (fuzzmmu.kvm). Exit 2 when this
    host cannot run it or the program needs what the host cannot do ("skipped")."""
    from fuzzmmu.kvm.device import KvmError
    from fuzzmmu.kvm.target import KVM
    from fuzzmmu.oracle.executor import run
    from fuzzmmu.ui.replayview import replay_json, show_replay

    if args.bug:
        return _fail("--bug enables mutants of the model; --target kvm runs real KVM")
    try:
        outcome = run(program, trace=args.trace, target=KVM)
    except KvmError as exc:
        return _fail(f"the KVM target cannot run on this host: {exc}")
    if args.json:
        print(json.dumps({**replay_json(outcome), "target": "kvm"}))
    elif outcome.skipped:
        err = Console(stderr=True, soft_wrap=True, highlight=False)
        err.print(f"[yellow]skipped:[/] {escape(outcome.skipped)}")
    else:
        show_replay(console, outcome, trace=args.trace, target="kvm")
    if outcome.skipped:
        return 2
    return 1 if outcome.divergence is not None else 0


def _replay_three_way(args: argparse.Namespace, console: Console, program: Program) -> int:
    """`replay --target all`: the reference, the clean model, the model-as-KVM and real KVM
    (fuzzmmu.kvm.verdict). Exit 0 when none departs from the SDM, 1 when one does, 2 when
    real KVM cannot run the program here."""
    from fuzzmmu.kvm.device import KvmError
    from fuzzmmu.kvm.verdict import Verdict, explain, kvm_profile, three_way
    from fuzzmmu.ui.replayview import replay_json

    problem = _bug_error(args.bug)
    if problem:
        return _fail(problem)
    bugs = tuple(args.bug) if args.bug else kvm_profile()
    try:
        t = three_way(program, bugs)
    except KvmError as exc:
        return _fail(f"the KVM target cannot run on this host: {exc}")
    why = explain(t, bugs) if t.verdict is Verdict.KVM_FINDING else ()
    if args.json:
        print(json.dumps({"verdict": t.verdict.value, "model": replay_json(t.clean),
                          "model_as_kvm": replay_json(t.as_kvm), "kvm": replay_json(t.kvm),
                          "explained_by": list(why)}))
    else:
        console.print(f"[bold]program[/] ({len(program.ops)} ops)")
        for name, o in (("model", t.clean), (f"model-as-KVM ({len(bugs)} mutants)", t.as_kvm),
                        ("real KVM", t.kvm)):
            d = o.divergence
            if o.skipped:
                text = f"[yellow]skipped[/]: {escape(o.skipped)}"
            elif d is None:
                text = "[green]agrees with the reference[/]"
            else:
                text = (f"[red]{d.kind.value}[/] at op {d.op_index} ({escape(d.step)}): "
                        f"expected {escape(d.expected)}, got {escape(d.actual)}")
            console.print(f"  {name}: {text}", highlight=False)
        meaning = {
            Verdict.AGREE: "all agree with the SDM",
            Verdict.KVM_FINDING: "real KVM departs from the SDM, as the model-as-KVM predicts"
                                 + (f" ({', '.join(why)})" if why else ""),
            Verdict.KVM_UNPREDICTED: "real KVM departs from the SDM where the model-as-KVM "
                                     "does not (so): a model infidelity",
            Verdict.MODEL_ONLY: "the model-as-KVM departs where real KVM does not: a model "
                                "infidelity",
            Verdict.CLEAN_MODEL_DIVERGES: "the clean model departs from the SDM: a fault of "
                                          "the model or the oracle",
            Verdict.SKIPPED: "real KVM cannot run it here",
        }[t.verdict]
        console.print(f"verdict: [bold]{t.verdict.value}[/]: {escape(meaning)}",
                      highlight=False)
    if t.verdict is Verdict.SKIPPED:
        return 2
    return 0 if t.verdict is Verdict.AGREE else 1


def _cmd_bugs(args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    from fuzzmmu.model.bugs import CATALOG, catalog_markdown

    if args.markdown:
        print(catalog_markdown(), end="")
        return 0
    if args.json:
        print(json.dumps([{"id": b.id, "summary": b.summary, "fix": b.fix, "year": b.year,
                           "seed": b.seed, "needs": list(b.needs), "available": b.available,
                           "pending": b.pending or None}
                          for b in CATALOG], indent=1))
        return 0
    table = Table(title="KVM shadow-MMU bugs the model can re-create (--bug ID)",
                  title_justify="left", show_lines=True)
    for col in ("id", "year", "what the pre-fix code does", "fixed by"):
        table.add_column(col, overflow="fold")
    for b in CATALOG:
        name = b.id + (" [yellow](seed)[/]" if b.seed else "")
        if not b.available:
            name += f"\n[dim]pending: {b.pending}[/]"
        table.add_row(name, b.year, b.summary, b.fix)
    console.print(table)
    return 0


MODEL_CHOICES = ("auto", "compiled", "python")


def _use_native(choice: str, feedback: Feedback, target: str, console: Console
                ) -> tuple[bool, str | None]:
    """Whether the fuzz target runs the compiled model (fuzzmmu.native), building it first if
    need be, and an error for a ``--model compiled`` that cannot be had. ``auto``: compiled
    where no line feedback watches the model and a build can be made, else Python."""
    from fuzzmmu import native

    if choice == "python":
        return False, None
    if feedback.lines or target != "model":
        if choice == "compiled":
            return False, ("--model compiled: the compiled model has no lines for line "
                           "feedback and real KVM runs its own code (use --feedback state)")
        return False, None
    if native.built():
        return True, None
    problem = native.compiler_problem()
    if problem is None:
        console.print("compiling the model with mypyc (once for these sources, about a "
                      "minute; `fuzzmmu compile`)...", highlight=False)
        try:
            result = native.build()
        except native.NativeBuildError as exc:
            problem = str(exc)
        else:
            console.print(f"compiled in {result.seconds:.0f}s: {result.path}", highlight=False)
            return True, None
    if choice == "compiled":
        return False, f"--model compiled: {problem}"
    console.print(f"[yellow]running the Python model:[/] {escape(problem)}", highlight=False)
    return False, None


def _cmd_compile(args: argparse.Namespace, console: Console) -> int:
    from fuzzmmu import native

    if args.check:
        state = "built" if native.built() else "not built"
        console.print(f"compiled model for these sources: {state} ({native.build_dir()})",
                      highlight=False)
        return 0 if native.built() else 1
    problem = native.compiler_problem()
    if problem is not None and not native.built():
        return _fail(f"cannot compile the model here: {problem}")
    console.print("compiling the model, the world, the oracle and the state feedback with mypyc...")
    try:
        result = native.build(log=Path(args.log) if args.log else None)
    except native.NativeBuildError as exc:
        return _fail(str(exc))
    how = "already built" if result.reused else f"built in {result.seconds:.0f}s"
    console.print(f"{how}: {result.path}", highlight=False)
    return 0


def _cmd_fuzz(args: argparse.Namespace, console: Console) -> int:
    from fuzzmmu.campaign.fuzz import Campaign, CampaignConfig, summary
    from fuzzmmu.campaign.settings import SettingsError, read_suppressions, target_problem

    problem = _bug_error(args.bug)
    if problem:
        return _fail(problem)
    if args.jobs < 1:
        return _fail("--jobs must be at least 1")
    if args.max_time is not None and args.max_time < 1:
        return _fail("--max-time must be at least 1 second")
    # State feedback on the compiled model is the measured best on the model (README,
    # Performance); real KVM has no model state to feed back, so its campaigns watch lines.
    feedback = Feedback(args.feedback or ("lines" if args.target == "kvm" else "state"))
    problem = target_problem(args.target, tuple(args.bug), args.audit, feedback)
    if problem:
        return _fail(f"--target {args.target}: {problem}")
    suppress = Path(args.suppress) if args.suppress else None
    if suppress is not None:
        try:
            read_suppressions(suppress)  # the target reads it again; a bad file fails here
        except SettingsError as exc:
            return _fail(str(exc))
    if args.target == "kvm":
        from fuzzmmu.kvm.support import kvm_problem

        problem = kvm_problem()  # before libFuzzer starts: every input would fail
        if problem:
            return _fail(f"--target kvm: real KVM is not usable here: {problem}")
    use_native, problem = _use_native(args.model, feedback, args.target, console)
    if problem:
        return _fail(problem)
    extra = list(args.libfuzzer)
    if extra and extra[0] == "--":
        extra = extra[1:]
    cfg = CampaignConfig(bugs=tuple(args.bug), max_time=args.max_time, jobs=args.jobs,
                         corpus=Path(args.corpus), crashes=Path(args.crashes), seed=args.seed,
                         keep_going=args.keep_going, libfuzzer_args=tuple(extra),
                         audit=args.audit, byte_share=args.byte_share, stats=Path(args.stats),
                         dashboard=not args.no_dashboard, feedback=feedback,
                         target=args.target, suppress=suppress, native=use_native)
    result = Campaign(cfg, console).run()
    summary(console, result)
    if result.divergences:
        return 1
    return 3 if result.failed else 0


def _load_crash(path: str, bugs: list[str], target: str | None) -> Crash | None:
    """A replayed crash file, or None after printing why it cannot be used. ``target``
    overrides the sidecar's."""
    from fuzzmmu.campaign.triage import CrashFileError, load_crash

    problem = _bug_error(bugs)
    if problem:
        _fail(problem)
        return None
    if target == "kvm" and bugs:
        _fail("--target kvm: mutants are for the model: real KVM runs its own code")
        return None
    try:
        return load_crash(Path(path), tuple(bugs) if bugs else None, target)
    except (CrashFileError, ValueError) as exc:
        _fail(str(exc))
        return None


def _cmd_triage(args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    from fuzzmmu.campaign.triage import triage

    directory = Path(args.dir)
    if not directory.is_dir():
        return _fail(f"{directory} is not a directory")
    problem = _bug_error(args.bug)
    if problem:
        return _fail(problem)
    groups, errors = triage(directory, tuple(args.bug) if args.bug else None, args.target)
    if args.json:
        print(json.dumps({"groups": [{"target": g.target, "signature": g.signature,
                                      "kind": g.kind,
                                      "count": len(g.members),
                                      "smallest": str(g.smallest.path),
                                      "smallest_ops": g.smallest.ops} for g in groups],
                          "errors": errors}))
        return 0
    table = Table(title=f"crash groups in {directory}", title_justify="left")
    for col in ("count", "target", "kind", "signature", "smallest member"):
        table.add_column(col, overflow="fold")
    for g in groups:
        table.add_row(str(len(g.members)), g.target, g.kind, escape(g.signature),
                      f"{g.smallest.path.name} ({g.smallest.ops} ops)")
    console.print(table)
    for e in errors:
        console.print(f"[yellow]skipped[/] {escape(e)}")
    return 0


def _cmd_minimize(args: argparse.Namespace, console: Console) -> int:
    from fuzzmmu.campaign.minimize import NotDivergent, minimize
    from fuzzmmu.campaign.triage import executor_target, load_crash, write_sidecar
    from fuzzmmu.program.files import write_program
    from fuzzmmu.program.text import format_program

    crash = _load_crash(args.crash, args.bug, args.target)
    if crash is None:
        return 2
    if crash.target == "kvm" and args.audit:
        return _fail("--audit checks the model's internals: this crash replays on real KVM")
    start = time.monotonic()

    def progress(runs: int, ops: int) -> None:
        if runs % 100 == 0:
            console.print(f"  {runs} oracle runs, trying {ops} ops", highlight=False)

    try:
        result = minimize(crash.program, crash.bugs, max_runs=args.max_runs, progress=progress,
                          audit=args.audit, target=executor_target(crash.target))
    except NotDivergent as exc:
        return _fail(f"{args.crash}: {exc}")
    write_program(args.output, result.program)
    minimized = load_crash(Path(args.output), crash.bugs, crash.target)
    write_sidecar(minimized, None)
    console.print(format_program(result.program), highlight=False)
    console.print(f"minimized {result.ops_before} -> {result.ops_after} ops with "
                  f"{result.runs} oracle runs in {time.monotonic() - start:.1f}s"
                  f"{' (run budget exhausted)' if result.exhausted else ''}; signature "
                  f"{result.signature}; written to {args.output}", highlight=False)
    return 0


def _cmd_export(args: argparse.Namespace, console: Console) -> int:
    from fuzzmmu.campaign.export import export

    crash = _load_crash(args.crash, args.bug, args.target)
    if crash is None:
        return 2
    if crash.divergence is None:
        where = "on real KVM" if crash.target == "kvm" else f"with bugs {list(crash.bugs)}"
        return _fail(f"{args.crash} does not diverge {where}: nothing to export")
    out = Path(args.output)
    export(crash.program, crash.bugs, crash.divergence, out, Path(args.crash).name,
           crash.target)
    console.print(f"wrote {out} ({crash.divergence.signature}); run it with "
                  f"`python -m pytest {out}`", highlight=False)
    return 0


def _cmd_corpus(args: argparse.Namespace, console: Console) -> int:
    from fuzzmmu.campaign.corpus import (
        SEED_ZIP,
        SEEDS,
        build_seeds,
        seed_zip,
        stale_seeds,
        write_configuration_seeds,
    )

    directory = Path(args.dir) if args.dir else SEEDS
    try:
        if args.action == "configs":
            written = write_configuration_seeds(directory)
            console.print(f"wrote {len(written)} configuration seeds in {directory}; "
                          "`fuzzmmu corpus build` writes their binary form")
        elif args.action == "build":
            built = build_seeds(directory)
            console.print(f"wrote {len(built)} binary seeds in {directory}")
        elif args.action == "zip":
            out = seed_zip(Path(args.output) if args.output else SEED_ZIP, directory)
            console.print(f"wrote {out}")
        else:
            stale = stale_seeds(directory)
            for name in stale:
                console.print(f"[red]stale[/] {name}: run `fuzzmmu corpus build`")
            return 1 if stale else 0
    except (OSError, ValueError) as exc:
        return _fail(str(exc))
    return 0


def _cmd_bench(args: argparse.Namespace, console: Console) -> int:
    from fuzzmmu.bench.engines import Engine
    from fuzzmmu.bench.runner import BenchConfig, BenchError, report_from, run_bench
    from fuzzmmu.model.bugs import CATALOG

    if args.report:
        try:
            report_from(Path(args.out), console, as_markdown=args.markdown)
        except BenchError as exc:
            return _fail(str(exc))
        return 0
    if args.markdown:
        return _fail("--markdown goes with --report")
    if args.seed_mutants:
        bugs = [b.id for b in CATALOG if b.available and b.seed]
    else:
        bugs = args.bugs or [b.id for b in CATALOG if b.available]
    problem = _bug_error(bugs)
    if problem:
        return _fail(problem)
    try:
        engines = tuple(Engine(e) for e in args.engines) if args.engines else tuple(Engine)
    except ValueError as exc:
        return _fail(f"{exc}; engines: {', '.join(e.value for e in Engine)}")
    for flag, value, least in (("--trials", args.trials, 1), ("--jobs", args.jobs, 1),
                               ("--budget", args.budget, 1), ("--seed", args.seed, 1),
                               ("--throughput-time", args.throughput_time, 0),
                               ("--minimize-runs", args.minimize_runs, 0)):
        if value < least:
            return _fail(f"{flag} must be at least {least}")
    use_native, problem = _use_native(args.model, Feedback.STATE, "model", console)
    if problem:
        return _fail(problem)
    cfg = BenchConfig(tuple(dict.fromkeys(bugs)), engines, args.trials, args.budget,
                      args.jobs, Path(args.out), args.seed, args.throughput_time,
                      args.minimize_runs, args.resume, native=use_native)
    try:
        run_bench(cfg, console)
    except BenchError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130
    return 0


def _cmd_soak(args: argparse.Namespace, console: Console) -> int:
    from fuzzmmu.bench.soak import SoakConfig, SoakError, parse_engines, run_soak

    try:
        cfg = SoakConfig(programs=args.programs, max_time=args.max_time, jobs=args.jobs,
                         engines=parse_engines(args.engines), audit_every=args.audit_every,
                         seed=args.seed, out=Path(args.out), minimize_runs=args.minimize_runs)
        return run_soak(cfg, console).exit_code  # always the clean model
    except SoakError as exc:
        return _fail(str(exc))


def _cmd_agreement(args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    from fuzzmmu.bench.agreement import AgreementResult, measure, write
    from fuzzmmu.kvm.device import KvmError
    from fuzzmmu.kvm.verdict import Verdict, kvm_profile

    if args.programs < 1:
        return _fail("--programs must be at least 1")
    if args.ops < 1:
        return _fail("--ops must be at least 1")
    problem = _bug_error(args.bug)
    if problem:
        return _fail(problem)
    bugs = tuple(args.bug) if args.bug else kvm_profile()
    start = time.monotonic()

    def progress(r: AgreementResult) -> None:
        console.print(f"[{time.monotonic() - start:5.0f}s] {r.programs:,}/{args.programs:,} "
                      f"programs, {r.ran:,} ran on KVM, agreement {r.agreement:.2%}, "
                      f"infidelities {sum(n for v, n in r.verdicts.items() if v.infidelity)}",
                      highlight=False)

    try:
        result = measure(args.programs, args.seed, args.ops, bugs, progress)
    except KvmError as exc:
        return _fail(f"the KVM target cannot run on this host: {exc}")
    write(result, Path(args.out))
    table = Table(title=f"three-way verdicts of {result.programs:,} random 4-level programs",
                  title_justify="left")
    table.add_column("verdict")
    table.add_column("programs", justify="right")
    for v in Verdict:
        table.add_row(v.value, f"{result.verdicts[v]:,}")
    console.print(table)
    clean, as_kvm, kvm = result.rates()
    console.print(f"agreement of the model-as-KVM with real KVM: {result.agreement:.2%} of the "
                  f"{result.ran:,} programs KVM ran; {result.unsync:,} took the unsync path in "
                  f"the model-as-KVM ({result.unsync_agree:,} of them agree)\n"
                  f"programs/s: model {clean:,.0f}, model-as-KVM {as_kvm:,.0f}, real KVM "
                  f"{kvm:,.0f}", highlight=False)
    for n, g in enumerate(sorted(result.groups.values(), key=lambda g: -g.count), 1):
        console.print(f"  {g.count:5d}  {escape(g.name)}  ({args.out}/groups/{n}.txt)",
                      highlight=False)
    return 0 if result.clean else 1


def _cmd_demo(args: argparse.Namespace, console: Console) -> int:
    from fuzzmmu.campaign.demo import demo

    problem = _bug_error([args.bug])
    if problem:
        return _fail(problem)
    return demo(console, Path(args.workdir), args.bug, args.max_time, args.seed,
                not args.no_dashboard)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fuzzmmu", description="Differential fuzzer for x86 shadow paging (KVM's shadow MMU).")
    parser.add_argument("--version", action="version", version=f"fuzzmmu {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    w = sub.add_parser("walk", help="walk guest page tables with the architectural reference",
                       description="Walk a gva through page tables given in FILE and/or flags "
                                   "and print each level, the rights and the verdict. Exit 0 on "
                                   "a translation, 1 on #PF or #GP, 2 on bad input.")
    w.add_argument("file", nargs="?", help="page-table description (see fuzzmmu/ui/tablespec.py)")
    w.add_argument("--demo", action="store_true", help="walk a built-in 4-level example")
    w.add_argument("--mode", help="off | 32bit | pae | 4level | 5level")
    w.add_argument("--cr3")
    w.add_argument("--gva")
    w.add_argument("--access", help="read | write | fetch")
    w.add_argument("--maxphyaddr")
    w.add_argument("--pkru")
    w.add_argument("--pages", help="guest memory size in 4 KiB pages")
    w.add_argument("--entry", action="append", default=[], metavar="GPA=VALUE",
                   help="a paging-structure entry (repeatable)")
    w.add_argument("--flag", action="append", default=[], metavar="FLAG",
                   help="wp, nowp, nxe, smep, smap, pse, pke, ac, user, implicit, set-ad "
                        "(repeatable)")
    w.add_argument("--json", action="store_true", help="machine-readable output")
    w.set_defaults(func=_cmd_walk)

    r = sub.add_parser("replay", help="run a program on model and reference, show the first "
                                      "divergence",
                       description="Run a program (text or binary form) on the shadow-MMU "
                                   "model and the architectural reference. Exit 0 when they "
                                   "agree, 1 on a divergence, 2 on unusable input.")
    r.add_argument("file", help="program file: text form (# fuzzmmu program v1) or binary")
    r.add_argument("--bug", action="append", default=[], metavar="ID",
                   help="enable a historical KVM bug in the model (repeatable; see `fuzzmmu "
                        "bugs`)")
    r.add_argument("--json", action="store_true", help="machine-readable result")
    r.add_argument("--trace", action="store_true", help="print every step and both outcomes")
    r.add_argument("--no-audit", action="store_true",
                   help="skip the structural audit of the model after every op")
    r.add_argument("--target", choices=("model", "kvm", "all"), default="model",
                   help="the machine under test: the shadow-MMU model (default), real KVM "
                        "through /dev/kvm (boot=4level programs; exit 2 when the host cannot "
                        "run the program: docs/kvm-target.md), or all: the model, the model "
                        "with the mutants of current KVM (or --bug) and real KVM, with a "
                        "three-way verdict")
    r.set_defaults(func=_cmd_replay)

    f = sub.add_parser("fuzz", help="run a coverage-guided campaign (libFuzzer via Atheris)",
                       description="Fuzz the shadow-MMU model (or, with --target kvm, this "
                                   "machine's real KVM) against the reference with "
                                   "libFuzzer. Stops at the first divergence unless "
                                   "--keep-going; Ctrl-C stops cleanly. Exit 1 when a "
                                   "divergence was found. Arguments after -- go to libFuzzer.")
    f.add_argument("--target", choices=("model", "kvm"), default="model",
                   help="what the programs run on: the shadow-MMU model (default) or real KVM "
                        "through /dev/kvm (each program as the host can run it; no --bug, "
                        "--audit or state feedback)")
    f.add_argument("--suppress", metavar="FILE",
                   help="a file of divergence signatures (one a line, # comment lines): such "
                        "divergences are counted, not crashes, and the campaign goes on")
    f.add_argument("--bug", action="append", default=[], metavar="ID",
                   help="enable a historical KVM bug in the model (repeatable)")
    f.add_argument("--max-time", type=int, metavar="S", help="stop after S seconds")
    f.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="fuzz on N cores (libFuzzer fork mode)")
    f.add_argument("--corpus", default=".fuzzmmu/corpus", metavar="DIR",
                   help="working corpus (seeded from corpus/ when empty; resumed otherwise)")
    f.add_argument("--crashes", default="crashes", metavar="DIR",
                   help="where crash files (and their .txt/.json) go")
    f.add_argument("--seed", type=int, help="libFuzzer's random seed")
    f.add_argument("--keep-going", action="store_true",
                   help="do not stop at the first divergence")
    f.add_argument("--audit", action="store_true",
                   help="also check the model's structural invariants after every op")
    f.add_argument("--byte-share", type=float, default=0.2, metavar="F",
                   help="share of mutations left to libFuzzer's byte mutator (1: bytes only)")
    f.add_argument("--feedback", choices=[x.value for x in Feedback],
                   help="what libFuzzer's coverage sees: the lines of the model and walker "
                        "(instrumented), the model's state features (uninstrumented, about 3x "
                        "as fast with the compiled model), or both; default: state on the "
                        "model, lines on real KVM")
    f.add_argument("--model", choices=MODEL_CHOICES, default="auto",
                   help="with state feedback, run the model compiled with mypyc (about 1.6x "
                        "as fast; built once per source version, about a minute) or as "
                        "Python; auto (default): compiled where a C compiler is available")
    f.add_argument("--stats", default=".fuzzmmu/stats.jsonl", metavar="FILE",
                   help="JSON lines of statistics, one per second")
    f.add_argument("--no-dashboard", action="store_true",
                   help="plain progress lines instead of the live dashboard")
    f.add_argument("libfuzzer", nargs=argparse.REMAINDER, help="-- then libFuzzer flags")
    f.set_defaults(func=_cmd_fuzz)

    t = sub.add_parser("triage", help="group crash files by divergence signature")
    t.add_argument("dir", help="directory of crash files")
    t.add_argument("--bug", action="append", default=[], metavar="ID",
                   help="bugs to replay with (default: each file's .json sidecar)")
    t.add_argument("--json", action="store_true", help="machine-readable groups")
    t.add_argument("--target", choices=("model", "kvm"),
                   help="replay every file there (default: each file's sidecar, else model)")
    t.set_defaults(func=_cmd_triage)

    m = sub.add_parser("minimize", help="shrink a divergent program, keeping its signature")
    m.add_argument("crash", help="crash file or program (text or binary)")
    m.add_argument("--bug", action="append", default=[], metavar="ID",
                   help="bugs to replay with (default: the file's .json sidecar)")
    m.add_argument("-o", "--output", required=True, help="where to write (binary + .txt)")
    m.add_argument("--max-runs", type=int, default=3000, help="oracle run budget")
    m.add_argument("--audit", action="store_true",
                   help="replay with the structural audit (for what only the audit sees)")
    m.add_argument("--target", choices=("model", "kvm"),
                   help="replay and minimize there (default: the sidecar's target, else model)")
    m.set_defaults(func=_cmd_minimize)

    e = sub.add_parser("export", help="write a divergent program as a pytest regression test")
    e.add_argument("crash", help="crash file or program (text or binary)")
    e.add_argument("--bug", action="append", default=[], metavar="ID",
                   help="bugs the model runs with (default: the file's .json sidecar)")
    e.add_argument("-o", "--output", required=True, help="tests/regressions/test_NAME.py")
    e.add_argument("--target", choices=("model", "kvm"),
                   help="what the test runs on (default: the sidecar's target, else model)")
    e.set_defaults(func=_cmd_export)

    c = sub.add_parser("corpus", help="seed corpus: generate the per-configuration seeds, "
                                      "build binaries from text, zip, check")
    c.add_argument("action", choices=("configs", "build", "zip", "check"))
    c.add_argument("--dir", help="seed directory (default: corpus/)")
    c.add_argument("-o", "--output", help="zip file (default: harnesses/"
                                          "shadow_mmu_fuzzer_seed_corpus.zip)")
    c.set_defaults(func=_cmd_corpus)

    dm = sub.add_parser("demo", help="fuzz one historical bug, minimize, export, run the test")
    dm.add_argument("--bug", default="misaligned-pt-write-two-sptes", metavar="ID")
    dm.add_argument("--max-time", type=int, default=300, metavar="S")
    dm.add_argument("--seed", type=int, default=1, help="libFuzzer's random seed")
    dm.add_argument("--workdir", default=".fuzzmmu/demo", metavar="DIR")
    dm.add_argument("--no-dashboard", action="store_true")
    dm.set_defaults(func=_cmd_demo)

    bn = sub.add_parser("bench", help="time-to-find per mutant and engine, throughput, "
                                      "minimization",
                        description="Run independent trials of each engine (atheris, "
                                    "atheris-bytes, atheris-state, atheris-both, random, "
                                    "hypothesis) against each mutant "
                                    "until its first divergence or the budget; print a table, "
                                    "write OUT/bench.json (every trial) and OUT/survival.png.")
    bn.add_argument("--bugs", nargs="+", metavar="ID",
                    help="mutants to find (default: every available one in the catalog)")
    bn.add_argument("--seed-mutants", action="store_true", help="only the seed mutants")
    bn.add_argument("--engines", nargs="+", metavar="E",
                    help="atheris atheris-bytes atheris-state atheris-both random hypothesis "
                         "(default: all)")
    bn.add_argument("--trials", type=int, default=5, help="trials per mutant and engine")
    bn.add_argument("--budget", type=float, default=30.0, metavar="S",
                    help="seconds per trial before it counts as a miss")
    bn.add_argument("--jobs", type=int, default=os.cpu_count() or 1, metavar="N",
                    help="trials run side by side (default: one per core)")
    bn.add_argument("--out", default="bench-results", metavar="DIR")
    bn.add_argument("--seed", type=int, default=1, help="trial k uses seed + k")
    bn.add_argument("--throughput-time", type=float, default=20.0, metavar="S",
                    help="seconds of each engine on the clean model, and of real KVM next to the "
                         "model, for programs/s (0: skip)")
    bn.add_argument("--minimize-runs", type=int, default=3000, metavar="N",
                    help="oracle-run budget to minimize each find (0: do not minimize)")
    bn.add_argument("--resume", action="store_true",
                    help="keep OUT/trials.jsonl and run only the missing trials")
    bn.add_argument("--model", choices=MODEL_CHOICES, default="auto",
                    help="the engines that watch no line of the model (atheris-state, random, "
                         "hypothesis) run it compiled with mypyc, or as Python; auto "
                         "(default): compiled where it can be built")
    bn.add_argument("--report", action="store_true",
                    help="only print the report of the run in OUT")
    bn.add_argument("--markdown", action="store_true",
                    help="with --report: print it as Markdown tables (for the README)")
    bn.set_defaults(func=_cmd_bench)

    sk = sub.add_parser("soak", help="clean programs from every engine on all cores; every "
                                     "divergence minimized and grouped",
                        description="Run clean programs (no mutants) from the random, "
                                    "generator, hypothesis and atheris engines in parallel, "
                                    "with the structural audit on a sample, for N programs "
                                    "and/or S seconds; minimize and group every divergence; "
                                    "write OUT/soak.json and OUT/divergences/. Exit 0 when "
                                    "clean, 1 on any divergence, 2 on bad flags.")
    sk.add_argument("--programs", type=int, metavar="N", help="programs in all engines")
    sk.add_argument("--max-time", type=float, metavar="S", help="stop after S seconds")
    sk.add_argument("--jobs", type=int, default=os.cpu_count() or 1, metavar="J",
                    help="worker processes (default: one per core)")
    sk.add_argument("--engines", default="random,generator,hypothesis,atheris", metavar="E,E",
                    help="comma-separated: random, generator, hypothesis, atheris (default: "
                         "all)")
    sk.add_argument("--audit-every", type=int, default=100, metavar="K",
                    help="the structural audit on one program in K (0: never)")
    sk.add_argument("--seed", type=int, default=1, help="worker k uses seed + k")
    sk.add_argument("--out", default="soak-results", metavar="DIR")
    sk.add_argument("--minimize-runs", type=int, default=3000, metavar="N",
                    help="oracle-run budget to minimize each signature (0: do not minimize)")
    sk.set_defaults(func=_cmd_soak)

    ag = sub.add_parser("agreement", help="three-way verdicts (reference, model, real KVM) of "
                                          "random programs: how well the model predicts KVM",
                        description="Run random 4-level programs of what this host's KVM "
                                    "can run on the clean model, on the model with the "
                                    "mutants of current KVM (the model-as-KVM) and on "
                                    "/dev/kvm; count the verdicts (docs/kvm-target.md §7) and "
                                    "write OUT/agreement.json and each disagreement group's "
                                    "smallest program to OUT/groups/. Exit 0 when the "
                                    "model-as-KVM says what real KVM does on every program, "
                                    "1 otherwise, 2 without a usable /dev/kvm.")
    ag.add_argument("--programs", type=int, default=10000, metavar="N")
    ag.add_argument("--seed", type=int, default=1, help="program k uses seed + k")
    ag.add_argument("--ops", type=int, default=16, metavar="N", help="ops per program")
    ag.add_argument("--bug", action="append", default=[], metavar="ID",
                    help="the model-as-KVM's mutants instead of those of current KVM "
                         "(repeatable)")
    ag.add_argument("--out", default="agreement-results", metavar="DIR")
    ag.set_defaults(func=_cmd_agreement)

    co = sub.add_parser("compile", help="build the compiled model (mypyc) for these sources",
                        description="Compile the model, the world, the oracle and the state "
                                    "feedback with mypyc "
                                    "into a cache directory (FUZZMMU_NATIVE_CACHE, default "
                                    "~/.cache/fuzzmmu/native), named by a digest of their "
                                    "sources. Campaigns with state feedback use it. Exit 2 "
                                    "when no build can be made here.")
    co.add_argument("--check", action="store_true",
                    help="only say whether it is built (exit 1 if not)")
    co.add_argument("--log", metavar="FILE", help="write the build's output there")
    co.set_defaults(func=_cmd_compile)

    b = sub.add_parser("bugs", help="list the switchable historical KVM bugs (mutants)")
    b.add_argument("--json", action="store_true", help="machine-readable list")
    b.add_argument("--markdown", action="store_true",
                   help="the catalog as docs/bugs.md (fuzzmmu bugs --markdown > docs/bugs.md)")
    b.set_defaults(func=_cmd_bugs)

    pl = sub.add_parser("plot", help="plot a campaign's statistics over time (PNG or HTML)",
                        description="Plot one campaign of a stats file (`fuzzmmu fuzz --stats`, "
                                    "default .fuzzmmu/stats.jsonl): programs/s, edges and "
                                    "features, corpus size, divergences and memory over time. "
                                    "Needs matplotlib (pip install -e '.[bench]'). Exit 2 when "
                                    "it is missing or the file cannot be plotted.")
    pl.add_argument("stats", metavar="STATS", help="the JSON-lines statistics of `fuzzmmu fuzz`")
    pl.add_argument("-o", "--output", metavar="FILE",
                    help="FILE.png (or .svg, .pdf), or FILE.html: a page that reloads every "
                         "minute (default: the stats file's name with .png)")
    pl.add_argument("--campaign", type=int, metavar="N",
                    help="which campaign of the file (1: the first, -1: the last; default: "
                         "the last)")
    pl.set_defaults(func=_cmd_plot)
    return parser


def _cmd_plot(args: argparse.Namespace, console: Console) -> int:
    from fuzzmmu.campaign.plot import (
        PlotUnavailable,
        StatsFileError,
        default_output,
        plot_stats_file,
    )

    stats = Path(args.stats)
    out = Path(args.output) if args.output else default_output(stats)
    try:
        out, chosen, count = plot_stats_file(stats, out, args.campaign)
    except StatsFileError as exc:
        for problem in exc.problems[:20]:
            _fail(problem)
        if len(exc.problems) > 20:
            _fail(f"... and {len(exc.problems) - 20} more")
        return _fail(str(exc))
    except PlotUnavailable as exc:
        return _fail(str(exc))
    except (OSError, ValueError) as exc:  # an unwritable path, a format matplotlib lacks
        return _fail(f"cannot write {out}: {exc}")
    last = chosen.samples[-1]
    console.print(f"wrote {out}: {last.t:,.0f} s, {last.execs:,} programs, {last.divergences:,} "
                  f"divergences (campaign at line {chosen.first_line}, one of {count})",
                  highlight=False)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # soft_wrap: a line longer than the terminal (a crash file's path, under a deep
    # directory) is not broken in two, which would keep it from being copied whole.
    console = Console(highlight=False, soft_wrap=True)
    return int(args.func(args, console))


if __name__ == "__main__":
    sys.exit(main())
