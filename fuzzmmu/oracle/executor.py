"""Run a program on the model machine and on the reference machine side by side, and report
the first divergence.

Each op is lowered into the guest or VMM steps that carry it out (a mode switch is a series of
CR/EFER writes and a kernel store; a page-table write is a store through the direct map), and
every step's outcome on the model must be one the reference allows. Guest memory and the
architectural registers are compared after every op; the model's structural audit optionally
too. An interleaved pair runs its second op at the chosen concurrency point of the first inside
the model; the reference accepts either order.

The machine under test is the model by default; a ``Target`` supplies another one that
implements ``TargetMachine`` (fuzzmmu.kvm: real KVM). A step such a machine cannot perform
raises ``Unsupported`` and the program's outcome is "skipped" with the reason; so does a
program that leaves KVM's contract with the VMM (``OutsideContract``: a page table written
through a host alias), from that op on.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from fuzzmmu.arch.bits import (
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_PAE,
    CR4_PSE,
    CR4_SMAP,
    CR4_SMEP,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    PAGE_SHIFT,
    PTE_P,
    PTE_PS,
    PagingMode,
    paging_mode,
)
from fuzzmmu.model.bugs import BugSet, bugset
from fuzzmmu.model.machine import Machine
from fuzzmmu.model.mmu.internal import MmuConfig, Point
from fuzzmmu.oracle.divergence import (
    Divergence,
    DivergenceKind,
    classify,
    make_signature,
    outcome_class,
)
from fuzzmmu.oracle.reference import OutsideContract, ReferenceMachine
from fuzzmmu.program.ops import (
    Access,
    CrBit,
    GuestMode,
    Interleave,
    Invlpg,
    LoadCr3,
    Map,
    Memslot,
    Migrate,
    MmuPages,
    Op,
    Program,
    Rsm,
    SetBit,
    SetMode,
    Shrink,
    Smi,
    Store,
    WritePte,
    ZapAll,
)
from fuzzmmu.program.text import format_op
from fuzzmmu.program.world import BOOT_ROOT, data_value, entry_value, next_pool_frame
from fuzzmmu.world.layout import DM_LINK, NUM_GFNS, direct_map_va
from fuzzmmu.world.memslots import MemslotUpdate, PhysMemory
from fuzzmmu.world.observe import DONE, AccessKind, Observation

_DM_KEY: Final = {GuestMode.BIT32: PagingMode.BIT32, GuestMode.BIT32_PSE: PagingMode.BIT32,
                  GuestMode.PAE: PagingMode.PAE, GuestMode.LONG4: PagingMode.LONG4}


# ---------------------------------------------------------------------- targets


class Unsupported(Exception):
    """The machine under test cannot perform a step (real KVM lacks the mode, the device or
    the hook the op needs): the program is skipped with this reason, it has no result."""


class TargetPdptrs(Protocol):
    @property
    def pdptrs(self) -> Sequence[int]: ...


class TargetVcpu(Protocol):
    """What the executor compares of a vCPU after every op."""

    @property
    def cr0(self) -> int: ...
    @property
    def cr3(self) -> int: ...
    @property
    def cr4(self) -> int: ...
    @property
    def efer(self) -> int: ...
    @property
    def smm(self) -> int: ...
    @property
    def dead(self) -> bool: ...
    @property
    def mmu(self) -> TargetPdptrs: ...


class TargetMachine(Protocol):
    """The machine under test as the executor drives it: ``Machine`` (the model) and
    ``fuzzmmu.kvm.KvmMachine`` (real KVM). ``phys.backing`` is the guest memory compared with
    the reference's after every op."""

    @property
    def phys(self) -> PhysMemory: ...
    @property
    def vcpus(self) -> Sequence[TargetVcpu]: ...
    def access(self, v: int, gva: int, kind: AccessKind, *, cpl: int = 0, ac: bool = False,
               width: int = 8, value: int = 0) -> Observation: ...
    def write_cr0(self, v: int, value: int) -> Observation: ...
    def write_cr3(self, v: int, value: int) -> Observation: ...
    def write_cr4(self, v: int, value: int) -> Observation: ...
    def write_efer(self, v: int, value: int) -> Observation: ...
    def invlpg(self, v: int, gva: int) -> Observation: ...
    def smi(self, v: int) -> Observation: ...
    def rsm(self, v: int) -> Observation: ...
    def set_memslot(self, upd: MemslotUpdate) -> Observation: ...
    def migrate_page(self, as_id: int, gfn: int) -> Observation: ...
    def zap_all(self) -> Observation: ...
    def shrink(self, nr_to_scan: int) -> Observation: ...
    def set_max_pages(self, goal: int) -> Observation: ...
    def regs(self, v: int) -> tuple[int, int, int, int, int]: ...
    def destroy(self) -> None: ...


