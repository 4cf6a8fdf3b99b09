"""Positional encoding: pyseqk.nn.PositionalEncoding (sinusoid computed in the kernel, add and
dropout in one pass) against the PyTorch tutorial's module (a stored pe table, x + pe[:T], then
nn.Dropout), eval (no dropout), training forward, and training forward+backward.

Counts: no FLOPs worth counting (one add and, with dropout, one multiply per element); bytes are
the minimum traffic, x read and out written (2 N * 4), the backward another 2 N * 4.
Prediction: eval is one memory-bound pass on both sides (torch also reads the pe rows, T*D*4,
small next to N at B=32): ratio ~1. With dropout, torch makes four passes (add; bernoulli_
writes a float mask, drawing N random numbers; the mask is scaled; a multiply), pyseqk one, with
a 2-round integer hash per element instead of an RNG draw: 2-4x. The backward: torch multiplies
by the saved mask (3 streams), pyseqk rehashes (2 streams): ~1.5x."""
from __future__ import annotations

import math

import torch

from bench.case import Case

SHAPES = {  # (T, B, D)
    "quick": [(128, 16, 256)],
    "default": [(512, 32, 512), (128, 8, 97)],
    "full": [(512, 32, 512), (128, 8, 97), (2048, 16, 1024)],
}
P = 0.1
FP32 = 4


class TutorialPositionalEncoding(torch.nn.Module):
    def __init__(self, d_model, dropout=0.1, max_len=5000):
        super().__init__()
        self.dropout = torch.nn.Dropout(p=dropout)
        position = torch.arange(max_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, 1, d_model)
        pe[:, 0, 0::2] = torch.sin(position * div_term)
        pe[:, 0, 1::2] = torch.cos(position * div_term[: d_model // 2])
        self.register_buffer("pe", pe)

    def forward(self, x):
        return self.dropout(x + self.pe[: x.size(0)])


def _make_setup(T, B, D, mode, device):
    def setup():
        import pyseqk.nn

        ref = TutorialPositionalEncoding(D, P, max_len=T).to(device)
        ours = pyseqk.nn.PositionalEncoding(D, P, max_len=T).to(device)
        x = torch.randn(T, B, D, device=device, requires_grad=mode == "fwdbwd")
        if mode == "eval":
            ref.eval()
            ours.eval()

            def run(m):
                with torch.no_grad():
                    return m(x)
            return (lambda: run(ref)), (lambda: run(ours))
        # Training: the two sides draw different masks, so the runner's output check cannot
        # apply (the timed calls return nothing). Checked here instead: the same drop rate, and
        # the same values where both kept an element.
        with torch.no_grad():
            a, b = ref(x), ours(x)
        both = (a != 0) & (b != 0)
        assert abs((a == 0).float().mean().item() - P) < 0.01
        assert abs((b == 0).float().mean().item() - P) < 0.01
        torch.testing.assert_close(a[both], b[both], atol=1e-4, rtol=1e-4)
        g = torch.randn_like(x)

        def run(m):
            if mode == "fwd":
                with torch.no_grad():
                    m(x)
            else:
                x.grad = None
                m(x).backward(g)
        return (lambda: run(ref)), (lambda: run(ours))
    return setup


def cases(preset: str, device: str = "cpu") -> list[Case]:
    out = []
    for T, B, D in SHAPES[preset]:
        N = T * B * D
        for mode in ("eval", "fwd", "fwdbwd"):
            nbytes = 2 * N * FP32 * (2 if mode == "fwdbwd" else 1)
            out.append(Case(
                name=f"posenc.{mode}.T{T}.B{B}.D{D}", group="posenc",
                params={"mode": mode, "T": T, "B": B, "D": D, "dropout": P if mode != "eval" else 0.0,
                        "dtype": "float32"},
                flops=0.0, bytes=nbytes, setup=_make_setup(T, B, D, mode, device),
                atol=2e-4, rtol=1e-4))
    return out
