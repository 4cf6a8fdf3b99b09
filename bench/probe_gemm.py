"""The fp32 GEMM rates that bound the cell cases: `python -m bench.probe_gemm [--threads N]`.
Each shape is timed like a case (warm-up, then the minimum of repeated single calls), alternated
with the 1024^3 reference so that both see the same interference."""
from __future__ import annotations

import argparse
import statistics

import torch

from bench.runner import alternate, make_timer

# (M, K, N): out[M, N] = a[M, K] @ b[K, N]
SHAPES = [
    (1024, 1024, 1024),
    (32, 256, 1024), (32, 512, 1024),   # LSTM, B=32 H=256: one of the two GEMMs; both fused
    (32, 256, 768), (32, 256, 256),      # GRU, RNN
    (1, 128, 512), (1, 256, 512),        # LSTM, B=1 H=128
]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=1.0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    timer = make_timer("cpu")
    big = torch.randn(1024, 1024), torch.randn(1024, 1024)
    big_out = torch.empty(1024, 1024)
    ref = lambda: torch.mm(*big, out=big_out)  # noqa: E731
    print(f"{'M x K x N':>18}  {'min us':>9}  {'med us':>9}  {'GFLOP/s':>8}  (1024^3 alongside: GFLOP/s)")
    for m, k, n in SHAPES:
        a, b, out = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
        fn = lambda: torch.mm(a, b, out=out)  # noqa: E731
        # small GEMMs: time 100 in a row so the timer's own cost does not count
        reps = 1 if m * k * n >= 2**27 else 100
        loop = (lambda: [fn() for _ in range(reps)]) if reps > 1 else fn
        ta, tb = alternate(loop, ref, timer, args.seconds, 5, 0.2)
        t = min(ta) / reps
        print(f"{m:>5}x{k:>5}x{n:>5}  {t * 1e6:9.2f}  {statistics.median(ta) / reps * 1e6:9.2f}  "
              f"{2 * m * k * n / t / 1e9:8.1f}  ({2 * 1024**3 / min(tb) / 1e9:.1f})")


if __name__ == "__main__":
    main()
