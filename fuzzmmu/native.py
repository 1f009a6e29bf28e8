"""The compiled model: the model of KVM, the guest's world, the architectural reference, the
executor that compares them and the state feedback built with mypyc, used where nothing needs
to see their Python lines.

Atheris's line coverage instruments Python bytecode, so a campaign with line feedback must run
the pure-Python model; with state feedback (``fuzzmmu.campaign.feedback``) nothing looks at the
model's lines and the compiled modules run the same code about 1.6x as fast. The compiled
modules are built from the installed sources into a cache directory named by a digest of every
source file they import (mypyc inlines constants and native calls across modules, so any edit
makes a new build) and are served by an import finder that ``activate()`` installs before
any of them is imported: the source tree is never written, and a stale build is never loaded.

``FUZZMMU_NATIVE=1`` in a process's environment activates the build for the current sources if
there is one (``fuzzmmu/__init__.py``); ``build()`` makes it (``fuzzmmu compile``). Where no C
compiler or mypyc is available everything runs as pure Python, which gives the same outcomes.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

ENV_NATIVE = "FUZZMMU_NATIVE"
ENV_CACHE = "FUZZMMU_NATIVE_CACHE"

_PACKAGE = Path(__file__).resolve().parent
# The system under test, the reference machine and its walker, the executor that compares
# them and the state features taken after every op: what every program of a state-feedback
# campaign runs through, and the program world's value helpers the executor calls for every
# store. Package __init__ modules stay Python (they only re-export), and so does
# mmu/internal.py: its errors derive from RuntimeError, which a mypyc native class cannot.
_COMPILED = ("model", "world", "arch", "oracle", "campaign/feedback.py", "program/world.py")
_KEPT_PYTHON = frozenset({"__init__.py", "internal.py"})
# Everything the compiled modules import (the executor runs the program's ops): their
# constants and classes are compiled in.
_DIGESTED = (*_COMPILED, "program")
_EXT = importlib.machinery.EXTENSION_SUFFIXES[0]
_DONE = "complete"  # written last into a build directory: the build is whole


class NativeBuildError(RuntimeError):
    """The compiled model could not be built (no C compiler, mypyc refused the sources)."""


def compiled_sources() -> list[Path]:
    """The source files that are compiled, relative to the package's parent directory."""
    files = [p for p in _sources(_COMPILED) if p.name not in _KEPT_PYTHON]
    return [p.relative_to(_PACKAGE.parent) for p in files]


def _sources(parts: tuple[str, ...], package: Path | None = None) -> list[Path]:
    files: set[Path] = set()
    for part in parts:
        path = (package or _PACKAGE) / part
        files.update(path.rglob("*.py") if path.is_dir() else [path])
    return sorted(files)


def module_name(source: Path) -> str:
    return ".".join(source.with_suffix("").parts)


def digest(package: Path | None = None) -> str:
    """Names a build: the interpreter, mypy's version, which modules are compiled and how, and
    every source file the compiled modules are or import (those kept in Python too: compiled
    code inlines their constants)."""
    package = package or _PACKAGE
    h = hashlib.sha256()
    h.update(sys.version.encode())
    h.update(_mypy_version().encode())
    h.update(repr((_COMPILED, sorted(_KEPT_PYTHON), _SETUP)).encode())  # what is built, how
    for path in _sources(_DIGESTED, package):
        h.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:20]


def _mypy_version() -> str:
    try:
        return importlib.metadata.version("mypy")
    except importlib.metadata.PackageNotFoundError:  # no build can exist: any stable name
        return "none"


def cache_root() -> Path:
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fuzzmmu" / "native"


def build_dir(root: Path | None = None) -> Path:
    return (root or cache_root()) / digest()


def built(root: Path | None = None) -> bool:
    return (build_dir(root) / _DONE).exists()


@dataclass(frozen=True)
class BuildResult:
    path: Path
    seconds: float
    reused: bool  # an earlier build of the same sources was there


