"""State feedback: features of what KVM's shadow MMU did and of the state it left, for the
campaign to use as coverage (IJON-style: the state a bug needs is not a line of code).

After every op both machines agree on, the observer records small integer features derived
from KVM's structure, never from the bug catalog:

- the KVM path the op took: which of KVM's decision counters moved (fuzzmmu.model.mmu.stats,
  the same names KVM_GET_STATS_FD reports: how a fault ended, whether a shadowed table was
  written and how KVM took the write, whether a page went unsync), with the op kind and the
  guest's paging mode; and each counter's change, bucketed, with the op kind;
- pairs of consecutive paths (edges in event space, as AFL has edges in code);
- after an op that made or zapped shadow pages (and once at the end of the program), the
  shape of the shadow state: per gfn, how many live shadow pages, of which levels, direct or
  indirect, in which address spaces, under how many roles, write-tracked or not; per shadow
  page its role bits (those of the guest's control registers too), whether it is unsync or
  leads to unsync pages, and how many parents link it (a table shared by parents with
  different rights counts those rights); a gfn write-tracked in one address space and mapped
  by leaf sptes in the other, writable or not; the vCPUs' MMIO caches (valid, generation
  current, cached in this address space); roots that went obsolete.

Counts inside a feature are bucketed as AFL buckets hit counts (1, 2, 3, 4-7, 8-15, ...). A
feature is a tuple of small ints, its first the family; the harness folds its hash
(deterministic across processes: no strings) onto a block of libFuzzer counters, each
counter hit once per program whatever the number of times its features occurred (see
CounterMap.report).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Final, Protocol

from fuzzmmu.arch.bits import CR0_PG, CR4_PAE, EFER_LMA
from fuzzmmu.model.machine import Machine
from fuzzmmu.model.mmu import spte as S
from fuzzmmu.model.mmu.internal import Point
from fuzzmmu.model.mmu.role import (
    CR0_WP,
    CR4_PSE,
    EFER_NX,
    LONG_MODE,
    SMAP_ANDNOT_WP,
    SMEP_ANDNOT_WP,
)
from fuzzmmu.model.mmu.stats import STAT_NAMES
from fuzzmmu.oracle.reference import ReferenceMachine
from fuzzmmu.program.ops import SIMPLE_OPS, Interleave, Op, SetMode

# Feature families: the first element of every feature tuple.
PATH, STAT, EDGE, GFN, PAGE, SHARED, TRACKED, MMIO_CACHE, ROOT = range(1, 10)
# Their names on the dashboard and in the campaign's statistics.
FAMILIES: Final = {PATH: "path", STAT: "stat", EDGE: "edge", GFN: "gfn", PAGE: "page",
                   SHARED: "shared", TRACKED: "tracked", MMIO_CACHE: "mmio-cache", ROOT: "root"}

# Counters that mean the shape of the shadow state changed: pages made or zapped, shadowed
# tables written, MMIO sptes made, pages gone unsync or synced. (A fixed fault alone only adds
# a leaf spte; looking at the whole state after each of those would cost a quarter of the
# run.)
_STATE_MOVING: Final = sum(1 << STAT_NAMES.index(name) for name in (
    "pf_mmio_spte_created", "mmu_shadow_zapped", "mmu_pte_write", "mmu_recycled",
    "mmu_cache_miss", "mmu_unsync"))

# The counters whose set names the path an op took: where a fault ended (kvm_mmu_page_fault()'s
# RET_PF_* and the #PF for the guest), an MMIO spte made, a shadowed table written and what
# kvm_mmu_track_write() made of it (a PDE written, the page zapped as flooded or misaligned), a
# page gone unsync. The others (pf_taken, TLB flushes, pages made or zapped, emulated
# instructions...) follow from these or from the program's length and still count as STAT
# features; in the path they would multiply it: the set of all 17 counters gave 15,000
# distinct paths and 24,000 distinct edges in 30,000 random programs, still growing, so that
# almost every program looked new and the features of the shadow state collided with them on
# the counters (these nine: 2,900 and 1,600).
_DECISIONS: Final = sum(1 << STAT_NAMES.index(name) for name in (
    "pf_fixed", "pf_emulate", "pf_spurious", "pf_guest", "pf_mmio_spte_created",
    "mmu_pte_write", "mmu_pde_zapped", "mmu_flooded", "mmu_unsync"))

# The role bits that come from the guest's control registers (kvm_calc_cpu_role()): which
# guest context a shadow page was built for. Pages of the same gfn, level and access built
# under another context are other pages, or, where the role misses a bit, the same one.
_ROLE_CONTEXT: Final = EFER_NX | CR0_WP | SMEP_ANDNOT_WP | SMAP_ANDNOT_WP | CR4_PSE | LONG_MODE

# Op kinds as small ints; an interleave counts as a kind per concurrency point.
_OP_KIND: Final = {cls: k for k, cls in enumerate(SIMPLE_OPS, 1)}
_INTERLEAVE_KIND: Final = {point: 100 + k for k, point in enumerate(Point)}


def bucket(n: int) -> int:
    """AFL's hit-count buckets: 0, 1, 2, 3, then one per power of two."""
    return n if n < 4 else 2 + n.bit_length()


