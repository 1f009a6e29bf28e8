"""`fuzzmmu replay` output: the program, where it diverged, and side by side what the
reference walk says and what the model's shadow tables and host TLB hold."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.columns import Columns
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fuzzmmu.arch.bits import EFER_LMA, PAGE_SHIFT, acc_str
from fuzzmmu.arch.walker import CpuState, WalkResult, WalkStep
from fuzzmmu.model.machine import Machine
from fuzzmmu.model.mmu import spte as S
from fuzzmmu.model.mmu.context import shadow_walk
from fuzzmmu.oracle.executor import AccessStep, Outcome, Step
from fuzzmmu.oracle.reference import ReferenceMachine
from fuzzmmu.program.text import format_header, format_op
from fuzzmmu.ui.walkview import steps_table, verdict_str


@dataclass
class AccessView:
    """Both machines just before a diverging access."""

    step: str
    cpu: CpuState
    gva: int
    walk: WalkResult
    walk_steps: list[WalkStep]
    spte_path: list[tuple[int, str, int, int]]  # (level, shadow page, index, spte)
    tlb: tuple[int, int] | None
    mmio_cache: str


def capture(model: Machine, ref: ReferenceMachine, step: Step) -> AccessView | None:
    """The explain callback: look at both machines before an access step runs."""
    if not isinstance(step, AccessStep):
        return None
    v = step.vcpu
    c = ref.cpus[v]
    gva = step.gva if c.efer & EFER_LMA else step.gva & 0xFFFFFFFF
    cpu = ref.cpu_state(v, step.ac)
    res, steps = ref.trace(v, gva, step.akind, cpl=step.cpl, ac=step.ac)
    vcpu = model.vcpus[v]
    mgva = gva if vcpu.efer & EFER_LMA else gva & 0xFFFFFFFF
    path = [(level, repr(sp), i, sp.sptv[i]) for sp, i, level in shadow_walk(model.kvm, vcpu,
                                                                            mgva)]
    where = f"gfn {vcpu.mmio_gfn:#x}{' (smm)' if vcpu.mmio_smm else ''} gen {vcpu.mmio_gen}"
    cache = (f"gva {vcpu.mmio_gva:#x} -> {where}" if vcpu.mmio_gva
             else where if vcpu.mmio_gfn else "empty")
    return AccessView(step.text, cpu, gva, res, steps, path, vcpu.tlb.get(mgva >> PAGE_SHIFT),
                      cache)


def spte_str(spte: int) -> str:
    if not spte:
        return "0"
    if S.is_mmio_spte(spte):
        return (f"{spte:#x} MMIO gfn={S.get_mmio_spte_gfn(spte):#x} "
                f"gen={S.get_mmio_spte_generation(spte)}")
    flags = [n for b, n in ((S.SPTE_P, "P"), (S.SPTE_W, "W"), (S.SPTE_U, "U"), (S.SPTE_NX, "NX"),
                            (S.SPTE_MMU_WRITABLE, "mmu-w"), (S.SPTE_MMU_PRESENT, "present"))
             if spte & b]
    return f"{spte:#x} pfn={S.spte_pfn(spte):#x} {'|'.join(flags)}"


def model_table(view: AccessView) -> Table:
    t = Table(title="model: shadow tables and host TLB", title_justify="left")
    for col in ("level", "shadow page", "index", "spte"):
        t.add_column(col)
    for level, sp, i, spte in view.spte_path:
        t.add_row(str(level), sp, str(i), spte_str(spte))
    tlb = "none" if view.tlb is None else f"hpa page {view.tlb[0]:#x}, {acc_str(view.tlb[1])}"
    t.caption = f"host TLB: {tlb}; MMIO cache: {view.mmio_cache}"
    return t


def show_replay(console: Console, outcome: Outcome, *, trace: bool = False,
                target: str = "model") -> None:
    """``target`` names the machine under test (the model, or real KVM: ``kvm``)."""
    p = outcome.program
    console.print(f"[bold]program[/] ({len(p.ops)} ops, bugs: {', '.join(outcome.bugs) or 'none'})")
    console.print(f"     {format_header(p.header)}")
    d = outcome.divergence
    for i, op in enumerate(p.ops):
        mark = "[red]>>[/]" if d is not None and d.op_index == i else "  "
        text = format_op(op).replace("\n", "\n       ")
        console.print(f"{mark} {i:2d} {escape(text)}", highlight=False)
    if trace:
        console.rule("trace")
        for t in outcome.trace:
            ok = "[green]ok[/]" if t.matched else "[red]DIFFERS[/]"
            console.print(f"{t.op_index:3d} {escape(t.step)}\n      {target}: {escape(t.model)}\n"
                          f"      reference: {escape(t.reference)} {ok}", highlight=False)
    console.rule()
    if d is None:
        if outcome.skipped:
            # ops_run counts the ops that completed: the next one left the contract.
            console.print(f"[yellow]not compared from op {outcome.ops_run} on:[/] "
                          f"{escape(outcome.skipped)}")
        console.print(f"[green]no divergence[/] ({outcome.ops_run} ops, {outcome.steps_run} "
                      "steps)")
        return
    console.print(f"[red bold]{d.kind.value}[/] at op {d.op_index}: {d.step}")
    console.print(f"  expected (reference): {escape(d.expected)}")
    console.print(f"  actual ({target}):{' ' * max(1, 12 - len(target))}{escape(d.actual)}")
    console.print(f"  signature: {escape(d.signature)} (id {d.signature_id})")
    view = outcome.view
    if isinstance(view, AccessView):
        left = steps_table(view.cpu, view.walk_steps, title=f"reference walk of {view.gva:#x}")
        left.caption = verdict_str(view.cpu, view.walk)
        console.print(Columns([left, model_table(view)]))


def replay_json(outcome: Outcome) -> dict[str, Any]:
    d = outcome.divergence
    return {"divergence": None if d is None else d.to_json(), "ops": len(outcome.program.ops),
            "bugs": list(outcome.bugs), "skipped": outcome.skipped or None}
