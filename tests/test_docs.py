"""The documents under docs/ stay in step with the code.

docs/bugs.md is the catalog of fuzzmmu/model/bugs.py rendered (``fuzzmmu bugs --markdown``).
Every document the code, the tests, the README and the documents cite exists in the
repository, and so does every numbered section they cite. The rule for a section sign: a
dotted number (4.10.2) or one right after "SDM"/"APM" ("APM Vol. 2 5") is a manual's section
and is not checked; any other number is a section of a document under docs/: of the document
named just before it on the same line, else (in a file under docs/) of that file itself, else
of the document the file named last before it. A document's sections are its headings
"## N. Title".
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fuzzmmu.cli import main
from fuzzmmu.model.bugs import catalog_markdown

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SELF = Path(__file__).resolve()

MD_PATH = re.compile(r"(?<![\w./-])([\w./-]+\.md)(?![\w-])")
DOCS_PATH = re.compile(r"docs/[\w.-]+\.md")
SECTION = re.compile(r"§(\d+(?:\.\d+)*)")
MANUAL_BEFORE = re.compile(r"(?:SDM|APM)(?:\s+Vol\.\s*\w+)?\s*$")
DOC_JUST_BEFORE = re.compile(r"(docs/[\w.-]+\.md)[`\s(]*$")
HEADING = re.compile(r"^#{1,6}\s+(\d+)\.\s", re.M)
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def scanned() -> list[Path]:
    """README.md, the documents, and the Python and program files of fuzzmmu/ and tests/."""
    files = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    for top in ("fuzzmmu", "tests"):
        files += sorted(p for p in (ROOT / top).rglob("*")
                        if p.suffix in (".py", ".txt") and p.is_file()
                        and "__pycache__" not in p.parts and p.resolve() != SELF)
    return files


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def sections(doc: Path) -> set[str]:
    return set(HEADING.findall(doc.read_text()))


def section_citations(path: Path) -> list[tuple[int, str, str]]:
    """(line, document, section) for every section of a document under docs/ that ``path``
    cites, per the rule of this module's docstring; the document is '' when none applies."""
    text = path.read_text()
    own = f"docs/{path.name}" if path.parent == DOCS else ""
    out = []
    for m in SECTION.finditer(text):
        start = text.rfind("\n", 0, m.start()) + 1
        before = text[start:m.start()]
        just = DOC_JUST_BEFORE.search(before)
        if just is None and ("." in m.group(1) or MANUAL_BEFORE.search(before)):
            continue  # a manual's section
        if just is not None:
            doc = just.group(1)
        elif own:
            doc = own
        else:
            named = DOCS_PATH.findall(text, 0, m.start())
            doc = named[-1] if named else ""
        out.append((text.count("\n", 0, m.start()) + 1, doc, m.group(1).split(".")[0]))
    return out


def test_bugs_md_is_the_catalog() -> None:
    assert (DOCS / "bugs.md").read_text() == catalog_markdown(), (
        "docs/bugs.md is out of date with fuzzmmu/model/bugs.py: run "
        "`fuzzmmu bugs --markdown > docs/bugs.md`")


def test_bugs_markdown_command_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bugs", "--markdown"]) == 0
    assert capsys.readouterr().out == catalog_markdown()


def test_cited_documents_are_in_the_repository() -> None:
    missing = []
    for path in scanned():
        text = path.read_text()
        for m in MD_PATH.finditer(text):
            cited = m.group(1)
            line = text.count("\n", 0, m.start()) + 1
            inside = not cited.startswith("/") and ".." not in Path(cited).parts
            if not inside or not any((base / cited).is_file()
                                     for base in (ROOT, DOCS, path.parent)):
                missing.append(f"{rel(path)}:{line}: {cited}")
    assert not missing, "documents cited but not in the repository:\n" + "\n".join(missing)


def test_cited_sections_exist() -> None:
    bad = []
    for path in scanned():
        for line, doc, number in section_citations(path):
            where = f"{rel(path)}:{line}: §{number}"
            if not doc:
                bad.append(f"{where} names no document under docs/ before it")
            elif not (ROOT / doc).is_file():
                bad.append(f"{where} of {doc}, which does not exist")
            elif number not in sections(ROOT / doc):
                bad.append(f"{where}: {doc} has no heading '## {number}. ...'")
    assert not bad, "\n".join(bad)


def test_the_section_rule() -> None:
    """The rule itself, on a file of its own under docs/ and one elsewhere."""
    doc = DOCS / "x86-paging.md"
    cites = [(d, n) for _, d, n in section_citations(doc)]
    assert ("docs/x86-paging.md", "9") in cites  # its own sections
    assert ("docs/model.md", "12") in cites  # "docs/model.md §12" inside it
    walker = ROOT / "fuzzmmu" / "arch" / "walker.py"
    cites = [(d, n) for _, d, n in section_citations(walker)]
    assert ("docs/x86-paging.md", "1") in cites and ("docs/x86-paging.md", "10") in cites
    assert all(n != "5" for _, n in cites)  # "APM Vol. 2 §5" is the manual's


def test_links_in_the_documents_resolve() -> None:
    broken = []
    for doc in sorted(DOCS.glob("*.md")):
        for target in LINK.findall(doc.read_text()):
            if "://" not in target and not (doc.parent / target).exists():
                broken.append(f"{rel(doc)}: {target}")
    assert not broken, "\n".join(broken)


def test_model_doc_covers_every_model_module() -> None:
    text = (DOCS / "model.md").read_text()
    model = ROOT / "fuzzmmu" / "model"
    missing = [rel(p) for p in sorted(model.rglob("*.py"))
               if p.name != "__init__.py" and str(p.relative_to(model)) not in text]
    assert not missing, f"docs/model.md does not describe {missing}"


def test_model_doc_states_every_audit_invariant() -> None:
    from fuzzmmu.oracle.audit import INVARIANTS

    text = (DOCS / "model.md").read_text()
    audit = text.split("## 12. ", 1)[1].split("\n## ", 1)[0]
    assert all(f"**{inv} " in audit for inv in ("I1", *INVARIANTS))


def test_program_language_doc_names_every_op_and_point() -> None:
    from fuzzmmu.model.mmu.internal import Point
    from fuzzmmu.program.ops import SIMPLE_OPS, Interleave

    text = (DOCS / "program-language.md").read_text()
    words = [op.KIND for op in (*SIMPLE_OPS, Interleave) if op.KIND != "access"]
    words += ["read", "write", "fetch", *(p.value for p in Point)]
    assert [w for w in words if f"`{w}`" not in text] == []


def test_reference_doc_names_every_mode_and_divergence_kind() -> None:
    from fuzzmmu.arch.bits import PagingMode
    from fuzzmmu.oracle.divergence import DivergenceKind

    text = (DOCS / "x86-paging.md").read_text()
    words = [m.label for m in PagingMode] + [k.value for k in DivergenceKind]
    assert [w for w in words if f"`{w}`" not in text] == []