@dataclass(frozen=True)
class Target:
    """What a program runs on against the reference. ``speculative``: the target's KVM makes
    shadow pages unsync whatever the program's header says (real KVM always may), so the
    reference accepts speculatively cached translations (docs/x86-paging.md §9)."""

    name: str
    make: Callable[[Program, BugSet], TargetMachine]
    speculative: bool = False


def _make_model(program: Program, bugs: BugSet) -> Machine:
    h = program.header
    return Machine(MmuConfig(h.policy, h.mmio_gen_bits, h.maxphyaddr, h.mmu_pages, h.unsync),
                   bugs)


MODEL: Final = Target("model", _make_model)


# ---------------------------------------------------------------------- steps


NO_VCPU: Final = -1


class Step:
    """One guest instruction or VMM/host call, run on both machines. ``text`` describes it
    for traces and divergences; it is built only when asked for."""

    __slots__ = ("kind", "vcpu")

    kind: str
    vcpu: int  # NO_VCPU: a VMM or host call (one type in every subclass, as mypyc needs)

    @property
    def text(self) -> str:
        raise NotImplementedError

    def on_model(self, m: TargetMachine) -> Observation:
        raise NotImplementedError

    def on_ref(self, r: ReferenceMachine, got: Observation) -> tuple[bool, Observation]:
        raise NotImplementedError


_ACCESS_STEP_KIND: Final = {k: f"access/{k.value}" for k in AccessKind}


class AccessStep(Step):
    """A guest access; ``why`` says what it is for (a format string of ``why_args``: the text
    is built only when asked for)."""

    __slots__ = ("ac", "akind", "cpl", "gva", "value", "why", "why_args", "width")

    def __init__(self, vcpu: int, gva: int, akind: AccessKind, cpl: int, ac: bool, width: int,
                 value: int, why: str, why_args: tuple[int, ...] = ()) -> None:
        self.kind = _ACCESS_STEP_KIND[akind]
        self.vcpu = vcpu
        self.gva = gva
        self.akind = akind
        self.cpl = cpl
        self.ac = ac
        self.width = width
        self.value = value
        self.why = why
        self.why_args = why_args

    @property
    def text(self) -> str:
        why = self.why.format(*self.why_args) if self.why_args else self.why
        return (f"{why}: {self.akind.value} cpu{self.vcpu} {self.gva:#x} "
                f"width={self.width} cpl={self.cpl}{' ac' if self.ac else ''}"
                + (f" value={self.value:#x}" if self.akind is AccessKind.WRITE else ""))

    def on_model(self, m: TargetMachine) -> Observation:
        return m.access(self.vcpu, self.gva, self.akind, cpl=self.cpl, ac=self.ac,
                        width=self.width, value=self.value)

    def on_ref(self, r: ReferenceMachine, got: Observation) -> tuple[bool, Observation]:
        return r.access(self.vcpu, self.gva, self.akind, got, cpl=self.cpl, ac=self.ac,
                        width=self.width, value=self.value)


class SpeculativeWalk(Step):
    """On the reference only: the translation an access made before another op ran (KVM's
    walk at the interleave point), the access itself coming after."""

    __slots__ = ("access",)

    def __init__(self, access: AccessStep) -> None:
        self.kind = access.kind
        self.vcpu = access.vcpu
        self.access = access

    @property
    def text(self) -> str:
        return f"translation ahead of the access ({self.access.text})"

    def on_ref(self, r: ReferenceMachine, got: Observation) -> tuple[bool, Observation]:
        a = self.access
        r.speculative_walk(a.vcpu, a.gva, a.akind, cpl=a.cpl, ac=a.ac)
        return True, DONE


_MODEL_WRITES: Final[dict[str, Callable[[TargetMachine, int, int], Observation]]] = {
    "cr0": lambda m, v, x: m.write_cr0(v, x), "cr3": lambda m, v, x: m.write_cr3(v, x),
    "cr4": lambda m, v, x: m.write_cr4(v, x), "efer": lambda m, v, x: m.write_efer(v, x)}
_REF_WRITES: Final[dict[str, Callable[[ReferenceMachine, int, int], Observation]]] = {
    "cr0": ReferenceMachine.write_cr0, "cr3": ReferenceMachine.write_cr3,
    "cr4": ReferenceMachine.write_cr4, "efer": ReferenceMachine.write_efer}


class CrStep(Step):
    """A MOV to CR0/CR3/CR4 or a WRMSR to EFER (``kind`` names the register); the model's
    outcome must equal the reference's."""

    __slots__ = ("value",)

    def __init__(self, vcpu: int, reg: str, value: int) -> None:
        self.kind = reg
        self.vcpu = vcpu
        self.value = value

    @property
    def text(self) -> str:
        return f"mov {self.kind}, {self.value:#x} (cpu{self.vcpu})"

    def on_model(self, m: TargetMachine) -> Observation:
        return _MODEL_WRITES[self.kind](m, self.vcpu, self.value)

    def on_ref(self, r: ReferenceMachine, got: Observation) -> tuple[bool, Observation]:
        expected = _REF_WRITES[self.kind](r, self.vcpu, self.value)
        return _same_outcome(expected, got), expected