def _mode(model: Machine, vcpu: int) -> int:
    c = model.vcpus[vcpu]
    paging = 0 if not c.cr0 & CR0_PG else 3 if c.efer & EFER_LMA else 2 if c.cr4 & CR4_PAE \
        else 1
    return paging | (c.smm << 2)


def _kind(op: Op) -> int:
    if isinstance(op, Interleave):
        return _INTERLEAVE_KIND[op.point]
    return _OP_KIND[type(op)]


Feature = tuple[int, ...]


class StateFeedback:
    """The observer of one run (``run(..., observe=fb)``); ``features`` lists what it saw, a
    feature once per occurrence."""

    __slots__ = ("features", "prev_path", "prev_stats")

    def __init__(self) -> None:
        self.features: list[Feature] = []
        self.prev_stats: tuple[int, ...] | None = None
        self.prev_path = 0

    def __call__(self, op: Op, model: Machine, ref: ReferenceMachine) -> None:
        stats = model.kvm.stat.values()
        prev = self.prev_stats
        self.prev_stats = stats
        if prev is None:  # the first op: what boot left is nobody's path
            prev = (0,) * len(stats)
        add = self.features.append
        kind = _kind(op)
        first = op.first if isinstance(op, Interleave) else op
        vcpu = getattr(first, "vcpu", None)
        mode = _mode(model, vcpu) if vcpu is not None else 15
        moved = 0
        for k, (now, before) in enumerate(zip(stats, prev, strict=True)):
            if now != before:
                moved |= 1 << k
                add((STAT, kind, k, bucket(now - before)))
        path = moved & _DECISIONS
        add((PATH, kind, mode, path))
        add((EDGE, self.prev_path, path))
        self.prev_path = path
        if moved & _STATE_MOVING or isinstance(op, SetMode):
            self._shadow_state(model)

    def end(self, model: Machine, ref: ReferenceMachine) -> None:
        """The state the program leaves (links made by ops that created nothing, say a second
        parent of a table, show here)."""
        self._shadow_state(model)

    def _shadow_state(self, model: Machine) -> None:
        add = self.features.append
        kvm = model.kvm
        slots = kvm.memslots
        for gfn, sps in kvm.page_hash.items():
            levels = kinds = spaces = 0
            roles = set()
            live = 0
            for sp in sps:
                if kvm.is_obsolete_sp(sp):
                    continue
                live += 1
                levels |= 1 << sp.level
                kinds |= 2 if sp.direct else 1
                spaces |= 1 << sp.smm
                roles.add(sp.role)
                parents = sp.parent_ptes
                add((PAGE, sp.level, sp.direct, sp.access, sp.quadrant, sp.has_4_byte_gpte,
                     sp.smm, bucket(len(parents)), sp.root_count > 0, sp.unsync,
                     bucket(sp.unsync_children), sp.role & _ROLE_CONTEXT))
                if len(parents) > 1:
                    rights = {psp.sptv[i] & (S.SPTE_W | S.SPTE_U | S.SPTE_NX)
                              for psp, i in parents}
                    add((SHARED, sp.level, sp.direct, len(rights)))
            if not live:
                continue
            tracked = 0
            for as_id, space in enumerate(slots.by_gfn):
                slot = space.get(gfn)
                if slot is not None and gfn in kvm.slot_arch[slot].write_track:
                    tracked |= 1 << as_id
            add((GFN, bucket(live), levels, kinds, spaces, min(len(roles), 4), tracked))
            if tracked:
                for as_id, space in enumerate(slots.by_gfn):
                    slot = space.get(gfn)
                    rmap = kvm.slot_arch[slot].rmap.get(gfn) if slot is not None else None
                    if rmap:
                        writable = sum(1 for sp, i in rmap if sp.sptv[i] & S.SPTE_W)
                        add((TRACKED, tracked, as_id, bucket(len(rmap)),
                                  bucket(writable)))
        for vcpu in model.vcpus:
            cached = vcpu.mmio_gva != 0 or vcpu.mmio_gfn != 0
            if cached:
                add((MMIO_CACHE, vcpu.smm, vcpu.mmio_smm == vcpu.smm,
                          vcpu.match_mmio_gen(), vcpu.mmio_gva != 0))
            root = kvm.root_to_sp(vcpu.mmu.root_hpa) if vcpu.mmu.root_hpa >= 0 else None
            add((ROOT, vcpu.smm, -1 if root is None else root.level,
                      root is not None and kvm.is_obsolete_sp(root),
                      root is not None and root.direct))


