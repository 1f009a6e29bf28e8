"""A linear assembler over iced-x86's encoder: instructions are encoded one after another at
known addresses, so that the agent can name the address of any instruction it emitted (the
host needs them to tell which instruction faulted or halted). The agent's code has no
branches, so no labels are needed."""

from __future__ import annotations

from iced_x86 import Code, Encoder, Instruction, Register_


class Asm:
    def __init__(self, base: int) -> None:
        self.base = base
        self.here = base
        self._code = bytearray()
        self._encoder = Encoder(64)

    def emit(self, instr: Instruction) -> int:
        """Encode ``instr`` at the current address; return that address."""
        at = self.here
        n = self._encoder.encode(instr, at)
        self._code += self._encoder.take_buffer()
        self.here += n
        return at

    def code(self) -> bytes:
        return bytes(self._code)

    # A few shorthands, named after the instruction they emit.

    def hlt(self) -> int:
        return self.emit(Instruction.create(Code.HLT))

    def push_imm(self, value: int) -> int:
        return self.emit(Instruction.create_i32(Code.PUSHQ_IMM8, value))

    def push(self, reg: Register_) -> int:
        return self.emit(Instruction.create_reg(Code.PUSH_R64, reg))

    def mov_imm64(self, reg: Register_, value: int) -> int:
        return self.emit(Instruction.create_reg_u64(Code.MOV_R64_IMM64, reg, value))

    def mov_reg(self, dst: Register_, src: Register_) -> int:
        return self.emit(Instruction.create_reg_reg(Code.MOV_R64_RM64, dst, src))