class CallStep(Step):
    """A step whose outcome on the model must equal the reference's."""

    __slots__ = ("describe", "model_call", "ref_call")

    def __init__(self, kind: str, vcpu: int, describe: Callable[[], str],
                 model_call: Callable[[TargetMachine], Observation],
                 ref_call: Callable[[ReferenceMachine], Observation]) -> None:
        self.kind = kind
        self.vcpu = vcpu
        self.describe = describe
        self.model_call = model_call
        self.ref_call = ref_call

    @property
    def text(self) -> str:
        return self.describe()

    def on_model(self, m: TargetMachine) -> Observation:
        return self.model_call(m)

    def on_ref(self, r: ReferenceMachine, got: Observation) -> tuple[bool, Observation]:
        expected = self.ref_call(r)
        return _same_outcome(expected, got), expected


def _same_outcome(expected: Observation, got: Observation) -> bool:
    return expected.kind is got.kind and expected.addr == got.addr and (
        expected.value == got.value and expected.error_code == got.error_code)


def host_step(kind: str, describe: Callable[[], str],
              model_call: Callable[[TargetMachine], Observation],
              ref_call: Callable[[ReferenceMachine], Observation] = lambda r: DONE) -> CallStep:
    return CallStep(kind, NO_VCPU, describe, model_call, ref_call)


# ---------------------------------------------------------------------- lowering


def _link_store(r: ReferenceMachine, v: int, mode: PagingMode, paging_now: PagingMode,
                root: int) -> list[Step]:
    """The kernel copies its half into a root before loading it (Linux's pgd_alloc()), with a
    store through its current mapping, unless the root already has it."""
    off, size, value = DM_LINK[mode]
    gpa = (root << PAGE_SHIFT) + off
    smm = r.cpus[v].smm
    if r.phys.read(smm, gpa, size) == value:
        return []
    return [AccessStep(v, direct_map_va(paging_now, gpa), AccessKind.WRITE, 0, False, size,
                       value, "kernel half of the new root")]


def lower(op: Op, r: ReferenceMachine) -> list[Step]:
    """The steps that perform ``op``, given the guest's current state (the reference's)."""
    # Exact type tests: op classes have no subclasses, and a failed isinstance() looks up the
    # object's __class__ once more, a dozen times for the last ops in this chain.
    if type(op) is Access:
        value = data_value(op.seed, op.width) if op.kind is AccessKind.WRITE else 0
        return [AccessStep(op.vcpu, op.va + op.offset, op.kind, op.cpl, op.ac, op.width, value,
                           "access")]
    if type(op) is WritePte or type(op) is Store:
        cr0, _, cr4, efer, _ = r.regs(op.vcpu)
        mode = paging_mode(cr0, cr4, efer)
        e = op.entry
        if isinstance(op, WritePte):
            gpa = (op.table << PAGE_SHIFT) + op.index * op.width
            value = entry_value(e.target, e.flags, e.extra, op.width)
        else:
            gpa = (op.frame << PAGE_SHIFT) + op.offset
            value = entry_value(e.target, e.flags, e.extra, 4 if op.width <= 4 else 8) & (
                (1 << (8 * op.width)) - 1)
        return [AccessStep(op.vcpu, direct_map_va(mode, gpa), AccessKind.WRITE, 0, False,
                           op.width, value, op.KIND)]
    if type(op) is Map:
        return _lower_map(op, r)
    if type(op) is SetMode:
        v = op.vcpu
        cr0, _, cr4, efer, _ = r.regs(v)
        steps: list[Step] = []
        if cr0 & CR0_PG:
            cr0 &= ~CR0_PG
            steps.append(CrStep(v, "cr0", cr0))
        if op.mode is not GuestMode.OFF:
            steps += _link_store(r, v, _DM_KEY[op.mode], PagingMode.OFF, op.root)
        new_cr4 = cr4 & ~(CR4_PAE | CR4_PSE)
        if op.mode in (GuestMode.PAE, GuestMode.LONG4):
            new_cr4 |= CR4_PAE
        if op.mode is GuestMode.BIT32_PSE:
            new_cr4 |= CR4_PSE
        if new_cr4 != cr4:
            steps.append(CrStep(v, "cr4", new_cr4))
        new_efer = (efer & ~(EFER_LME | EFER_LMA)) | (EFER_LME if op.mode is GuestMode.LONG4
                                                      else 0)
        if new_efer != efer & ~EFER_LMA:
            steps.append(CrStep(v, "efer", new_efer))
        steps.append(CrStep(v, "cr3", op.root << PAGE_SHIFT))
        if op.mode is not GuestMode.OFF:
            steps.append(CrStep(v, "cr0", cr0 | CR0_PE | CR0_PG))
        return steps
    if type(op) is LoadCr3:
        cr0, _, cr4, efer, _ = r.regs(op.vcpu)
        mode = paging_mode(cr0, cr4, efer)
        steps = []
        if mode is not PagingMode.OFF:
            steps += _link_store(r, op.vcpu, mode, mode, op.root)
        return [*steps, CrStep(op.vcpu, "cr3", op.root << PAGE_SHIFT)]
    if type(op) is SetBit:
        v = op.vcpu
        cr0, _, cr4, efer, _ = r.regs(v)
        if op.bit is CrBit.WP:
            return [CrStep(v, "cr0", cr0 | CR0_WP if op.on else cr0 & ~CR0_WP)]
        if op.bit is CrBit.NXE:
            return [CrStep(v, "efer", efer | EFER_NXE if op.on else efer & ~EFER_NXE)]
        bit = {CrBit.SMEP: CR4_SMEP, CrBit.SMAP: CR4_SMAP, CrBit.PSE: CR4_PSE}[op.bit]
        return [CrStep(v, "cr4", cr4 | bit if op.on else cr4 & ~bit)]
    if type(op) is Invlpg:
        v, va = op.vcpu, op.va
        return [CallStep("invlpg", v, lambda: f"invlpg {va:#x} (cpu{v})",
                         lambda m: m.invlpg(v, va), lambda r: r.invlpg(v, va))]
    if type(op) is Smi:
        v = op.vcpu
        return [CallStep("smi", v, lambda: f"SMI to cpu{v}", lambda m: m.smi(v),
                         lambda r: r.smi(v))]
    if type(op) is Rsm:
        v = op.vcpu
        return [CallStep("rsm", v, lambda: f"rsm (cpu{v})", lambda m: m.rsm(v),
                         lambda r: r.rsm(v))]
    if type(op) is Memslot:
        upd = MemslotUpdate(op.change, op.as_id, op.slot, op.base, op.npages, op.hva)
        return [host_step("memslot", lambda: format_op(op), lambda m: m.set_memslot(upd),
                          lambda r: r.set_memslot(upd))]
    if type(op) is Migrate:
        as_id, gfn = op.as_id, op.gfn
        return [host_step("migrate", lambda: format_op(op), lambda m: m.migrate_page(as_id, gfn),
                          lambda r: r.migrate_page(as_id, gfn))]
    if type(op) is ZapAll:
        return [host_step("zap-all", lambda: "zap all shadow pages", lambda m: m.zap_all())]
    if type(op) is Shrink:
        count = op.count
        return [host_step("shrink", lambda: format_op(op), lambda m: m.shrink(count))]
    if type(op) is MmuPages:
        count = op.count
        return [host_step("mmu-pages", lambda: format_op(op), lambda m: m.set_max_pages(count))]
    raise TypeError(f"cannot lower {op!r}")


