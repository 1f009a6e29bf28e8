#!/bin/bash -eu
# ClusterFuzzLite / OSS-Fuzz build of fuzzmmu's fuzz target (harnesses/shadow_mmu_fuzzer.py).
#
# In the builder image (.clusterfuzzlite/Dockerfile: gcr.io/oss-fuzz-base/base-builder-python,
# the source in $SRC/fuzzmmu) it installs the package and packs the target with the image's
# compile_python_fuzzer (PyInstaller). Without that tool (a plain machine, the test
# tests/campaign/test_clusterfuzzlite.py) it writes an equivalent launcher, $OUT/<target>, that
# runs the harness with the Python that has fuzzmmu installed ($PYTHON, default python3); it
# installs nothing there.
#
# Either way $OUT gets the target, its .dict and .options, and <target>_seed_corpus.zip (the
# binary seeds of corpus/). Environment: SRC, OUT (required), PYTHON (launcher only),
# FUZZMMU_SRC (the checkout, default $SRC/fuzzmmu).

# The launcher's Python as the caller named it, made absolute (not resolved: a virtual
# environment's python is a link that must stay one).
requested=${PYTHON:-python3}
PYTHON=$(command -v "$requested" || true)
case "$PYTHON" in /*) ;; "") ;; *) PYTHON="$PWD/$PYTHON" ;; esac
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

cd "${FUZZMMU_SRC:-$SRC/fuzzmmu}"

if command -v compile_python_fuzzer >/dev/null 2>&1; then
  pip3 install .
  PYTHON=python3
else
  if [ -z "$PYTHON" ] || ! "$PYTHON" -c 'import atheris, fuzzmmu' 2>/dev/null; then
    echo "build.sh: ${PYTHON:-$requested (not found)} cannot import atheris and fuzzmmu:" \
      "install the package first" \
      "(pip install -e .) or name the Python that has it with PYTHON=" >&2
    exit 1
  fi
fi

# The seeds' binary form must match their text form, or the zip would seed stale programs.
"$PYTHON" -m fuzzmmu.cli corpus check --dir corpus

for fuzzer in harnesses/*_fuzzer.py; do
  name=$(basename -s .py "$fuzzer")
  if command -v compile_python_fuzzer >/dev/null 2>&1; then
    # The harness lists fuzzmmu's modules to leave uninstrumented; collect them all, as
    # PyInstaller's import analysis alone might miss one.
    compile_python_fuzzer "$fuzzer" --collect-submodules fuzzmmu
  else
    # The harness beside the launcher, not executable: only the launcher is a target.
    install -m 0644 "$fuzzer" "$OUT/$name.py"
    cat > "$OUT/$name" <<LAUNCHER
#!/bin/sh
# LLVMFuzzerTestOneInput for fuzzer detection (as compile_python_fuzzer's wrapper says).
# $name without PyInstaller: the Atheris harness under $PYTHON.
this_dir=\$(dirname "\$0")
exec "$PYTHON" "\$this_dir/$name.py" "\$@"
LAUNCHER
    chmod +x "$OUT/$name"
  fi
  for extra in "harnesses/$name.dict" "harnesses/$name.options"; do
    if [ -f "$extra" ]; then cp "$extra" "$OUT/"; fi
  done
  "$PYTHON" -m fuzzmmu.cli corpus zip --dir corpus -o "$OUT/${name}_seed_corpus.zip"
done
