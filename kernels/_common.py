"""Device helpers shared by the Triton kernels, and the host-side launch plumbing."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# One config, so the same launch runs under TRITON_INTERPRET=1 (which cannot autotune).
BLOCK_H = 128
NUM_WARPS = 4


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    # No tl.math.tanh in Triton 3.8. 2 * sigmoid(2x) - 1 saturates to +-1 without NaN.
    return 2.0 * sigmoid(2.0 * x) - 1.0


@triton.jit
def load_f(ptr, offs, mask, ENABLED: tl.constexpr):
    """Load as fp32 (fp64 stays fp64), or zeros when the optional tensor is absent."""
    if ENABLED:
        x = tl.load(ptr + offs, mask=mask, other=0.0)
        if x.dtype != tl.float64:
            x = x.to(tl.float32)
    else:
        x = tl.zeros(offs.shape, tl.float32)
    return x


def grid_rows(B: int, H: int):
    """Programs over (row, block of BLOCK_H hidden units)."""
    return (B, triton.cdiv(H, BLOCK_H))


def check_contiguous(**tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"pyseqk.kernels: {name} must be contiguous")


def dummy(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A stand-in pointer for an absent optional tensor (never read: its flag is constexpr False)."""
    return like if t is None else t
