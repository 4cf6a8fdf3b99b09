"""Peak extra memory of one Bahdanau attention forward+backward (B=16, Tq=64, Tk=256, U=256,
fp32, CPU): pyseqk.nn.BahdanauAttention against the tutorial's formulation, which materialises
[B, Tq, Tk, U] (256 MiB per copy).

    python bench/seq2seq_memory.py [--B 16 --Tq 64 --Tk 256 --H 256]

Each side runs in a fresh subprocess: inputs and weights are built and one small call warms the
kernels and thread pool up, then the process's max RSS is read before and after one full-size
forward+backward. The difference is the peak memory the step needed beyond what was already
resident (the inputs, weights and their gradients are ~10 MiB)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, resource, sys, torch
sys.path.insert(0, {root!r})
import pyseqk
from bench.cases.seq2seq import _TutorialBahdanau
side, B, Tq, Tk, H = {side!r}, {B}, {Tq}, {Tk}, {H}
torch.manual_seed(0)
m = pyseqk.nn.BahdanauAttention(H) if side == "pyseqk" else _TutorialBahdanau(H)
def step(b, tq, tk):
    q = torch.randn(b, tq, H, requires_grad=True)
    k = torch.randn(b, tk, H, requires_grad=True)
    c, w = m(q, k)
    (c.sum() + (w * w).sum()).backward()
step(2, 4, 8)
for p in m.parameters():
    p.grad = None
q = torch.randn(B, Tq, H, requires_grad=True)
k = torch.randn(B, Tk, H, requires_grad=True)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
c, w = m(q, k)
(c.sum() + (w * w).sum()).backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"side": side, "peak_extra_mib": (after - before) / 1024.0}}))
"""


def measure(side: str, B: int, Tq: int, Tk: int, H: int) -> float:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = CHILD.format(root=root, side=side, B=B, Tq=Tq, Tk=Tk, H=H)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=root)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_mib"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--Tq", type=int, default=64)
    ap.add_argument("--Tk", type=int, default=256)
    ap.add_argument("--H", type=int, default=256)
    a = ap.parse_args(argv)
    four_d = a.B * a.Tq * a.Tk * a.H * 4 / 2**20
    print(f"Bahdanau fwd+bwd B={a.B} Tq={a.Tq} Tk={a.Tk} U={a.H} fp32; "
          f"one [B, Tq, Tk, U] tensor = {four_d:.0f} MiB")
    for side in ("torch", "pyseqk"):
        print(f"{side:>7}: peak extra memory {measure(side, a.B, a.Tq, a.Tk, a.H):8.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
