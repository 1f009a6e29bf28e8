"""The text form of programs: one op per line, round-tripping exactly with Program.

    config policy=zap mmio-gen-bits=19 maxphyaddr=40 mmu-pages=2000 boot=4level
    map cpu0 root=current current 0x1000 -> 0x5 P|W|U|A|D level=1 upper=W|U|A pool=0x8
    read cpu0 0x1000+0x8 width=8 cpl=3
    interleave at=faultin
      read cpu0 0x1000+0x0 width=8 cpl=0
      zap-all

``#`` starts a comment. Numbers are hex or decimal; addresses, slots, frames and offsets must
be among the world's (fuzzmmu.program.world), so every text program has a binary form.
"""

from __future__ import annotations

from fuzzmmu.model.mmu.internal import Point
from fuzzmmu.program import world as W
from fuzzmmu.program.codec import MAX_OPS, MAX_SECOND, STORE_OFFSET_INDEX
from fuzzmmu.program.ops import (
    FLAG_BITS,
    MAP_FORMATS,
    UPPER_FLAGS,
    Access,
    CrBit,
    Entry,
    Extra,
    GuestMode,
    Header,
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
from fuzzmmu.world.memslots import MemslotChange
from fuzzmmu.world.observe import AccessKind

FORMAT_LINE = "# fuzzmmu program v1"


class ProgramSyntaxError(ValueError):
    def __init__(self, line: int, message: str) -> None:
        self.line = line
        super().__init__(f"line {line}: {message}")


# ---------------------------------------------------------------------- formatting


def format_entry(e: Entry) -> str:
    extra = "" if e.extra is Extra.NONE else f" {e.extra.value}"
    return f"-> {e.target:#x} {e.flags_str()}{extra}"


def format_op(op: Op) -> str:
    if isinstance(op, Access):
        parts = [op.kind.value, f"cpu{op.vcpu}", f"{op.va:#x}+{op.offset:#x}",
                 f"width={op.width}", f"cpl={op.cpl}"]
        if op.ac:
            parts.append("ac")
        if op.kind is AccessKind.WRITE:
            parts.append(f"seed={op.seed:#x}")
        return " ".join(parts)
    if isinstance(op, WritePte):
        return (f"pte cpu{op.vcpu} table={op.table:#x} index={op.index} {format_entry(op.entry)}"
                f" width={op.width}")
    if isinstance(op, Map):
        upper = "|".join(n for n, b in FLAG_BITS.items() if op.upper & b) or "0"
        root = "current" if op.root is None else f"{op.root:#x}"
        fmt = "current" if op.fmt is None else op.fmt.value
        return (f"map cpu{op.vcpu} root={root} {fmt} {op.va:#x} "
                f"{format_entry(op.entry)} level={op.level} upper={upper} pool={op.pool:#x}")
    if isinstance(op, Store):
        return (f"store cpu{op.vcpu} frame={op.frame:#x} offset={op.offset:#x} width={op.width} "
                f"{format_entry(op.entry)}")
    if isinstance(op, SetMode):
        return f"mode cpu{op.vcpu} {op.mode.value} root={op.root:#x}"
    if isinstance(op, LoadCr3):
        return f"cr3 cpu{op.vcpu} root={op.root:#x}"
    if isinstance(op, SetBit):
        return f"set cpu{op.vcpu} {op.bit.value}={int(op.on)}"
    if isinstance(op, Invlpg):
        return f"invlpg cpu{op.vcpu} {op.va:#x}"
    if isinstance(op, (Smi, Rsm)):
        return f"{op.KIND} cpu{op.vcpu}"
    if isinstance(op, Memslot):
        head = f"memslot as={op.as_id} slot={op.slot} {op.change.value}"
        if op.change is MemslotChange.CREATE:
            return f"{head} base={op.base:#x} npages={op.npages} hva={op.hva:#x}"
        if op.change is MemslotChange.MOVE:
            return f"{head} base={op.base:#x}"
        return head
    if isinstance(op, ZapAll):
        return "zap-all"
    if isinstance(op, Migrate):
        return f"migrate as={op.as_id} gfn={op.gfn:#x}"
    if isinstance(op, (Shrink, MmuPages)):
        return f"{op.KIND} {op.count}"
    if isinstance(op, Interleave):
        return "\n  ".join([f"interleave at={op.point.value}", format_op(op.first),
                            *(format_op(o) for o in op.second)])
    raise TypeError(f"not an op: {op!r}")


def format_header(h: Header) -> str:
    return (f"config policy={h.policy} mmio-gen-bits={h.mmio_gen_bits} "
            f"maxphyaddr={h.maxphyaddr} mmu-pages={h.mmu_pages} boot={h.boot.value}")


def format_program(p: Program) -> str:
    return "\n".join([FORMAT_LINE, format_header(p.header)] + [format_op(op) for op in p.ops]
                     ) + "\n"


# ---------------------------------------------------------------------- parsing


class _Line:
    """The tokens of one line: positional words and key=value settings."""

    def __init__(self, number: int, text: str) -> None:
        self.number = number
        self.words: list[str] = []
        self.keys: dict[str, str] = {}
        for tok in text.split():
            key, eq, value = tok.partition("=")
            if eq:
                if key in self.keys:
                    raise ProgramSyntaxError(number, f"{key} given twice")
                self.keys[key] = value
            else:
                self.words.append(tok)
        if not self.words:
            raise ProgramSyntaxError(number, "a line must start with an operation name")

    def fail(self, message: str) -> ProgramSyntaxError:
        return ProgramSyntaxError(self.number, message)

    def word(self, i: int, what: str) -> str:
        if i >= len(self.words):
            raise self.fail(f"missing {what}")
        return self.words[i]

    def int_key(self, key: str, default: int | None = None) -> int:
        if key not in self.keys:
            if default is None:
                raise self.fail(f"missing {key}=")
            return default
        return self.to_int(self.keys.pop(key), key)

    def to_int(self, text: str, what: str) -> int:
        try:
            return int(text, 0)
        except ValueError:
            raise self.fail(f"{what} must be a number, not {text!r}") from None

    def choice(self, value: int, allowed: tuple[int, ...] | dict[int, int], what: str) -> int:
        if value not in allowed:
            raise self.fail(f"{what} {value:#x} is not one of the world's")
        return value

    def done(self, used_words: int) -> None:
        if self.keys:
            raise self.fail(f"unknown setting {next(iter(self.keys))}=")
        if len(self.words) > used_words:
            raise self.fail(f"unexpected {self.words[used_words]!r}")

    def vcpu(self, i: int = 1) -> int:
        w = self.word(i, "cpu0 or cpu1")
        if w not in ("cpu0", "cpu1"):
            raise self.fail(f"expected cpu0 or cpu1, not {w!r}")
        return int(w[3])

    def enum(self, cls: type, text: str, what: str):
        for member in cls:
            if member.value == text:
                return member
        choices = ", ".join(m.value for m in cls)
        raise self.fail(f"unknown {what} {text!r} (one of: {choices})")


def _parse_entry(ln: _Line, start: int) -> tuple[Entry, int]:
    """``-> TARGET FLAGS [EXTRA]`` starting at word ``start``; returns the entry and the index
    of the next word."""
    if ln.word(start, "->") != "->":
        raise ln.fail("expected -> before the entry")
    target = ln.choice(ln.to_int(ln.word(start + 1, "target frame"), "target"), W.TARGET_INDEX,
                       "target frame")
    flags = 0
    text = ln.word(start + 2, "flags")
    if text != "0":
        for name in text.split("|"):
            if name not in FLAG_BITS:
                raise ln.fail(f"unknown flag {name!r} (flags: {', '.join(FLAG_BITS)})")
            flags |= FLAG_BITS[name]
    extra = Extra.NONE
    nxt = start + 3
    if nxt < len(ln.words) and ln.words[nxt] in {e.value for e in Extra}:
        extra = ln.enum(Extra, ln.words[nxt], "extra")
        nxt += 1
    return Entry(target, flags, extra), nxt


def _parse_va(ln: _Line, text: str) -> tuple[int, int]:
    base, plus, off = text.partition("+")
    va = ln.to_int(base, "address")
    if va not in W.VA_INDEX:
        raise ln.fail(f"address {va:#x} is not one of the world's")
    return va, ln.to_int(off, "offset") if plus else 0


def _parse_op(ln: _Line) -> Op:
    kind = ln.words[0]
    if kind in ("read", "write", "fetch"):
        vcpu = ln.vcpu()
        va, offset = _parse_va(ln, ln.word(2, "address"))
        width = ln.choice(ln.int_key("width", 8), W.WIDTHS, "width")
        if offset not in {min(o, 4096 - width) for o in W.OFFSETS}:
            raise ln.fail(f"offset {offset:#x} is not one of the world's")
        cpl = ln.int_key("cpl", 0)
        if cpl not in (0, 3):
            raise ln.fail("cpl must be 0 or 3")
        ac = "ac" in ln.words[3:]
        seed = ln.int_key("seed", 0)
        if kind != "write" and seed:
            raise ln.fail("only a write has a seed")
        if not 0 <= seed < 256:
            raise ln.fail("seed must be 0..255")
        ln.done(4 if ac else 3)
        return Access(vcpu, AccessKind(kind), va, offset, width, cpl, ac, seed)
    if kind == "pte":
        vcpu = ln.vcpu()
        table = ln.choice(ln.int_key("table"), tuple(range(64)), "table frame")
        index = ln.int_key("index")
        width = ln.int_key("width", 8)
        if width not in (4, 8):
            raise ln.fail("a pte is 4 or 8 bytes wide")
        if index not in {s % (4096 // width) for s in W.SLOTS}:
            raise ln.fail(f"index {index} is not one of the world's slots")
        entry, nxt = _parse_entry(ln, 2)
        ln.done(nxt)
        return WritePte(vcpu, table, index, entry, width)
    if kind == "map":
        vcpu = ln.vcpu()
        root: int | None = None
        if ln.keys.get("root") == "current":
            del ln.keys["root"]
        else:
            root = ln.choice(ln.int_key("root"), tuple(r for r in W.MAP_ROOTS if r),
                             "root frame")
        fmt: GuestMode | None = None
        if ln.word(2, "table format") != "current":
            fmt = ln.enum(GuestMode, ln.words[2], "table format")
            if fmt not in MAP_FORMATS:
                raise ln.fail("map builds current, 32bit, pae or 4level tables")
        va, offset = _parse_va(ln, ln.word(3, "address"))
        if offset:
            raise ln.fail("map takes a page address")
        entry, nxt = _parse_entry(ln, 4)
        if entry.flags & FLAG_BITS["PS"]:
            raise ln.fail("a map sets PS itself from its level")
        level = ln.int_key("level", 1)
        if level not in ((1, 2, 3) if fmt in (GuestMode.LONG4, None) else (1, 2)):
            raise ln.fail(f"level {level} does not exist in {fmt.value if fmt else ''} tables")
        upper = 0
        text = ln.keys.pop("upper", "0")
        for name in ([] if text == "0" else text.split("|")):
            if FLAG_BITS.get(name) not in UPPER_FLAGS:
                raise ln.fail(f"upper entries take W, U, A or NX, not {name!r}")
            upper |= FLAG_BITS[name]
        pool = ln.choice(ln.int_key("pool"), W.POOLS, "pool frame")
        ln.done(nxt)
        return Map(vcpu, root, fmt, va, entry, level, upper, pool)
    if kind == "store":
        vcpu = ln.vcpu()
        frame = ln.choice(ln.int_key("frame"), tuple(range(64)), "frame")
        offset = ln.int_key("offset")
        width = ln.choice(ln.int_key("width"), W.WIDTHS, "width")
        if offset not in {min(o, 4096 - width) for o in STORE_OFFSET_INDEX}:
            raise ln.fail(f"offset {offset:#x} is not one of the world's store offsets")
        entry, nxt = _parse_entry(ln, 2)
        ln.done(nxt)
        return Store(vcpu, frame, offset, width, entry)
    if kind == "mode":
        vcpu = ln.vcpu()
        mode = ln.enum(GuestMode, ln.word(2, "mode"), "mode")
        root = ln.choice(ln.int_key("root"), W.ROOTS, "root frame")
        ln.done(3)
        return SetMode(vcpu, mode, root)
    if kind == "cr3":
        vcpu = ln.vcpu()
        root = ln.choice(ln.int_key("root"), W.ROOTS, "root frame")
        ln.done(2)
        return LoadCr3(vcpu, root)
    if kind == "set":
        vcpu = ln.vcpu()
        if len(ln.keys) != 1:
            raise ln.fail("set takes one bit=0|1")
        name, value = next(iter(ln.keys.items()))
        bit = ln.enum(CrBit, name, "control bit")
        ln.keys.clear()
        if value not in ("0", "1"):
            raise ln.fail(f"{name} must be 0 or 1")
        ln.done(2)
        return SetBit(vcpu, bit, value == "1")
    if kind == "invlpg":
        vcpu = ln.vcpu()
        va, offset = _parse_va(ln, ln.word(2, "address"))
        if offset:
            raise ln.fail("invlpg takes a page address")
        ln.done(3)
        return Invlpg(vcpu, va)
    if kind in ("smi", "rsm"):
        vcpu = ln.vcpu()
        ln.done(2)
        return Smi(vcpu) if kind == "smi" else Rsm(vcpu)
    if kind == "memslot":
        as_id = ln.choice(ln.int_key("as"), (0, 1), "address space")
        slot = ln.choice(ln.int_key("slot"), (0, 1, 2, 3), "slot")
        change = ln.enum(MemslotChange, ln.word(1, "create, delete or move"), "change")
        if change is MemslotChange.CREATE:
            base = ln.choice(ln.int_key("base"), W.SLOT_BASES, "base gfn")
            npages = ln.choice(ln.int_key("npages"), W.SLOT_SIZES, "size")
            hva = ln.choice(ln.int_key("hva"), W.SLOT_HVAS, "host page")
            ln.done(2)
            return Memslot(as_id, slot, change, base, npages, hva)
        if change is MemslotChange.MOVE:
            base = ln.choice(ln.int_key("base"), W.SLOT_BASES, "base gfn")
            ln.done(2)
            return Memslot(as_id, slot, change, base)
        ln.done(2)
        return Memslot(as_id, slot, change)
    if kind == "zap-all":
        ln.done(1)
        return ZapAll()
    if kind == "migrate":
        as_id = ln.choice(ln.int_key("as"), (0, 1), "address space")
        gfn = ln.choice(ln.int_key("gfn"), tuple(range(64)), "gfn")
        ln.done(1)
        return Migrate(as_id, gfn)
    if kind in ("shrink", "mmu-pages"):
        table = W.SHRINK_COUNTS if kind == "shrink" else W.MAX_PAGES
        count = ln.choice(ln.to_int(ln.word(1, "count"), "count"), table, "count")
        ln.done(2)
        return Shrink(count) if kind == "shrink" else MmuPages(count)
    raise ln.fail(f"unknown operation {kind!r}")


def _parse_header(ln: _Line) -> Header:
    policy = ln.keys.pop("policy", "zap")
    if policy not in ("zap", "update"):
        raise ln.fail("policy must be zap or update")
    header = Header(policy,
                    ln.choice(ln.int_key("mmio-gen-bits", 19), W.MMIO_GEN_BITS, "mmio-gen-bits"),
                    ln.choice(ln.int_key("maxphyaddr", 40), W.MAXPHYADDRS, "maxphyaddr"),
                    ln.choice(ln.int_key("mmu-pages", 2000), W.MMU_PAGES, "mmu-pages"),
                    ln.enum(GuestMode, ln.keys.pop("boot", "off"), "boot mode"))
    ln.done(1)
    return header


def parse_program(text: str) -> Program:
    """Parse the text form; raises ProgramSyntaxError with the line number."""
    header = Header()
    ops: list[Op] = []
    lines = [(n, raw.split("#", 1)[0].rstrip()) for n, raw in enumerate(text.splitlines(), 1)]
    lines = [(n, t) for n, t in lines if t.strip()]
    i = 0
    records = 0
    while i < len(lines):
        n, t = lines[i]
        if t[0].isspace():
            raise ProgramSyntaxError(n, "an indented line must follow an interleave")
        ln = _Line(n, t)
        if ln.words[0] == "config":
            if ops:
                raise ln.fail("config must come before the operations")
            header = _parse_header(ln)
            i += 1
            continue
        if ln.words[0] == "interleave":
            point = ln.enum(Point, ln.keys.pop("at", ""), "interleave point")
            ln.done(1)
            parts = []
            j = i + 1
            while j < len(lines) and lines[j][1][0].isspace():
                inner = _Line(lines[j][0], lines[j][1])
                if inner.words[0] == "interleave":
                    raise inner.fail("an interleave cannot contain an interleave")
                parts.append(_parse_op(inner))
                j += 1
            if not 2 <= len(parts) <= 1 + MAX_SECOND:
                raise ln.fail(f"interleave needs its op and 1 to {MAX_SECOND} indented ops "
                              "to run at its point")
            ops.append(Interleave(point, parts[0], tuple(parts[1:])))
            records += 1 + len(parts)
            i = j
            continue
        ops.append(_parse_op(ln))
        records += 1
        i += 1
    if records > MAX_OPS:
        raise ProgramSyntaxError(lines[-1][0], f"more than {MAX_OPS} op records")
    return Program(header, tuple(ops))
