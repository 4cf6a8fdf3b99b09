#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run of the CPU extension.
#
# Builds pyseqk._C with -fsanitize=address,undefined into a copy of the tree under $ASAN_DIR
# (default build/asan: git-ignored, kept between runs so rebuilds are incremental), never touching
# the normal build's pyseqk/_C*.so, then runs the CPU tests there with gcc's ASan runtime preloaded
# (it must come first in the library list; python itself is not instrumented).
#
#   tests/sanitize/asan.sh                  build, self-check, run the default test subset
#   tests/sanitize/asan.sh tests/x.py -k y  build, self-check, run these pytest arguments instead
#
# Environment: PYTHON (default: python3), ASAN_DIR, MAX_JOBS. Exit status 0 means: the extension
# is instrumented, the sanitizer reports errors in this setup (a deliberate overflow in a canary
# is caught), and the tests ran clean. tests/test_sanitizers.py runs this under `make test`.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-python3}
ASAN_DIR=${ASAN_DIR:-$ROOT/build/asan}
SRC=$ASAN_DIR/src
SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -g"

# Tests of the C++ kernels that need no GPU; Triton under the interpreter is plain Python, so it
# gains nothing from the sanitizer and is left out to keep the run short. Every family in
# tests/_tables.py runs through the property and bad-input tests; of the families' own files only
# the CPU fp32/fp64 comparisons at the sizes that cross vector and tile boundaries (H = 97, the
# 300 x 270 attention, zero lengths), which keeps the run within a minute of the cells-only one.
# The file names keep test_cells/properties/bad_input whole under the -k.
DEFAULT_TESTS=(tests/test_cells.py tests/test_properties.py tests/test_bad_input.py
               tests/test_layers.py tests/test_sdpa.py tests/test_seq2seq_attention.py
               tests/test_posenc.py
               -k "not triton and not backends_agree and (test_cells or test_properties or"\
" test_bad_input or layer_matches_reference_fp64 and (H97 or zero) and not reference- or"\
" sdpa_matches_reference and float32 and not reference- or matches_reference_cpu and float32"\
" or posenc and matches_reference and float32 and not reference- and not cuda)")

mkdir -p "$SRC"
# Python files: a fresh copy each run. C++ sources: only files whose content changed are copied
# (stamped now), the rest keep the time of their last copy, so ninja recompiles exactly what
# changed since the last run, even when a file went back to an older version.
rm -rf "$SRC/pyseqk" "$SRC/kernels" "$SRC/tests"
cp -a "$ROOT/pyseqk" "$ROOT/kernels" "$ROOT/tests" "$SRC/"
rm -f "$SRC"/pyseqk/_C*.so  # the copied normal build must never be the one tested
(cd "$ROOT" && find setup.py pyproject.toml csrc -type f) | while read -r f; do
  if ! cmp -s "$ROOT/$f" "$SRC/$f"; then
    mkdir -p "$(dirname "$SRC/$f")"
    cp "$ROOT/$f" "$SRC/$f"
  fi
done

echo "== building the sanitized extension in $SRC"
(cd "$SRC" && CFLAGS="$SAN" LDFLAGS="-fsanitize=address,undefined" PYSEQK_NO_CUDA=1 \
  MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py build_ext --inplace --build-temp "$ASAN_DIR/tmp" \
  > "$ASAN_DIR/build.log" 2>&1) || { tail -40 "$ASAN_DIR/build.log"; exit 1; }

SO=$(ls "$SRC"/pyseqk/_C*.so)
SYMS=$(nm -D "$SO")  # not piped into grep -q: under pipefail its early exit would fail nm
if ! grep -q __asan_report <<<"$SYMS"; then
  echo "FAIL: $SO has no ASan instrumentation"; exit 1
fi
if ! grep -q __ubsan_handle <<<"$SYMS"; then
  echo "FAIL: $SO has no UBSan instrumentation"; exit 1
fi

LIBASAN=$(gcc -print-file-name=libasan.so)
REPORTS=$ASAN_DIR/reports
rm -rf "$REPORTS" && mkdir -p "$REPORTS"
# libstdc++ right after the runtime: python itself does not link it, and ASan must resolve the
# real __cxa_throw at startup or its interceptor aborts on the first C++ exception (every
# TORCH_CHECK that fails in a bad-input test).
export LD_PRELOAD="$LIBASAN $(gcc -print-file-name=libstdc++.so.6)"
# Reports go to files: pytest captures fd 2, and a sanitizer that halts the process would take
# the captured report with it. detect_leaks=0: CPython and torch keep allocations until exit.
export ASAN_OPTIONS=detect_leaks=0:log_path=$REPORTS/asan
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:log_path=$REPORTS/ubsan
export PYSEQK_NO_CUDA=1 PYTHONPATH=$SRC

echo "== self-check: a heap overflow in this setup must be reported"
# memset is intercepted by ASan, and a 4 KiB ctypes buffer comes from malloc, so writing past it
# is a heap-buffer-overflow report: proves the runtime is live and its reports reach us.
(cd "$SRC" && ASAN_OPTIONS=detect_leaks=0:log_path=$REPORTS/canary "$PY" -c "
import ctypes
b = ctypes.create_string_buffer(4096)
ctypes.memset(ctypes.addressof(b), 0, 4096 + 64)
print('canary survived')" > /dev/null 2>&1) || true
if ! cat "$REPORTS"/canary.* 2>/dev/null | grep -q "heap-buffer-overflow"; then
  echo "FAIL: the sanitizer did not report the canary's overflow"; exit 1
fi
rm -f "$REPORTS"/canary.*

# The tests must import the instrumented copy, not an editable install of the tree itself.
(cd "$SRC" && "$PY" -c "
import sys, pyseqk._C
path = pyseqk._C.__file__
sys.exit(0 if path.startswith('$SRC/') else 'FAIL: the tests would import ' + path)")

echo "== tests under ASan/UBSan"
if [ $# -gt 0 ]; then ARGS=("$@"); else ARGS=("${DEFAULT_TESTS[@]}"); fi
cd "$SRC"
set +e
"$PY" -m pytest -q -p no:cacheprovider "${ARGS[@]}" 2>&1 | tee "$ASAN_DIR/pytest.log"
status=${PIPESTATUS[0]}
set -e
if compgen -G "$REPORTS/*" > /dev/null; then
  for f in "$REPORTS"/*; do echo "---- $f"; head -80 "$f"; done
  echo "FAIL: sanitizer reports above"; exit 1
fi
exit "$status"
