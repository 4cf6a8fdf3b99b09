"""Device helpers shared by the Triton kernels, and the host-side launch plumbing.

Every cell kernel is pointwise over [B, H]: one program per (row, block of BLOCK_H hidden units).
Values are loaded in their storage dtype and computed in fp32 (fp64 for float64 tensors): bf16
and fp16 arithmetic is both less accurate and silently wrong under TRITON_INTERPRET=1."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

# One config, so the same launch runs under TRITON_INTERPRET=1 (which cannot autotune).
# 128 hidden units per program and 4 warps: one element per thread, 29-32 registers (aot.py).
BLOCK_H = 128
NUM_WARPS = 4
# CUDA limits grid dimensions 1 and 2 to 65535 blocks; dimension 0 (the rows) to 2**31 - 1.
_MAX_GRID_1 = 65535

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def sigmoid(x):
    # exp(-x) overflows to inf for x < -88 (fp32), giving exactly 0: no NaN.
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    # No tl.math.tanh in Triton 3.8. 2 * sigmoid(2x) - 1 saturates to +-1 without NaN; its
    # absolute error is a few ulp of 1, which is what the tests' atol allows for.
    return 2.0 * sigmoid(2.0 * x) - 1.0


@triton.jit
def to_compute(x):
    """fp32 for fp32/fp16/bf16 values, fp64 stays fp64."""
    if x.dtype != tl.float64:
        x = x.to(tl.float32)
    return x


@triton.jit
def load_f(ptr, mask, ENABLED: tl.constexpr):
    """Load as the compute dtype, or fp32 zeros when the optional tensor is absent (a constexpr
    flag: the dummy pointer passed for it is never dereferenced)."""
    if ENABLED:
        x = to_compute(tl.load(ptr, mask=mask, other=0.0))
    else:
        x = tl.zeros(mask.shape, tl.float32)
    return x


@triton.jit
def store_as(ptr, x, mask):
    """Store converting to the destination's dtype."""
    tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def row_block(H, BLOCK: tl.constexpr):
    """(row as int64, column indices j of this program's block, mask j < H). The row is int64
    so row * (k H) never overflows; j < H fits int32, and each gate chunk is reached by
    adding H to a pointer (64-bit) rather than by computing k * H + j in int32."""
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    return row, j, j < H


# --------------------------------------------------------------------------------------------
# Host helpers


def grid_rows(B: int, H: int) -> tuple[int, int]:
    """Programs over (row, block of BLOCK_H hidden units)."""
    blocks = triton.cdiv(H, BLOCK_H)
    if blocks > _MAX_GRID_1:
        raise ValueError(f"pyseqk.kernels: hidden size {H} exceeds {_MAX_GRID_1 * BLOCK_H}")
    return (B, blocks)


def check_tensors(dtype: torch.dtype, device: torch.device, **tensors: Optional[torch.Tensor]):
    """Every given tensor contiguous, of `dtype` and on `device` (None = absent optional)."""
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"pyseqk.kernels: dtype {dtype} is not supported "
                        f"(expected one of {', '.join(map(str, SUPPORTED_DTYPES))})")
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dtype != dtype:
            raise TypeError(f"pyseqk.kernels: {name} has dtype {t.dtype}, expected {dtype}")
        if t.device != device:
            raise ValueError(f"pyseqk.kernels: {name} is on {t.device}, expected {device}")
        if not t.is_contiguous():
            raise ValueError(f"pyseqk.kernels: {name} must be contiguous")


def check_shape(name: str, t: Optional[torch.Tensor], shape: tuple[int, ...]) -> None:
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"pyseqk.kernels: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def dummy(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """A stand-in pointer for an absent optional tensor (never read: its flag is constexpr False)."""
    return like if t is None else t


def _device_guard(t: torch.Tensor):
    # Triton launches on the current device's current stream: make that the tensors' device.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def launch(kernel, B: int, H: int, *args, **constexprs) -> None:
    """One launch of a pointwise cell kernel over [B, H], nothing when B or H is 0. `args` are
    the kernel's runtime arguments (tensors first), `constexprs` its mode flags; BLOCK and
    num_warps are the single config above."""
    if B == 0 or H == 0:
        return
    with _device_guard(args[0]):
        kernel[grid_rows(B, H)](*args, BLOCK=BLOCK_H, num_warps=NUM_WARPS, **constexprs)
