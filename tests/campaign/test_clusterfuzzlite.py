"""The ClusterFuzzLite build: .clusterfuzzlite/build.sh run as the builder image runs it, with
$SRC and $OUT, but without Docker (so without compile_python_fuzzer: build.sh writes a launcher
instead), then the built target run from $OUT on its seed corpus, as ClusterFuzzLite runs it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fuzzmmu.campaign.corpus import binary_seeds
from fuzzmmu.campaign.fuzz import MAX_LEN

ROOT = Path(__file__).resolve().parents[2]
CFLITE = ROOT / ".clusterfuzzlite"
WORKFLOWS = ROOT / ".github" / "workflows"
TARGET = "shadow_mmu_fuzzer"

pytestmark = pytest.mark.skipif(shutil.which("compile_python_fuzzer") is not None,
                                reason="inside the OSS-Fuzz builder build.sh packs with "
                                       "PyInstaller; this tests the build without it")


def _environment(tmp_path: Path, python: str) -> dict[str, str]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "fuzzmmu").symlink_to(ROOT)  # where the Dockerfile puts the checkout
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUZZMMU_")}
    env.update(SRC=str(src), OUT=str(tmp_path / "out"), PYTHON=python)
    return env


def _build(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(CFLITE / "build.sh")], env=env, cwd=env["SRC"],
                          capture_output=True, text=True, timeout=120)


def test_build_sh_makes_a_target_that_fuzzes_its_seed_corpus(tmp_path: Path) -> None:
    env = _environment(tmp_path, sys.executable)
    res = _build(env)
    assert res.returncode == 0, res.stdout + res.stderr
    out = Path(env["OUT"])
    target = out / TARGET
    # ClusterFuzzLite takes every executable file in $OUT for a fuzz target: only this one.
    assert [p.name for p in out.iterdir() if p.is_file() and os.access(p, os.X_OK)] == [TARGET]
    assert (out / f"{TARGET}.dict").read_bytes() == (ROOT / "harnesses" / f"{TARGET}.dict"
                                                     ).read_bytes()
    assert "dict = " in (out / f"{TARGET}.options").read_text()

    with zipfile.ZipFile(out / f"{TARGET}_seed_corpus.zip") as z:
        names = sorted(z.namelist())
        assert names == [p.name for p in binary_seeds()]
        for p in binary_seeds():
            assert z.read(p.name) == p.read_bytes()
        corpus = tmp_path / "corpus"
        z.extractall(corpus)

    # As ClusterFuzzLite runs it: from $OUT, with the options file's flags, on the corpus.
    run = subprocess.run([str(target), str(corpus), "-max_total_time=3", f"-max_len={MAX_LEN}",
                          f"-dict={out / f'{TARGET}.dict'}", "-seed=1", "-print_final_stats=1"],
                         env={k: v for k, v in env.items() if k != "PYTHON"}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=90)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    seeds = re.search(r"INFO: seed corpus: files: (\d+)", log)
    assert seeds and int(seeds[1]) == len(names), log[-3000:]
    assert re.search(r"#\d+\s+INITED cov: \d+ ft: \d+ corp: \d+", log), log[-3000:]
    done = re.search(r"Done (\d+) runs in \d+ second", log)
    assert done and int(done[1]) > len(names), log[-3000:]


def test_build_sh_refuses_a_python_without_fuzzmmu(tmp_path: Path) -> None:
    env = _environment(tmp_path, "false")  # a "Python" that cannot import anything
    res = _build(env)
    assert res.returncode == 1
    assert "cannot import atheris and fuzzmmu" in res.stderr
    assert not (Path(env["OUT"]) / TARGET).exists()


def test_the_builder_image_and_workflows_are_clusterfuzzlite_s_for_python() -> None:
    docker = (CFLITE / "Dockerfile").read_text()
    assert re.search(r"^FROM gcr\.io/oss-fuzz-base/base-builder-python\s*$", docker, re.M)
    assert "COPY . $SRC/fuzzmmu" in docker and "WORKDIR $SRC/fuzzmmu" in docker
    assert "COPY .clusterfuzzlite/build.sh $SRC/" in docker
    assert re.search(r"^language: python$", (CFLITE / "project.yaml").read_text(), re.M)
    build = (CFLITE / "build.sh").read_text()
    assert build.startswith("#!/bin/bash -eu") and "compile_python_fuzzer" in build
    for name, mode in (("cflite_pr", "code-change"), ("cflite_batch", "batch"),
                       ("cflite_cron", "prune")):
        flow = (WORKFLOWS / f"{name}.yml").read_text()
        assert "uses: google/clusterfuzzlite/actions/build_fuzzers@v1" in flow, name
        assert "uses: google/clusterfuzzlite/actions/run_fuzzers@v1" in flow, name
        assert f"mode: '{mode}'" in flow and "language: python" in flow, name
        assert "\t" not in flow, name
