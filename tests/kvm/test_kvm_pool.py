"""The pooled KVM target (fuzzmmu.kvm.pool): a VM reset in place runs a program as a fresh one
does, whatever ran on it before, and the pool reuses its VMs, makes a fresh one every N
programs and never reuses one that a run failed on (skipped with the reason where /dev/kvm is
unusable)."""

from __future__ import annotations

import random
import signal
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from fuzzmmu.arch.bits import PagingMode
from fuzzmmu.kvm.device import KvmError
from fuzzmmu.kvm.guest import Guest
from fuzzmmu.kvm.machine import KvmMachine
from fuzzmmu.kvm.pool import GuestPool, PoolStats, new_guest
from fuzzmmu.kvm.support import random_supported_program, random_unsync_program
from fuzzmmu.kvm.target import KVM, pooled
from fuzzmmu.oracle.executor import Outcome, run
from fuzzmmu.program.files import read_program
from fuzzmmu.program.ops import Program
from fuzzmmu.program.text import parse_program
from fuzzmmu.world.layout import DIRECT_MAP, DM_LINK

pytestmark = pytest.mark.usefixtures("kvm")

PROGRAMS = Path(__file__).with_name("programs")

# Programs that leave a VM far from fresh: memslots created, moved and deleted (and frames
# outside the default memslots written), the shadow-page limit changed and shadow pages
# recycled and zapped, faults of every kind at both CPLs, CR0.WP and EFER.NXE left changed.
DISTURBERS = [parse_program(text) for text in (
    """config boot=4level mmu-pages=64
map cpu0 root=current current 0x1000 -> 0x5 P|W|U|A|D level=1 upper=W|U|A pool=0x8
write cpu0 0x1000+0x0 width=8 cpl=3 seed=0x11
memslot as=0 slot=2 create base=0x30 npages=8 hva=0x40
map cpu0 root=current current 0x8000 -> 0x30 P|W|U|A|D level=1 upper=W|U|A pool=0x8
write cpu0 0x8000+0x8 width=8 cpl=3 seed=0x22
read cpu1 0x8000+0x8 width=8 cpl=0
memslot as=0 slot=2 move base=0x40
read cpu0 0x8000+0x8 width=8 cpl=3
memslot as=0 slot=3 create base=0x30 npages=4 hva=0x44
write cpu0 0x8000+0x10 width=8 cpl=0 seed=0x33
memslot as=0 slot=1 delete
read cpu0 0x1000+0x0 width=8 cpl=3
""",
    """config boot=4level mmu-pages=20
map cpu0 root=current current 0x1000 -> 0x5 P|W|U|A|D level=1 upper=W|U|A pool=0x8
map cpu0 root=current current 0x40000000 -> 0x6 P|W|U|A|D level=1 upper=W|U|A pool=0x10
map cpu1 root=current current 0x8080000000 -> 0x7 P|U|A|D level=1 upper=W|U|A pool=0x18
read cpu0 0x1000+0x0 width=8 cpl=3
read cpu0 0x40000000+0x0 width=8 cpl=3
read cpu1 0x8080000000+0x0 width=8 cpl=3
write cpu1 0x8080000000+0x0 width=8 cpl=3 seed=0x44
mmu-pages 16
read cpu0 0x1000+0x0 width=8 cpl=3
zap-all
mmu-pages 2000
write cpu0 0x40000000+0x8 width=8 cpl=3 seed=0x55
""",
    """config boot=4level
map cpu0 root=current current 0x1000 -> 0x5 P|U|A level=1 upper=W|U|A pool=0x8
write cpu0 0x1000+0x0 width=8 cpl=3 seed=0x66
set cpu0 nxe=1
map cpu0 root=current current 0x8000 -> 0x6 P|W|U|A|D|NX level=1 upper=W|U|A pool=0x8
fetch cpu0 0x8000+0x0 width=1 cpl=3
set cpu0 nxe=0
read cpu0 0x8000+0x0 width=8 cpl=3
read cpu0 0x1ff000+0x0 width=8 cpl=0
set cpu1 wp=0
write cpu1 0xffffff80c0008000+0x0 width=8 cpl=3 seed=0x77
""")]
# Accesses at CPL3 and CPL0 of the hot addresses, mapped in no program's initial tables: on a
# fresh VM they fault; a shadow page or a TLB entry left by an earlier program would not. One
# per MAXPHYADDR of the random programs (one VM each).
PROBES = [parse_program(f"config boot=4level maxphyaddr={m}\n" + "".join(
    f"{kind} cpu{v} {va:#x}+0x0 width=8 cpl={cpl}\n" for v in (0, 1)
    for va in (0x1000, 0x201000, 0x4000_1000, 0x80_8020_1000) for kind in ("read", "write")
    for cpl in (3, 0))) for m in (40, 36, 46)]