_CURRENT_FORMAT: Final = {PagingMode.OFF: GuestMode.LONG4, PagingMode.BIT32: GuestMode.BIT32,
                          PagingMode.PAE: GuestMode.PAE, PagingMode.LONG4: GuestMode.LONG4,
                          PagingMode.LONG5: GuestMode.LONG4}
_MAP_GEOMETRY: Final = {  # format -> (entry size, levels, index bits per level)
    GuestMode.BIT32: (4, 2, 10),
    GuestMode.PAE: (8, 3, 9),
    GuestMode.LONG4: (8, 4, 9),
}


def _lower_map(op: Map, r: ReferenceMachine) -> list[Step]:
    """The stores of a kernel mapping ``op.va``: walk the tables from the root (the kernel
    reads its own memory), allocate a pool frame for each missing or unusable table, write the
    links and the leaf, each through the direct map of the vCPU's current mode."""
    v = op.vcpu
    cr0, cr3, cr4, efer, smm = r.regs(v)
    now = paging_mode(cr0, cr4, efer)
    fmt = op.fmt or _CURRENT_FORMAT[now]
    esize, levels, ibits = _MAP_GEOMETRY[fmt]
    # (a member of an enum of an interpreted module costs a lookup through its metaclass)
    long4, pae = fmt is GuestMode.LONG4, fmt is GuestMode.PAE
    va = op.va if long4 else op.va & 0xFFFFFFFF
    leaf_level = min(op.level, 2) if not long4 else op.level
    base_mask = 0xFFFFF000 if esize == 4 else 0xF_FFFF_FFFF_F000
    written: dict[int, int] = {}  # this map's own stores, not in memory yet
    steps: list[Step] = []
    table = (cr3 >> PAGE_SHIFT) % NUM_GFNS if op.root is None else op.root
    table_root = table
    pool = op.pool

    def store(gpa: int, value: int, why: str, why_args: tuple[int, ...] = ()) -> None:
        written[gpa] = value
        steps.append(AccessStep(v, direct_map_va(now, gpa), AccessKind.WRITE, 0, False, esize,
                                value, why, why_args))

    for level in range(levels, leaf_level, -1):
        if pae and level == 3:
            gpa = (table << PAGE_SHIFT) + ((va >> 30) & 3) * 8  # a PDPTE
        else:
            index = (va >> (PAGE_SHIFT + ibits * (level - 1))) & ((1 << ibits) - 1)
            gpa = (table << PAGE_SHIFT) + index * esize
        entry = written.get(gpa)
        if entry is None:
            entry = r.phys.read(smm, gpa, esize) or 0
        nxt = (entry & base_mask) >> PAGE_SHIFT
        is_leaf = entry & PTE_PS and level > 1 and not (pae and level == 3)
        if entry & PTE_P and not is_leaf and nxt < NUM_GFNS:
            table = nxt
            continue
        table = pool
        pool = next_pool_frame(pool)
        if pae and level == 3:
            link = (table << PAGE_SHIFT) | PTE_P  # PDPTEs carry no rights
        else:
            link = (table << PAGE_SHIFT) | PTE_P | (op.upper & ((1 << (8 * esize)) - 1))
        store(gpa, link, "map: level-{} table at {:#x}", (level, table))
    index = (va >> (PAGE_SHIFT + ibits * (leaf_level - 1))) & ((1 << ibits) - 1)
    gpa = (table << PAGE_SHIFT) + index * esize
    if now is PagingMode.PAE and pae and table_root == cr3 >> PAGE_SHIFT and any(
            gpa >> PAGE_SHIFT == table_root and gpa & 0xFFF < 32 for gpa in written):
        # A new PDPTE takes effect at the next PDPTE load: reload CR3, as Linux does.
        steps.append(CrStep(v, "cr3", cr3))
    leaf = op.entry
    target, flags = leaf.target, leaf.flags
    if leaf_level > 1:
        target &= ~((1 << (ibits * (leaf_level - 1))) - 1)
        flags |= PTE_PS
    store(gpa, entry_value(target, flags, leaf.extra, esize), "map: leaf")
    return steps


