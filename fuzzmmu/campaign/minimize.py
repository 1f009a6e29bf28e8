"""Structured minimization of a divergent program, keeping its divergence signature.

1. ddmin over the ops (Zeller's delta debugging), then inside interleaves: flatten them into
   plain ops, drop parts of their second group;
2. field simplification: every field of every op (the codec's mixed-radix digits) towards 0,
   flag sets towards fewer flags, the machine configuration towards the defaults;
3. repeated until nothing changes, then a last pass that removes each op alone, so the result
   is 1-minimal: removing any single op loses the divergence.

Every candidate is a Program (never raw bytes), run on the machine under test (the model, or
real KVM for a crash a KVM campaign found) and the reference; results are cached. A candidate
the target cannot run (skipped) does not keep the divergence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

from fuzzmmu.oracle.executor import MODEL, Target, run
from fuzzmmu.program.codec import decode_record, op_record, record_digits, record_from_digits
from fuzzmmu.program.ops import Header, Interleave, Op, Program


class NotDivergent(ValueError):
    """The program to minimize does not diverge."""


@dataclass
class MinimizeResult:
    program: Program
    signature: str
    ops_before: int
    ops_after: int
    runs: int
    exhausted: bool  # the run budget ran out before a fixpoint


class _Oracle:
    def __init__(self, bugs: Sequence[str], signature: str, budget: int,
                 progress: Callable[[int, int], None] | None, audit: bool,
                 target: Target) -> None:
        self.bugs = tuple(bugs)
        self.audit = audit
        self.target = target
        self.signature = signature
        self.budget = budget
        self.runs = 0
        self.cache: dict[Program, bool] = {}
        self.progress = progress
        self.best = 0

    def __call__(self, p: Program) -> bool:
        hit = self.cache.get(p)
        if hit is not None:
            return hit
        if self.runs >= self.budget:
            return False
        self.runs += 1
        d = run(p, self.bugs, audit=self.audit, target=self.target).divergence
        ok = d is not None and d.signature == self.signature
        self.cache[p] = ok
        if self.progress is not None:
            self.progress(self.runs, len(p.ops))
        return ok

    @property
    def exhausted(self) -> bool:
        return self.runs >= self.budget


def ddmin(items: list[Op], test: Callable[[list[Op]], bool]) -> list[Op]:
    n = 2
    while len(items) >= 2:
        size = -(-len(items) // n)
        chunks = [items[i:i + size] for i in range(0, len(items), size)]
        for chunk in chunks:
            if test(chunk):
                items, n = chunk, 2
                break
        else:
            for i in range(len(chunks)):
                rest = [op for j, c in enumerate(chunks) if j != i for op in c]
                if test(rest):
                    items, n = rest, max(n - 1, 2)
                    break
            else:
                if n >= len(items):
                    break
                n = min(2 * n, len(items))
    return items


def _interleave_variants(op: Interleave) -> list[list[Op]]:
    """Simpler stand-ins for an interleave, most aggressive first."""
    out: list[list[Op]] = [[op.first, *op.second], [*op.second, op.first]]
    if len(op.second) > 1:
        for i in range(len(op.second)):
            out.append([Interleave(op.point, op.first, op.second[:i] + op.second[i + 1:])])
    return out


def _field_variants(op: Op) -> list[Op]:
    """The op with one field made simpler: a digit lowered (0 first), one flag dropped."""
    if isinstance(op, Interleave):
        out: list[Op] = []
        for v in _field_variants(op.first):
            out.append(Interleave(op.point, v, op.second))
        for i, o in enumerate(op.second):
            for v in _field_variants(o):
                out.append(Interleave(op.point, op.first,
                                      (*op.second[:i], v, *op.second[i + 1:])))
        return out
    kind, digits = record_digits(op_record(op))
    out = []
    for i, (digit, radix) in enumerate(digits):
        candidates = [0] if digit else []
        candidates += [digit - 1] if digit > 1 else []
        # a flag set is a bit mask: also try dropping each set bit
        candidates += [digit & ~(1 << b) for b in range(radix.bit_length())
                       if digit >> b & 1 and (digit & ~(1 << b)) not in (0, digit - 1)]
        for c in candidates:
            new = list(digits)
            new[i] = (c, radix)
            variant = decode_record(record_from_digits(kind, new))
            if variant != op:
                out.append(variant)
    return out


def minimize(program: Program, bugs: Sequence[str] = (), *, max_runs: int = 3000,
             progress: Callable[[int, int], None] | None = None,
             audit: bool = False, target: Target = MODEL) -> MinimizeResult:
    """``audit``: candidates run with the structural audit, so that an audit violation (which
    only the audit sees) can be minimized too. ``target``: what candidates run on (the KVM
    target: a divergence of real KVM, minimized on real KVM)."""
    first = run(program, bugs, audit=audit, target=target).divergence
    if first is None:
        where = "(with these bugs)" if target is MODEL else f"on the {target.name} target"
        raise NotDivergent(f"the program does not diverge {where}")
    oracle = _Oracle(bugs, first.signature, max_runs, progress, audit, target)
    header = program.header
    ops = list(program.ops)

    def still(candidate: list[Op], h: Header | None = None) -> bool:
        # the header as simplified so far, read at each call (not bound once at the start)
        return oracle(Program(header if h is None else h, tuple(candidate)))

    changed = True
    while changed and not oracle.exhausted:
        changed = False
        smaller = ddmin(ops, still)
        if smaller != ops:
            ops, changed = smaller, True
        for i in range(len(ops)):
            op = ops[i] if i < len(ops) else None
            if isinstance(op, Interleave):
                for variant in _interleave_variants(op):
                    candidate = ops[:i] + variant + ops[i + 1:]
                    if still(candidate):
                        ops, changed = candidate, True
                        break
        i = 0
        while i < len(ops):
            for field_variant in _field_variants(ops[i]):
                candidate = [*ops[:i], field_variant, *ops[i + 1:]]
                if still(candidate):
                    ops, changed = candidate, True
                    break
            else:
                i += 1
        default = Header(boot=header.boot)
        for h in (Header(), default, *_header_steps(header)):
            if h != header and still(ops, h):
                header, changed = h, True
                break
    # 1-minimality: no single op can go
    i = 0
    while i < len(ops) and not oracle.exhausted:
        candidate = ops[:i] + ops[i + 1:]
        if still(candidate):
            ops = candidate
        else:
            i += 1
    return MinimizeResult(Program(header, tuple(ops)), first.signature, len(program.ops),
                          len(ops), oracle.runs, oracle.exhausted)


def _header_steps(h: Header) -> list[Header]:
    """The header with one setting back at its default (the boot mode stays)."""
    d = Header()
    return [replace(h, **{f.name: getattr(d, f.name)}) for f in fields(Header)
            if f.name != "boot"]
