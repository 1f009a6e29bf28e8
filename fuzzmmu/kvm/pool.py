"""Prepared VMs of the world, and a per-process pool of them reset in place between programs.

A fresh VM (``new_guest``: /dev/kvm, the VM, its vCPUs, the agent, the world's memory and
memslots) costs about ten times what resetting a used one does (``Guest.reset``: the frames
the last program changed, a memslot deleted and re-added, which drops every shadow page, the
world's memslots put back, the vCPUs' registers). ``GuestPool`` keeps one idle VM per
MAXPHYADDR (the CPUID of a vCPU cannot change after its first KVM_RUN) and makes a fresh one
every ``fresh_every`` programs, and whenever a program left its VM in doubt (the caller does
not give it back: a run that hung or failed, a dead vCPU) or a reset failed.

KVM keeps state that no ioctl resets (the emulator's retry address, statistics, the
memslot generation, which grows by each memslot update): a program's outcome on a reused VM
is meant to be the one a fresh VM gives (tests/kvm/test_kvm_pool.py checks it), and the paths
that reproduce a finding run on a fresh VM (fuzzmmu.kvm.target.KVM) all the same.
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from fuzzmmu.kvm.agent import AGENT_LINK, AGENT_LINK_OFFSET, PAGE
from fuzzmmu.kvm.device import KvmError
from fuzzmmu.kvm.guest import Guest, WorldSlot
from fuzzmmu.program.world import ROOTS
from fuzzmmu.world.layout import BACKING_FRAMES, DEFAULT_SLOTS, new_world
from fuzzmmu.world.observe import mmio_read_value

NUM_VCPUS = 2
AGENT_ROOTS = sorted(set(ROOTS))  # every frame a program can load into CR3
# Programs one VM runs before it is closed: a fresh VM costs ~1.5 ms, so beyond a few hundred
# the reuse gains nothing more; it also bounds what a VM carries from program to program
# (the memslot generation grows with every memslot update: two per reset, and the program's).
FRESH_EVERY = 500
# The world's memslots of address space 0 (address space 1 is SMM's, which this host lacks).
WORLD_SLOTS = tuple(WorldSlot(s.slot_id, s.base_gfn, s.npages, s.hva)
                    for s in DEFAULT_SLOTS if s.as_id == 0)


@functools.cache
def world_image() -> bytes:
    """The world's memory as every program starts on it: new_world()'s, with the agent's
    PML4E linked into every root a program can load (written by the host: only before the
    first KVM_RUN, or after a reset)."""
    mem = bytearray(new_world()[0].array.tobytes())
    for root in AGENT_ROOTS:
        struct.pack_into("<Q", mem, root * PAGE + AGENT_LINK_OFFSET, AGENT_LINK)
    assert len(mem) == BACKING_FRAMES * PAGE
    return bytes(mem)


def new_guest(maxphyaddr: int) -> Guest:
    """A fresh VM with the world's memory and memslots, its vCPUs' CPUID giving
    ``maxphyaddr`` (ValueError when it is above the host's), not yet run."""
    guest = Guest(BACKING_FRAMES, NUM_VCPUS, mmio_read_value)
    try:
        guest.set_cpuid(maxphyaddr)
        guest.memory[:] = world_image()
        for s in WORLD_SLOTS:
            guest.map_world(s.slot, s.gfn, s.npages, s.host_page)
    except BaseException:
        guest.close()
        raise
    return guest


@dataclass
class PoolStats:
    """What a pool did (VMs the caller closed instead of giving back are not counted)."""

    created: int = 0  # fresh VMs made by ``take``
    reused: int = 0  # VMs ``take`` handed out again after a reset
    retired: int = 0  # VMs closed after ``fresh_every`` programs (or with one idle already)
    failed_resets: int = 0  # VMs closed because their reset failed


class GuestPool:
    """Idle VMs ready for a program, one per MAXPHYADDR. ``take`` hands one out (a fresh one
    when none is idle); ``give_back`` resets it in place and keeps it, unless it has run
    ``fresh_every`` programs. A VM that is not given back is the caller's to close."""

    def __init__(self, fresh_every: int = FRESH_EVERY) -> None:
        self.fresh_every = fresh_every
        self.stats = PoolStats()
        self._idle: dict[int, Guest] = {}

    def take(self, maxphyaddr: int) -> Guest:
        guest = self._idle.pop(maxphyaddr, None)
        if guest is None:
            guest = new_guest(maxphyaddr)
            self.stats.created += 1
        else:
            assert guest.vm is not None
            guest.vm.watchdog.install()
            self.stats.reused += 1
        guest.programs += 1
        return guest

    def give_back(self, guest: Guest, frames: Iterable[int]) -> None:
        """``guest`` ran a program and is fit to run another; ``frames`` are those of its world
        memory that changed since it was fresh."""
        if guest.programs >= self.fresh_every or guest.maxphyaddr in self._idle:
            self.stats.retired += 1
            guest.close()
            return
        try:
            guest.reset(world_image(), frames, WORLD_SLOTS)
        except KvmError:
            self.stats.failed_resets += 1
            guest.close()
            return
        assert guest.vm is not None
        guest.vm.watchdog.uninstall()  # SIGPROF is nobody's while no program runs
        self._idle[guest.maxphyaddr] = guest

    def clear(self) -> None:
        """Close every idle VM."""
        for guest in self._idle.values():
            guest.close()
        self._idle.clear()

    def _forget(self) -> None:
        # In a child after fork(): the VMs belong to the parent's address space (KVM refuses
        # ioctls from another mm); close the child's file descriptors and mappings only.
        self.clear()
        self.stats = PoolStats()


POOL = GuestPool()
os.register_at_fork(after_in_child=POOL._forget)
