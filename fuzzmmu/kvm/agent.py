"""The guest agent: a small system region outside the world, and the code that performs one
guest operation per request.

Physical memory: AGENT_PAGES pages at AGENT_GPA, in a memslot of their own, far above the
world's frames, outside every target a program can name (fuzzmmu/program/world.py) and below
the smallest MAXPHYADDR (36). An entry a program assembles byte by byte could still point
there; the KVM machine refuses (Unsupported) an access whose walk reaches the agent.

Virtual memory: the agent's pages at AGENT_VA, reached through entry
AGENT_PML4_INDEX of every root a program can load. That entry is the only agent word inside the
world; no program op writes that slot of any frame (the world's table slots and store offsets
stay below byte 0x820 or start at 0xC00 of a frame), it is present with A already set, so neither
the guest nor KVM's walker ever writes it, and the KVM target hides it from the memory
comparison.

Each vCPU has its own code, IDT, TSS, kernel, IST and user stacks; the GDT is shared. The code
is per-operation templates, entered at CPL0 with the registers the host sets through the
sync-register area of kvm_run (RIP, RSP, RDI: the address, RSI: the value, R8-R10: what an
IRETQ frame needs), and ended by HLT: without an in-kernel local APIC, KVM returns a HLT to
userspace (KVM_EXIT_HLT) with the instruction complete, so the host may set the registers of
the next operation at once (an I/O exit would leave KVM a completion to run at the next
KVM_RUN, which moves RIP). The address after each HLT tells the host which one it was.

* A CPL0 template does its one instruction (a load, a store, INVLPG, MOV CR0/CR3/CR4, WRMSR
  EFER), then HLT.
* CPL3 operations go through IRETQ (``to_user``) to a user template: the access, then UD2,
  whose #UD brings the vCPU back to CPL0 (INT n is not usable on this host, and OUT at CPL3
  faults: docs/kvm-target.md). A fetch is an IRETQ to the address itself with EFLAGS.TF set,
  so that a single-step #DB follows the first instruction there (SDM Vol. 3B §18.3.1.4: a TF
  loaded by IRET traps after the instruction at the return address); every general register
  is first set to a non-canonical value so that whatever the fetched bytes encode faults
  instead of reaching memory.
* Every exception vector 0-31 has a stub, through an interrupt gate with IST1 (a known stack
  whatever the CPL and RSP were): a HLT of its own. The stubs change no register, so the host
  reads the faulting operation's result and, from the IST stack, the exception frame.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass, field

from iced_x86 import Code, Instruction, MemoryOperand
from iced_x86 import Register as R

from fuzzmmu.kvm.asm import Asm

PAGE = 4096
# Four distinct address bytes, so that neither a target nor a repeated seed byte (0xSSSSSSSS)
# nor a large page of one reaches it.
AGENT_GFN = 0xFA5C30
AGENT_GPA = AGENT_GFN * PAGE
AGENT_PAGES = 32
AGENT_PML4_INDEX = 300
AGENT_VA = 0xFFFF_0000_0000_0000 | (AGENT_PML4_INDEX << 39)
AGENT_LINK_OFFSET = AGENT_PML4_INDEX * 8  # where the link sits in a root frame
# The agent's tables are P|W|U|A (links) and P|W|U|A|D (pages): U because CPL3 code and stacks
# live there too; A and D set so that no walk ever writes them.
LINK_FLAGS = 0x27
PAGE_FLAGS = 0x67
AGENT_LINK = AGENT_GPA | LINK_FLAGS  # the PML4E; its PDPT is the agent's first page

# Agent pages (index from AGENT_GPA / AGENT_VA).
_PDPT, _PD, _PT, _GDT, _TSS = 0, 1, 2, 3, 4
_IDT = (6, 7)
_CODE = (8, 10)  # two pages each
_KSTACK = (12, 16)
_IST = (13, 17)
_USTACK = (14, 18)
_SCRATCH = (15, 19)

# GDT selectors (SDM Vol. 3A, "TSS Descriptor in 64-bit mode": it takes two slots).
KCODE, KDATA, UCODE, UDATA = 0x08, 0x10, 0x18 | 3, 0x20 | 3
TSS_SEL = (0x28, 0x38)
GDT_LIMIT = 9 * 8 - 1

DONE = -1  # what AgentCode.exits says of a template's own HLT
VECTORS_WITH_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
POISON = 0x8000_0000_DEAD_B000  # non-canonical; its low half is a VA no program maps
RFLAGS_FIXED = 0x2
RFLAGS_TF = 0x100


def va(page: int, offset: int = 0) -> int:
    return AGENT_VA + page * PAGE + offset


def gpa(page: int, offset: int = 0) -> int:
    return AGENT_GPA + page * PAGE + offset


@dataclass(frozen=True)
class VcpuLayout:  # the properties are small: callers on hot paths keep what they need
    """Where vCPU ``index``'s parts of the agent are."""

    index: int

    @property
    def tss(self) -> int:
        return _TSS * PAGE + self.index * 0x100

    @property
    def idt(self) -> int:
        return _IDT[self.index] * PAGE

    @property
    def code(self) -> int:
        return _CODE[self.index] * PAGE

    @property
    def kstack_top(self) -> int:  # VA
        return va(_KSTACK[self.index] + 1)

    @property
    def ist_top(self) -> int:  # VA
        return va(_IST[self.index] + 1)

    @property
    def ist_top_offset(self) -> int:  # offset into the agent image
        return (_IST[self.index] + 1) * PAGE

    @property
    def ustack_top(self) -> int:
        return va(_USTACK[self.index] + 1) - 64

    @property
    def scratch_top(self) -> int:
        return va(_SCRATCH[self.index] + 1) - 256