_SETUP = """
import sys
from setuptools import setup
from mypyc.build import mypycify
files = sys.argv[1:sys.argv.index("--")]
sys.argv = [sys.argv[0], *sys.argv[sys.argv.index("--") + 1:]]
setup(name="fuzzmmu-native", ext_modules=mypycify(files, opt_level="3"))
"""


def build(root: Path | None = None, log: Path | None = None) -> BuildResult:
    """Build the compiled model for the current sources (or find it built). Raises
    NativeBuildError with the build's last lines if mypyc or the C compiler fails."""
    start = time.monotonic()
    target = build_dir(root)
    if (target / _DONE).exists():
        return BuildResult(target, 0.0, True)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Processes that want the same build at once (two campaigns, test workers) make it once:
    # the others wait for the first and then find it done.
    with (target.parent / f".{target.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / _DONE).exists():
            return BuildResult(target, time.monotonic() - start, True)
        _build_into(target, log)
    return BuildResult(target, time.monotonic() - start, False)


def _build_into(target: Path, log: Path | None) -> None:
    with tempfile.TemporaryDirectory(prefix="fuzzmmu-native-", dir=target.parent) as tmp:
        work = Path(tmp)
        src, out = work / "src", work / "out"
        # A copy of the package: the build runs outside the source tree (whose pyproject.toml
        # setuptools would read) and never writes into it.
        shutil.copytree(_PACKAGE, src / _PACKAGE.name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc"))
        if digest(src / _PACKAGE.name) != target.name:
            raise NativeBuildError("the sources changed while the build started: run it again")
        files = [str(p) for p in compiled_sources()]
        cmd = [sys.executable, "-c", _SETUP, *files, "--", "build_ext", "--build-lib", str(out),
               "--build-temp", str(work / "tmp")]
        proc = subprocess.run(cmd, cwd=src, capture_output=True, text=True, check=False)
        text = proc.stdout + proc.stderr
        if log is not None:
            log.write_text(text)
        if proc.returncode != 0:
            tail = "\n".join(text.strip().splitlines()[-15:])
            raise NativeBuildError(f"mypyc build failed (exit {proc.returncode}):\n{tail}")
        (out / _DONE).write_text(" ".join(files) + "\n")
        if target.exists():  # a build that died before its last step
            shutil.rmtree(target)
        os.replace(out, target)


class _Finder(importlib.abc.MetaPathFinder):
    """Serves the compiled modules (and mypyc's shared library of the group) from a build."""

    def __init__(self, path: Path, modules: frozenset[str]) -> None:
        self.path = path
        self.modules = modules

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname not in self.modules and not (
                fullname.endswith("__mypyc") and "." not in fullname):
            return None
        file = self.path / (fullname.replace(".", "/") + _EXT)
        if not file.exists():
            return None
        return importlib.util.spec_from_file_location(fullname, file)


_active: Path | None = None


def active() -> Path | None:
    """The build this process runs, or None (pure Python)."""
    return _active


def activate(root: Path | None = None) -> Path | None:
    """Run the compiled modules in this process if they are built for the current sources.
    Must come before any of them is imported (a module would otherwise exist twice, with two
    sets of classes); returns the build, or None where there is none."""
    global _active
    if _active is not None:
        return _active
    path = build_dir(root)
    if not (path / _DONE).exists():
        return None
    modules = frozenset(module_name(p) for p in compiled_sources())
    loaded = sorted(modules & sys.modules.keys())
    if loaded:
        raise RuntimeError(f"the compiled model must be activated before {loaded[0]} is "
                           "imported")
    sys.meta_path.insert(0, _Finder(path, modules))
    _active = path
    return path


def compiler_problem() -> str | None:
    """Why no build can be made here, or None."""
    if importlib.util.find_spec("mypyc") is None:
        return "mypyc is not installed (it comes with mypy: pip install mypy)"
    if importlib.util.find_spec("setuptools") is None:
        return "setuptools is not installed"
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc}) on PATH"
    include = sysconfig.get_paths().get("include")
    if not include or not Path(include, "Python.h").exists():
        return "the Python headers (Python.h) are not installed"
    return None