def outcome(o: Outcome) -> tuple[object, ...]:
    d = o.divergence
    return (o.skipped, o.ops_run, o.steps_run,
            None if d is None else (d.kind, d.op_index, d.signature))


@pytest.fixture(scope="module")
def programs() -> list[Program]:
    """Random supported programs (some working on their own last-level table), the programs
    of tests/kvm/programs/ (this host's confirmed deviations of KVM diverge), and the
    disturbers."""
    return [*(random_supported_program(random.Random(s)) for s in range(120)),
            *(random_unsync_program(random.Random(s), 12) for s in range(24)),
            *(read_program(path) for path in sorted(PROGRAMS.glob("*.txt"))), *DISTURBERS,
            *PROBES]


@pytest.fixture
def pool() -> Iterator[GuestPool]:
    p = GuestPool()
    yield p
    p.clear()


def test_an_outcome_does_not_depend_on_what_ran_before_on_the_vm(
        programs: list[Program], pool: GuestPool) -> None:
    """Every program gives on a reused VM the outcome it gives on a fresh one, in two orders:
    each followed by the probe of its MAXPHYADDR; and backwards, with the disturbers (which
    leave memslots, the shadow-page limit, faults and control bits changed) and the probes
    run again before every fourth program."""
    fresh = [outcome(run(p, target=KVM)) for p in programs]
    assert sum(o[3] is not None for o in fresh) >= 3 and sum(not o[0] for o in fresh) >= 100
    probe = {p.header.maxphyaddr: programs.index(p) for p in PROBES}
    forwards = [j for i, p in enumerate(programs) for j in (i, probe.get(p.header.maxphyaddr))
                if j is not None]
    backwards: list[int] = []
    for k, i in enumerate(reversed(range(len(programs)))):
        if k % 4 == 0:
            backwards += [programs.index(d) for d in (*DISTURBERS, *PROBES)]
        backwards.append(i)
    target = pooled(pool)
    for order in (forwards, backwards):
        differ = [i for i in order if outcome(run(programs[i], target=target)) != fresh[i]]
        assert differ == []
    assert pool.stats.reused > 3 * len(programs) and pool.stats.failed_resets == 0


def test_a_translation_kvm_built_does_not_outlive_the_reset(pool: GuestPool) -> None:
    """The reset writes guest page tables from the host although KVM_RUN has run: KVM must
    have dropped every shadow page built from the old tables. The second program's CPL3 read
    through a mapping only the first program made faults (a surviving spte would read frame
    5), on the very VM the first one ran on; mapped again, frame 5 has its bytes back."""
    target = pooled(pool)
    first = parse_program("config boot=4level\n"
                          "map cpu0 root=current current 0x1000 -> 0x5 P|W|U|A|D level=1 "
                          "upper=W|U|A pool=0x8\n"
                          "write cpu0 0x1000+0x0 width=8 cpl=3 seed=0x5a\n"
                          "read cpu0 0x1000+0x0 width=8 cpl=3\n")
    second = parse_program("config boot=4level\nread cpu0 0x1000+0x0 width=8 cpl=3\n"
                           "map cpu0 root=current current 0x1000 -> 0x5 P|W|U|A|D level=1 "
                           "upper=W|U|A pool=0x8\n"
                           "read cpu0 0x1000+0x0 width=8 cpl=3\n")
    assert run(first, target=target).divergence is None
    o = run(second, target=target, trace=True)
    assert o.divergence is None and not o.skipped
    assert [str(t.model) for t in o.trace if t.step.startswith("access")] == [
        "#PF cr2=0x1000 error=0x4 (U)", "RAM hpa=0x5000 value=0x0"]
    assert pool.stats == PoolStats(created=1, reused=1)


class _Recording(GuestPool):
    """A pool that notes every VM it hands out."""

    def __init__(self, fresh_every: int) -> None:
        super().__init__(fresh_every)
        self.handed: list[Guest] = []

    def take(self, maxphyaddr: int) -> Guest:
        self.handed.append(super().take(maxphyaddr))
        return self.handed[-1]