class CounterHooks(Protocol):
    """What Atheris offers its own instrumentation (the ``atheris`` module)."""

    def _reserve_counter(self) -> int: ...

    def _trace_branch(self, index: int) -> None: ...


class CounterMap:
    """A block of libFuzzer coverage counters that features fold onto, through the hooks
    Atheris's own instrumentation calls, so libFuzzer treats a feature like an edge. Atheris
    swaps its hooks when fuzzing starts (before that, reserved counters are only pending and
    a hit goes nowhere), so ``_trace_branch`` is looked up at each report, never kept."""

    def __init__(self, hooks: CounterHooks, size: int = 1 << 15,
                 census: Path | None = None) -> None:
        """With ``census`` (a directory), how many counters each family has hit so far is
        written there about once a second, as features-PID.json, for the campaign's dashboard
        and statistics (the counters themselves live in this process)."""
        if size & (size - 1):
            raise ValueError("the counter block's size must be a power of two")
        self.hooks = hooks
        self.counters = [hooks._reserve_counter() for _ in range(size)]
        self.mask = size - 1
        self.hit_once = bytearray(size)
        self.per_family = [0] * (max(FAMILIES) + 1)
        self.census = census / f"features-{os.getpid()}.json" if census is not None else None
        self._next_census = 0.0

    def report(self, features: Iterable[Feature]) -> None:
        """Hit the counter of each feature the program had, once: libFuzzer buckets a
        counter's hits per run, so a program that did what others did, only more often,
        looked new and was kept (2,307 of the 5,333 programs a 60-s campaign kept had no
        feature the earlier ones lacked), and the corpus spread the mutations thin."""
        counters, mask, hit = self.counters, self.mask, self.hooks._trace_branch
        hit_once = self.hit_once
        seen = {hash(f) & mask: f[0] for f in features}
        for i, fam in seen.items():
            hit(counters[i])
            if not hit_once[i]:  # a counter's first hit: count it for its family
                hit_once[i] = 1
                self.per_family[fam] += 1
        if self.census is not None and time.monotonic() >= self._next_census:
            self._next_census = time.monotonic() + 1
            self.write_census(self.census)

    def families(self) -> dict[str, int]:
        """Counters hit so far, per feature family (features that fold onto one counter count
        once, as libFuzzer sees them)."""
        return {name: self.per_family[fam] for fam, name in FAMILIES.items()}

    def write_census(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.families()))
            os.replace(tmp, path)  # a reader never sees half a file
        except OSError:
            pass  # the census is for people watching; the campaign goes on without it


def read_census(directory: Path) -> dict[str, int]:
    """The campaign's state features per family: the largest count any target process wrote
    (in fork mode each child counts from the corpus it was started with)."""
    out: dict[str, int] = {}
    try:
        paths = list(directory.glob("features-*.json"))
    except OSError:
        return out
    for path in paths:
        try:
            counts = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # gone, or not one of ours
        if not isinstance(counts, dict):
            continue
        for name, n in counts.items():
            if isinstance(name, str) and isinstance(n, int):
                out[name] = max(out.get(name, 0), n)
    return out