# ---------------------------------------------------------------------- outcome


@dataclass(frozen=True)
class TraceEntry:
    op_index: int
    step: str
    model: str
    reference: str
    matched: bool


@dataclass
class Outcome:
    program: Program
    bugs: tuple[str, ...]
    divergence: Divergence | None = None
    ops_run: int = 0
    steps_run: int = 0
    trace: list[TraceEntry] = field(default_factory=list)
    div_step: int = -1  # index (counting every step run) of the step that diverged
    view: Any = None  # what ``explain`` captured before that step
    skipped: str = ""  # why the target could not run the program (Unsupported): no result


Explainer = Callable[[Machine, ReferenceMachine, Step], object]
class Observer(Protocol):
    """Looks at both machines after every op they agree on, and once more when a program
    ran to its end without a divergence (campaign feedback, fuzzmmu.campaign.feedback)."""

    def __call__(self, op: Op, model: Machine, ref: ReferenceMachine) -> None: ...

    def end(self, model: Machine, ref: ReferenceMachine) -> None: ...

# A divergence signature names the mode the vCPU was in. It is captured before each step or op
# as the vCPU's (cr0, cr3, cr4, efer, smm), which is cheap, and named only for a divergence;
# None stands for a host step, a str for a label already known.
ModeAt = tuple[int, int, int, int, int] | str | None


def _mode_label(mode: ModeAt) -> str:
    if mode is None:
        return "host"
    if isinstance(mode, str):
        return mode
    cr0, _, cr4, efer, smm = mode
    label = paging_mode(cr0, cr4, efer).label
    return label + "+smm" if smm else label


# Interleave points at which a faulting access has walked the guest tables already.
_AFTER_WALK: Final = frozenset({Point.WALKED, Point.FAULTIN, Point.PRE_LEAF, Point.EMULATE})


_HOST_OPS: Final = frozenset({Memslot, ZapAll, Migrate, Shrink, MmuPages})  # no vCPU


def _op_vcpu(op: Op) -> int | None:
    if type(op) is Interleave:
        op = op.first
    # (a getattr default would raise and catch AttributeError for every host op)
    return None if type(op) in _HOST_OPS else int(op.vcpu)  # type: ignore[attr-defined]


class _ModelCrash(Exception):
    def __init__(self, step: Step, exc: BaseException) -> None:
        self.step = step
        self.exc = exc


# ---------------------------------------------------------------------- executor


