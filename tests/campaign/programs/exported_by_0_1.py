"""Regression test exported by fuzzmmu from crashes/crash-misaligned.

The guest program below makes fuzzmmu's model of KVM's shadow MMU and the architectural x86
reference disagree: missing-fault at op 6 (access: read cpu0 0x1000 width=8 cpl=0). The
reference expects #PF cr2=0x1000 error=0x0 (0); the model gives RAM hpa=0x6000 value=0x0.

Signature: missing-fault:access/read:4level:#PF(0)->ram
Bugs enabled in the model: misaligned-pt-write-two-sptes

The test fails while the model behaves this way and passes once it is fixed.
"""

from fuzzmmu.oracle.executor import run
from fuzzmmu.program.text import parse_program

BUGS = ('misaligned-pt-write-two-sptes',)
SIGNATURE = 'missing-fault:access/read:4level:#PF(0)->ram'
PROGRAM = (
    '# fuzzmmu program v1\n'
    'config policy=zap mmio-gen-bits=19 maxphyaddr=40 mmu-pages=2000 boot=4level\n'
    'map cpu0 root=current current 0x0 -> 0x5 P|W|U|A|D level=1 upper=W|U|A pool=0x8\n'
    'map cpu0 root=current current 0x1000 -> 0x6 P|W|U|A|D level=1 upper=W|U|A pool=0x8\n'
    'read cpu0 0x0+0x0 width=8 cpl=0\n'
    'read cpu0 0x1000+0x0 width=8 cpl=0\n'
    'store cpu0 frame=0xa offset=0x4 width=8 -> 0x0 0\n'
    'invlpg cpu0 0x1000\n'
    'read cpu0 0x1000+0x0 width=8 cpl=0\n'
)


def test_exported_v010() -> None:
    outcome = run(parse_program(PROGRAM), BUGS)
    assert outcome.divergence is None, (
        f"{outcome.divergence.kind.value} at op {outcome.divergence.op_index}: "
        f"expected {outcome.divergence.expected}, got {outcome.divergence.actual} "
        f"[{outcome.divergence.signature}]")
