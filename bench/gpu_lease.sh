#!/usr/bin/env bash
# One call on a lent GPU machine (the device tool): set up pyseqk with that machine's own torch,
# run every GPU-marked test with PYSEQK_REQUIRE_CUDA=1, then the GPU benchmark.
#
#   bash bench/gpu_lease.sh                 # all steps
#   STEPS="test" TESTS="tests/test_cells.py" bash bench/gpu_lease.sh
#
# The extension: a prebuilt .gpu/_C.abi3.so (built here against the same torch version as the
# GPU machine's, carried with the call) is tried first; if it does not load, it is built there
# for the local arch only. Logs and results go to $OUT (the device tool brings them back).
# Prebuilding (no device time spent compiling), e.g. for torch 2.11.0+cu130 on an H200:
#   python3.11 -m venv /tmp/v && /tmp/v/bin/pip install torch==2.11.0 numpy ninja
#   TORCH_CUDA_ARCH_LIST=9.0 /tmp/v/bin/python setup.py build_ext --inplace   (in a worktree)
#   strip --strip-debug -o .gpu/_C.abi3.so pyseqk/_C.cpython-311-x86_64-linux-gnu.so
# The module's init uses only PyModule_Create, so a cpython-311 build loads under 3.12 as abi3.
set -u -o pipefail
OUT=${OUT:-/tmp/pyseqk-gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
STEPS=${STEPS:-"build test bench"}
TESTS=${TESTS:-tests}
TEST_TIMEOUT=${TEST_TIMEOUT:-360}
TEST_WORKERS=${TEST_WORKERS:-8}   # pytest-xdist processes: Triton's JIT compiles run in parallel
BENCH_TIMEOUT=${BENCH_TIMEOUT:-150}
BENCH_ARGS=${BENCH_ARGS:-"--preset quick"}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
START=$SECONDS
stamp() { echo "[$((SECONDS - START)) s] $*"; }

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used,memory.total \
  --format=csv,noheader
$PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
ln -sfn ../kernels pyseqk/kernels   # what the editable install maps pyseqk.kernels to

loads() { $PY -c "import pyseqk, torch; from pyseqk import backends; ok, why, info = backends.native_status(); \
assert ok and info.get('cuda'), why or info; print('extension:', info)" 2>&1; }

if [[ " $STEPS " == *" build "* ]]; then
  if [ -f .gpu/_C.abi3.so ]; then
    cp .gpu/_C.abi3.so pyseqk/_C.abi3.so
    if loads; then stamp "prebuilt extension loads"; else rm -f pyseqk/_C.abi3.so; fi
  fi
  if [ ! -f pyseqk/_C.abi3.so ]; then
    stamp "building the extension for this GPU"
    arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc) $PY setup.py build_ext --inplace \
      > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
    loads || exit 1
    stamp "built"
  fi
  $PY -m pyseqk info 2>&1 | tee "$OUT/info.txt" | tail -25
fi

if [[ " $STEPS " == *" test "* ]]; then
  stamp "GPU tests: $TESTS"
  PYSEQK_REQUIRE_CUDA=1 timeout "$TEST_TIMEOUT" $PY -m pytest -m gpu -q -rfE --tb=short -n "$TEST_WORKERS" \
    -p no:cacheprovider --durations=15 $TESTS > "$OUT/gpu_tests.log" 2>&1
  echo "pytest exit $?"
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu_tests.log" | tail -60
fi

if [[ " $STEPS " == *" bench "* ]]; then
  stamp "GPU bench: $BENCH_ARGS"
  timeout "$BENCH_TIMEOUT" $PY -m bench --device cuda $BENCH_ARGS --no-plot \
    --json "$OUT/bench_cuda.json" > "$OUT/bench.log" 2>&1
  echo "bench exit $?"
  grep -v "it/s\]" "$OUT/bench.log" | tail -45
fi
stamp "done"