class Executor:
    """Drives one program; ``run`` returns its Outcome. Nothing is shared with other runs."""

    def __init__(self, program: Program, bugs: Iterable[str] = (), *, audit: bool = False,
                 trace: bool = False, explain: tuple[int, Explainer] | None = None,
                 observe: Observer | None = None, target: Target = MODEL) -> None:
        h = program.header
        self.program = program
        self.bugset = bugset(bugs)
        self.audit = audit
        self.outcome = Outcome(program, self.bugset.ids)
        self.tracing = trace
        self.explain = explain  # (step index, callback): look at both machines before it
        self.observe = observe  # called after every op both machines agree on
        self.target = target
        self.model: TargetMachine = target.make(program, self.bugset)
        # With unsync pages, KVM keeps only the SDM's promise about translations the guest
        # never used (docs/x86-paging.md §9): the reference accepts speculative ones.
        self.ref = ReferenceMachine(h.maxphyaddr, speculative=h.unsync or target.speculative)

    def _machine(self, what: str) -> Machine:
        """The model itself, for what only it has: interleave points, the structural audit,
        the campaign's feedback and the replay's explain view."""
        if not isinstance(self.model, Machine):
            raise Unsupported(f"{what} needs the model's internals; the {self.target.name} "
                              "target has none")
        return self.model

    def boot(self) -> Divergence | None:
        """Both vCPUs enter the header's boot mode (as op index -1)."""
        mode = self.program.header.boot
        if mode is GuestMode.OFF:
            return None
        for v in range(len(self.ref.cpus)):
            op = SetMode(v, mode, BOOT_ROOT)
            try:
                div = self._op(-1, op)
            except _ModelCrash as crash:
                div = self._crash(-1, op, crash, self._mode_at(v))
            if div is not None:
                return div
        return self._compare_state(-1, SetMode(0, mode, BOOT_ROOT), "boot")

    def run(self) -> Outcome:
        try:
            div = self.boot()
            if div is not None:
                self.outcome.divergence = div
                return self.outcome
            for i, op in enumerate(self.program.ops):
                if self.step(i, op) is not None:
                    break
            else:
                if self.observe is not None:
                    self.observe.end(self._machine("feedback"), self.ref)
        except (Unsupported, OutsideContract) as exc:
            self.outcome.skipped = str(exc)
        return self.outcome

    def step(self, i: int, op: Op) -> Divergence | None:
        """Run op number ``i`` on both machines (after ``boot``); a stateful driver that builds
        its program as it goes calls this directly."""
        mode = self._mode_at(_op_vcpu(op))
        try:
            div = self._interleave(i, op) if isinstance(op, Interleave) else self._op(i, op)
        except _ModelCrash as crash:
            div = self._crash(i, op, crash, mode)
        self.outcome.ops_run = i + 1
        if div is None:
            div = self._compare_state(i, op, mode)
        if div is not None:
            self.outcome.divergence = div
        elif self.observe is not None:
            self.observe(op, self._machine("feedback"), self.ref)
        return div

    # -- one op

    def _model(self, step: Step) -> Observation:
        if self.explain is not None and self.explain[0] == self.outcome.steps_run:
            self.outcome.view = self.explain[1](self._machine("explain"), self.ref, step)
        try:
            got = step.on_model(self.model)
            if not isinstance(got, Observation):
                raise TypeError(f"the model returned {type(got).__name__}, not an Observation")
            return got
        except (_ModelCrash, Unsupported):  # a step at an interleave point; a skip
            raise
        except Exception as exc:  # an exception in the model is an outcome
            raise _ModelCrash(step, exc) from exc

    def _op(self, i: int, op: Op) -> Divergence | None:
        outcome = self.outcome
        for step in lower(op, self.ref):
            # The mode a divergence is signed with is the one before the step; an access
            # never changes it, so for accesses (most steps) it is read only on a divergence.
            access = type(step) is AccessStep
            mode = None if access else self._mode_at(step.vcpu)
            got = self._model(step)
            ok, expected = step.on_ref(self.ref, got)
            if self.tracing:
                self._traced(i, step, got, expected, ok)
            outcome.steps_run += 1
            if not ok:
                outcome.div_step = outcome.steps_run - 1
                if access:
                    mode = self._mode_at(step.vcpu)
                return self._step_divergence(i, op, step, expected, got, mode)
        return None

    def _interleave(self, i: int, op: Interleave) -> Divergence | None:
        first = lower(op.first, self.ref)
        second = [s for o in op.second for s in lower(o, self.ref)]
        m = self._machine("an interleave point")
        second_got: list[Observation] = []
        ran_at: list[int] = []  # how many of the first op's steps had completed then

        def hook(point: Point, vcpu: object) -> None:
            if point is not op.point:
                return
            m.kvm.hook = None
            if self._can_run_at(point, vcpu, second):
                ran_at.append(len(first_got))
                second_got.extend(self._model(s) for s in second)

        first_got: list[Observation] = []
        m.kvm.hook = hook
        try:
            for s in first:
                first_got.append(self._model(s))
                self.outcome.steps_run += 1
        finally:
            m.kvm.hook = None
        if not second_got:
            for s in second:
                second_got.append(self._model(s))
                self.outcome.steps_run += 1
        else:
            self.outcome.steps_run += len(second)
        # The reference: the first op then the second, or the second then the first, or, when
        # the second ran inside step k of a first op of several steps (a map: stores, then a
        # CR3 reload), the first op's steps before k, the second, then the rest; one order
        # must explain every outcome and the state both ops leave behind.
        a, b = list(zip(first, first_got, strict=True)), list(zip(second, second_got,
                                                                  strict=True))
        # The order the model took comes first: the executor keeps the first order that
        # explains this op, and a later op may need the one the model really ran. A second
        # op run inside the first op's first step ran before that step took effect, except
        # at a memslot update's publish point, which comes after the new memslots are in.
        before = bool(ran_at) and ran_at[0] == 0 and op.point is not Point.MEMSLOT_PUBLISH
        orders = [b + a, a + b] if before else [a + b, b + a]
        if ran_at and 0 < ran_at[0] < len(a):
            k = ran_at[0]
            orders.insert(0, a[:k] + b + a[k:])
        walked = first[ran_at[0]] if ran_at and op.point in _AFTER_WALK else None
        if isinstance(walked, AccessStep):
            # The access had translated (and set A flags) before the second part ran, then
            # completed after it: through that translation or, retried, a new one.
            k = ran_at[0]
            orders.append([*a[:k], (SpeculativeWalk(walked), DONE), *b, *a[k:]])
        mode = self._mode_at(first[0].vcpu if first else None)
        attempts: list[tuple[Divergence, list[TraceEntry]]] = []
        breach: OutsideContract | None = None
        for order in orders:
            r = self.ref.copy()
            div: Divergence | None = None
            log: list[TraceEntry] = []
            try:
                for step, got in order:
                    ok, expected = step.on_ref(r, got)
                    if self.tracing:  # the texts cost more than the step
                        log.append(TraceEntry(i, step.text, str(got), str(expected), ok))
                    if not ok:
                        div = self._step_divergence(i, op, step, expected, got,
                                                    self._mode_at(step.vcpu))
                        break
            except OutsideContract as exc:  # another order may stay inside it
                breach = breach or exc
                r.release()
                continue
            if div is None:
                div = self._state_divergence(r, i, op, mode)
            if div is None:
                self.ref.release()
                self.ref = r
                if self.tracing:
                    self.outcome.trace.extend(log)
                return None
            r.release()
            attempts.append((div, log))
        if breach is not None:  # no order both explains the model and stays inside it
            raise breach
        div, log = attempts[0]
        if self.tracing:
            self.outcome.trace.extend(log)
        return div

    def _can_run_at(self, point: Point, vcpu: object, steps: list[Step]) -> bool:
        """What can happen while a vCPU is at ``point`` inside KVM: another vCPU runs guest
        code; the host zaps or migrates (mmu_lock is not held there). Inside mmu_lock only a
        store that needs no exit gets through; memslot updates wait for the SRCU readers of the
        fault path; the same vCPU cannot run anything else. What cannot run now runs after."""
        faulting = getattr(vcpu, "id", None)
        for step in steps:
            if step.vcpu == faulting:
                return False
            if step.kind == "memslot":
                return False
            if point.locked and not (isinstance(step, AccessStep)
                                     and self._machine("mmu_lock").completes_without_exit(
                                         step.vcpu, step.gva, step.akind, step.cpl, step.ac)):
                return False
        return True

    # -- divergences

    def _traced(self, i: int, step: Step, got: Observation, expected: Observation, ok: bool
                ) -> None:
        self.outcome.trace.append(TraceEntry(i, step.text, str(got), str(expected), ok))

    def _mode_at(self, v: int | None) -> ModeAt:
        return None if v is None or v == NO_VCPU else self.ref.regs(v)

    def _step_divergence(self, i: int, op: Op, step: Step, expected: Observation,
                         got: Observation, mode: ModeAt) -> Divergence:
        kind = classify(expected, got)
        return Divergence(kind, i, format_op(op), step.text, str(expected), str(got),
                          make_signature(kind, step.kind, _mode_label(mode),
                                         outcome_class(expected), outcome_class(got)))

    def _crash(self, i: int, op: Op, crash: _ModelCrash, mode: ModeAt) -> Divergence:
        exc = crash.exc
        where = traceback.extract_tb(exc.__traceback__)[-1]
        actual = f"{type(exc).__name__}: {exc} (at {where.name}, {where.filename.split('/')[-1]}:"\
                 f"{where.lineno})"
        return Divergence(DivergenceKind.MODEL_CRASH, i, format_op(op), crash.step.text,
                          "no exception", actual,
                          make_signature(DivergenceKind.MODEL_CRASH, crash.step.kind,
                                         _mode_label(mode), "-",
                                         f"{type(exc).__name__}@{where.name}"))

    def _compare_state(self, i: int, op: Op, mode: ModeAt) -> Divergence | None:
        div = self._state_divergence(self.ref, i, op, mode)
        if div is not None:
            return div
        self.model.phys.backing.settle()
        self.ref.phys.backing.settle()
        if self.audit:
            from fuzzmmu.oracle.audit import audit  # the audit is optional per run

            violations = audit(self._machine("the structural audit"))
            if violations:
                v0 = violations[0]
                return Divergence(DivergenceKind.AUDIT_VIOLATION, i, format_op(op),
                                  v0.invariant, "no violation", v0.message,
                                  make_signature(DivergenceKind.AUDIT_VIOLATION, op.KIND,
                                                 _mode_label(mode), v0.invariant, v0.kind))
        return None

    def _state_divergence(self, r: ReferenceMachine, i: int, op: Op, mode: ModeAt
                          ) -> Divergence | None:
        """Registers, then the frames either side wrote since the last comparison."""
        m = self.model
        # The common case first, for the model through its own types (through the
        # TargetMachine protocol the compiled code looks each attribute up by name).
        if not (isinstance(m, Machine) and _model_regs_match(m, r)):
            for v, rc in enumerate(r.cpus):
                mc = m.vcpus[v]
                if mc.dead and rc.dead:
                    continue  # a shut-down vCPU's registers are not observable
                got = (*m.regs(v), tuple(mc.mmu.pdptrs), mc.dead)
                want = (*r.regs(v), tuple(rc.pdptrs), rc.dead)
                if got != want:
                    return Divergence(DivergenceKind.STATE_MISMATCH, i, format_op(op),
                                      f"cpu{v}", _regs_str(want), _regs_str(got),
                                      make_signature(DivergenceKind.STATE_MISMATCH, op.KIND,
                                                     _mode_label(mode), "regs", "regs"))
        mm, rm = m.phys.backing, r.phys.backing
        if not (all(mm.same_frame(rm, f) for f in mm.dirty)
                and all(f in mm.dirty or mm.same_frame(rm, f) for f in rm.dirty)):
            differing = {f for f in mm.dirty | rm.dirty if not mm.same_frame(rm, f)}
            # the access may have used a cached translation
            if r.forgo_optional_walk(differing):
                return self._state_divergence(r, i, op, mode)
            # the lowest frame that differs names the divergence
            return self._memory_divergence(r, i, op, mode, min(differing))
        r.optional.clear()  # what the comparison accepted is final
        return None

    def _memory_divergence(self, r: ReferenceMachine, i: int, op: Op, mode: ModeAt, pfn: int
                           ) -> Divergence:
        mm, rm = self.model.phys.backing, r.phys.backing
        base = pfn << PAGE_SHIFT
        diffs = []
        ad_only = True
        for off in range(0, 4096, 4):
            a, b = mm.read(base + off, 4), rm.read(base + off, 4)
            if a != b:
                diffs.append((off, b, a))
                # Only a present entry's A/D bits are ever set by a walk (SDM 4.8): a word
                # with P clear, or any other bit changed, is plain memory.
                ad_only = ad_only and not (a ^ b) & ~0x60 and bool(a & b & 1)
        kind = DivergenceKind.AD_MISMATCH if ad_only else DivergenceKind.MEMORY_MISMATCH
        off, want, got = diffs[0]
        where = f"frame {pfn:#x} offset {off:#x}"
        more = f" (+{len(diffs) - 1} more words)" if len(diffs) > 1 else ""
        return Divergence(kind, i, format_op(op), where, f"{want:#010x}", f"{got:#010x}{more}",
                          make_signature(kind, op.KIND, _mode_label(mode), "memory", "memory"))