def test_the_pool_reuses_a_vm_and_makes_a_fresh_one_every_n_programs() -> None:
    pool = _Recording(fresh_every=3)
    seen = pool.handed
    program = parse_program("config boot=4level\nread cpu0 0xffffff80c0008000+0x0 cpl=3\n")
    try:
        for _ in range(7):
            assert run(program, target=pooled(pool)).divergence is None
        assert [seen.index(g) for g in seen] == [0, 0, 0, 3, 3, 3, 6]
        assert seen[0].vm is None and seen[6].vm is not None  # the first retired, closed
        assert pool.stats == PoolStats(created=3, reused=4, retired=2)
    finally:
        pool.clear()


def _booted(pool: GuestPool) -> KvmMachine:
    """A machine from ``pool`` with vCPU 0 booted on the boot root by the VMM, and `jmp $` in
    frame 5."""
    machine = KvmMachine(parse_program("config boot=4level\n"), pool)
    g = machine.guest
    off, _, value = DM_LINK[PagingMode.LONG4]
    struct.pack_into("<Q", g.memory, 0x1000 + off, value)
    g.memory[0x5000:0x5002] = b"\xeb\xfe"
    g.boot(0, 0x8001_0001, 0x1000, 0x20, 0x500)
    machine._sync()
    return machine


def test_a_vm_a_run_hung_on_is_closed_not_reused(pool: GuestPool) -> None:
    machine = _booted(pool)
    g = machine.guest
    g.run_timeout = 0.2
    r = g.run_op(0, "to_kernel_poisoned", r9=DIRECT_MAP + 0x5000, r8=g.layouts[0].scratch_top,
                 r10=0x2)  # jmp $, no TF: the watchdog ends it
    assert r.end == "hang" and g.spoiled
    machine.destroy()
    assert g.vm is None
    fresh = pool.take(40)
    fresh.close()
    assert fresh is not g and pool.stats == PoolStats(created=2)


@pytest.mark.parametrize("left", ["a dead vCPU", "a dead VM", "unseen guest writes",
                                  "a failed reset"])
def test_a_vm_left_in_doubt_is_closed_not_reused(pool: GuestPool, left: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    machine = _booted(pool)
    g = machine.guest
    if left == "a dead vCPU":
        machine.vcpus[1].dead = True
    elif left == "a dead VM":
        machine.dead = "KVM_EXIT_INTERNAL_ERROR"
    elif left == "unseen guest writes":
        g.run_op(0, "k_write8", rdi=DIRECT_MAP + 0x6000, rsi=1)  # no _sync after it
    else:
        def fail(*args: object) -> None:
            raise KvmError("KVM_SET_USER_MEMORY_REGION failed")

        monkeypatch.setattr(g, "reset", fail)
    machine.destroy()
    assert g.vm is None
    assert pool.stats.failed_resets == (left == "a failed reset")
    assert not pool.stats.reused


def test_an_idle_pool_leaves_sigprof_as_it_found_it(pool: GuestPool) -> None:
    before = signal.getsignal(signal.SIGPROF)
    program = parse_program("config boot=4level\nread cpu0 0xffffff80c0008000+0x0 cpl=0\n")
    assert run(program, target=pooled(pool)).divergence is None
    assert pool.stats == PoolStats(created=1)
    assert signal.getsignal(signal.SIGPROF) is before


def test_a_reset_vm_is_what_a_fresh_one_is(pool: GuestPool) -> None:
    """After the disturbers, the VM the pool hands out has the world's memory, the agent's,
    the default memslots and, per vCPU, the special registers and the (empty) sync-register
    area of a fresh VM."""
    for program in DISTURBERS:
        assert not run(program, target=pooled(pool)).skipped
    reused, fresh = pool.take(40), new_guest(40)
    try:
        assert pool.stats.reused == len(DISTURBERS)
        assert reused.memory[:] == fresh.memory[:] and reused.agent[:] == fresh.agent[:]
        assert reused.world_slots == fresh.world_slots and not reused.ran
        for a, b in zip(reused.vcpus, fresh.vcpus, strict=True):
            assert bytes(a.get_sregs()) == bytes(b.get_sregs())
            assert bytes(a.kvm_run.s) == bytes(b.kvm_run.s) == bytes(len(bytes(a.kvm_run.s)))
    finally:
        reused.close()
        fresh.close()