_READ = {1: Code.MOVZX_R32_RM8, 2: Code.MOVZX_R32_RM16, 4: Code.MOV_R32_RM32,
         8: Code.MOV_R64_RM64}
_READ_DST = {1: R.EAX, 2: R.EAX, 4: R.EAX, 8: R.RAX}
_WRITE = {1: (Code.MOV_RM8_R8, R.SIL), 2: (Code.MOV_RM16_R16, R.SI),
          4: (Code.MOV_RM32_R32, R.ESI), 8: (Code.MOV_RM64_R64, R.RSI)}
_POISONED = (R.RBX, R.RCX, R.RDX, R.RSI, R.RDI, R.RBP, R.R8, R.R9, R.R10, R.R11, R.R12, R.R13,
             R.R14, R.R15)


@dataclass
class AgentCode:
    """One vCPU's assembled code: entry points by name; for each user access template the
    address of its access instruction and of the UD2 that follows it; each exception stub's
    address by vector; and ``exits``: RIP after each HLT of the agent -> DONE or the
    vector."""

    code: bytes
    entry: dict[str, int] = field(default_factory=dict)
    access_at: dict[str, int] = field(default_factory=dict)
    ud2_at: dict[str, int] = field(default_factory=dict)
    stubs: dict[int, int] = field(default_factory=dict)
    exits: dict[int, int] = field(default_factory=dict)


def _assemble(layout: VcpuLayout) -> AgentCode:
    a = Asm(va(_CODE[layout.index]))
    entry: dict[str, int] = {}
    access_at: dict[str, int] = {}
    ud2_at: dict[str, int] = {}
    stubs: dict[int, int] = {}
    exits: dict[int, int] = {}

    def done() -> None:
        exits[a.hlt() + 1] = DONE

    for vector in range(32):
        stubs[vector] = a.hlt()
        exits[stubs[vector] + 1] = vector
    entry["ping"] = a.here
    done()
    for width, code in _READ.items():
        entry[f"k_read{width}"] = a.emit(Instruction.create_reg_mem(
            code, _READ_DST[width], MemoryOperand(R.RDI)))
        done()
    for width, (code, src) in _WRITE.items():
        entry[f"k_write{width}"] = a.emit(Instruction.create_mem_reg(
            code, MemoryOperand(R.RDI), src))
        done()
    entry["invlpg"] = a.emit(Instruction.create_mem(Code.INVLPG_M, MemoryOperand(R.RDI)))
    done()
    for cr, reg in (("cr0", R.CR0), ("cr3", R.CR3), ("cr4", R.CR4)):
        entry[f"mov_{cr}"] = a.emit(Instruction.create_reg_reg(Code.MOV_CR_R64, reg, R.RDI))
        done()
    entry["wrmsr_efer"] = a.emit(Instruction.create_reg_u32(Code.MOV_R32_IMM32, R.ECX,
                                                            0xC000_0080))
    a.emit(Instruction.create_reg_reg(Code.MOV_R32_RM32, R.EAX, R.EDI))
    a.mov_reg(R.RDX, R.RDI)
    a.emit(Instruction.create_reg_i32(Code.SHR_RM64_IMM8, R.RDX, 32))
    a.emit(Instruction.create(Code.WRMSR))
    done()

    def iret_frame(ss: int, cs: int) -> None:
        # SDM Vol. 3A §6.14.3: IRETQ pops RIP, CS, RFLAGS, RSP, SS.
        a.push_imm(ss)
        a.push(R.R8)  # RSP
        a.push(R.R10)  # RFLAGS
        a.push_imm(cs)
        a.push(R.R9)  # RIP

    def poison() -> None:
        a.mov_imm64(R.RAX, POISON)
        for reg in _POISONED:
            a.mov_reg(reg, R.RAX)

    entry["to_user"] = a.here
    iret_frame(UDATA, UCODE)
    a.emit(Instruction.create(Code.IRETQ))
    entry["to_user_poisoned"] = a.here
    iret_frame(UDATA, UCODE)
    poison()
    a.emit(Instruction.create(Code.IRETQ))
    entry["to_kernel_poisoned"] = a.here
    iret_frame(0, KCODE)  # a null SS is allowed for an IRETQ to CPL0 in 64-bit mode
    poison()
    a.emit(Instruction.create(Code.IRETQ))
    for width, code in _READ.items():
        name = f"u_read{width}"
        access_at[name] = a.emit(Instruction.create_reg_mem(code, _READ_DST[width],
                                                            MemoryOperand(R.RDI)))
        ud2_at[name] = a.emit(Instruction.create(Code.UD2))
    for width, (code, src) in _WRITE.items():
        name = f"u_write{width}"
        access_at[name] = a.emit(Instruction.create_mem_reg(code, MemoryOperand(R.RDI), src))
        ud2_at[name] = a.emit(Instruction.create(Code.UD2))
    blob = a.code()
    if len(blob) > 2 * PAGE:
        raise AssertionError(f"agent code is {len(blob)} bytes, more than its two pages")
    return AgentCode(blob, entry, access_at, ud2_at, stubs, exits)