def _model_regs_match(m: Machine, r: ReferenceMachine) -> bool:
    """Whether every vCPU of the model has the reference's registers (a shut-down vCPU's are
    not observable)."""
    for v, rc in enumerate(r.cpus):
        mc = m.vcpus[v]
        if mc.dead and rc.dead:
            continue
        if not (mc.cr0 == rc.cr0 and mc.cr3 == rc.cr3 and mc.cr4 == rc.cr4
                and mc.efer == rc.efer and mc.smm == rc.smm and mc.dead == rc.dead
                and tuple(mc.mmu.pdptrs) == rc.pdptrs):
            return False
    return True


def _regs_str(regs: tuple) -> str:
    cr0, cr3, cr4, efer, smm, pdptrs, dead = regs
    return (f"cr0={cr0:#x} cr3={cr3:#x} cr4={cr4:#x} efer={efer:#x} smm={smm} "
            f"pdptrs={[hex(p) for p in pdptrs]}{' shut down' if dead else ''}")


def run(program: Program, bugs: Iterable[str] = (), *, audit: bool = False,
        trace: bool = False, explain: tuple[int, Explainer] | None = None,
        observe: Observer | None = None, target: Target = MODEL) -> Outcome:
    """Run ``program`` on model and reference; the Outcome holds the first divergence.
    ``explain=(k, f)`` calls ``f(model, reference, step)`` just before the k-th step runs;
    ``observe`` looks at both machines after every op they agree on (an Observer);
    ``target`` replaces the model by another machine under test (Outcome.skipped says why it
    could not run the program, if so)."""
    try:
        executor = Executor(program, bugs, audit=audit, trace=trace, explain=explain,
                            observe=observe, target=target)
    except Unsupported as exc:  # the target refused the program before it ran
        return Outcome(program, BugSet(bugs).ids, skipped=str(exc))
    try:
        return executor.run()
    finally:
        executor.model.destroy()  # nothing else holds either machine
        executor.ref.release()