@functools.cache
def agent_code(index: int) -> AgentCode:
    """vCPU ``index``'s code, assembled once per process."""
    return _assemble(VcpuLayout(index))


def _tss_descriptor(base: int) -> tuple[int, int]:
    limit = 0x67
    low = (limit & 0xFFFF) | (base & 0xFFFFFF) << 16 | 0xB << 40 | 1 << 47 | (
        (limit >> 16) & 0xF) << 48 | ((base >> 24) & 0xFF) << 56
    return low, base >> 32


def _gate(offset: int) -> tuple[int, int]:
    """A 64-bit interrupt gate to ``offset`` in KCODE, DPL0, IST1 (SDM Vol. 3A §6.14.1)."""
    low = (offset & 0xFFFF) | KCODE << 16 | 1 << 32 | 0x8E << 40 | ((offset >> 16) & 0xFFFF) << 48
    return low, offset >> 32


@functools.cache
def agent_image(vcpus: int) -> bytes:
    """The agent's memory as it is before the first KVM_RUN."""
    img = bytearray(AGENT_PAGES * PAGE)

    def q(off: int, value: int) -> None:
        struct.pack_into("<Q", img, off, value)

    q(_PDPT * PAGE, gpa(_PD) | LINK_FLAGS)
    q(_PD * PAGE, gpa(_PT) | LINK_FLAGS)
    for i in range(AGENT_PAGES):
        q(_PT * PAGE + 8 * i, gpa(i) | PAGE_FLAGS)
    gdt = _GDT * PAGE
    q(gdt + KCODE, 0x00AF_9B00_0000_FFFF)  # 64-bit code, DPL0, accessed
    q(gdt + KDATA, 0x00CF_9300_0000_FFFF)
    q(gdt + (UCODE & ~3), 0x00AF_FB00_0000_FFFF)  # 64-bit code, DPL3
    q(gdt + (UDATA & ~3), 0x00CF_F300_0000_FFFF)
    for v in range(vcpus):
        layout = VcpuLayout(v)
        low, high = _tss_descriptor(AGENT_VA + layout.tss)
        q(gdt + TSS_SEL[v], low)
        q(gdt + TSS_SEL[v] + 8, high)
        q(layout.tss + 4, layout.ist_top)  # RSP0
        q(layout.tss + 0x24, layout.ist_top)  # IST1
        struct.pack_into("<H", img, layout.tss + 0x66, 0x68)  # no I/O bitmap
        code = agent_code(v)
        img[layout.code:layout.code + len(code.code)] = code.code
        for vector, stub in code.stubs.items():
            low, high = _gate(stub)
            q(layout.idt + 16 * vector, low)
            q(layout.idt + 16 * vector + 8, high)
    return bytes(img)
