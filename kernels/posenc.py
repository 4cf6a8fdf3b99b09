"""Sinusoidal positional encoding fused with its add and dropout, and the dropout backward.

x, out, grad, grad_x: contiguous, N elements; element idx is feature d = idx % D of row idx // D
at position t = (idx // D // R) % T ([T, B, D]: R = B; [B, T, D] or [T, D]: R = 1). The
sinusoid is computed here (no table is read) and the dropout mask is the hash of
csrc/include/pyseqk/posenc.h, so every backend drops the same elements for the same seed.
One program per BLOCK elements; values computed in fp32 (fp64 for float64)."""
from __future__ import annotations

import struct

import triton
import triton.language as tl

from ._common import _device_guard, check_tensors, store_as, to_compute

# 512 elements per program, 4 per thread at 4 warps (the warps aot.py compiles with): 72-76
# registers on sm_80/sm_90, no spills; 1024 per program took 126-138.
BLOCK = 512
NUM_WARPS = 4
LOG2_BASE = tl.constexpr(13.287712379549449)  # log2(10000)
# 2*pi split so that k * TWO_PI_HI is exact in fp32 for |k| < 2**16 (angles below ~4e5).
TWO_PI_HI = tl.constexpr(6.28125)
TWO_PI_LO = tl.constexpr(0.0019353071795864769)
INV_TWO_PI = tl.constexpr(0.15915494309189535)


@triton.jit
def fmix32(h):
    # uint32 arithmetic wraps and shifts logically, as in C.
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def dropout_multiplier(idx, seed, threshold, scale):
    """keep(idx) ? scale : 0 for int64 element indices (posenc.h's hash)."""
    hi = (idx >> 32).to(tl.uint32)
    lo = (idx & 0xFFFFFFFF).to(tl.uint32)
    a = fmix32(seed.to(tl.uint32, bitcast=True) ^ (hi * 0x9E3779B9))
    r = fmix32(a ^ (lo * 0x85EBCA77))
    return tl.where((r >> 8).to(tl.int32) >= threshold, scale, 0.0)


@triton.jit
def _block(N, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return idx, idx < N


# An int argument equal to 1 is specialized to a Python int (no .to): seed, threshold and D can be 1.
@triton.jit(do_not_specialize=["D", "seed", "threshold"])
def _posenc_fwd_kernel(x_ptr, out_ptr, N, T, R, D, seed, threshold, scale_hi, scale_lo,
                       HAS_DROPOUT: tl.constexpr, BLOCK: tl.constexpr):
    idx, mask = _block(N, BLOCK)
    x = to_compute(tl.load(x_ptr + idx, mask=mask, other=0.0))
    row = idx // D
    d = idx - row * D
    t = ((row // R) % T).to(x.dtype)
    # w = 10000^(-(d - d % 2) / D) in fp64, then rounded to the compute dtype as the CPU and
    # CUDA kernels do: an fp32 exponent (ulp 1e-6 at 13) and exp2 (ex2.approx, 2 ulp) would be
    # off by a few ulp of w, which a 5000-step angle turns into several 1e-4. sm_80/sm_90 run
    # fp64 at half the fp32 rate, and this kernel is memory-bound.
    k = (d - (d % 2)).to(tl.float64)
    # (tl.full: a bare float constant would be an fp32 literal.)
    c = tl.full((), LOG2_BASE, tl.float64) / D.to(tl.float64)
    freq = tl.exp2(-k * c).to(x.dtype)
    angle = t * freq
    if x.dtype != tl.float64:
        # Reduce to [-pi, pi] first: GPU sin/cos approximations lose accuracy beyond it.
        k = tl.floor(angle * INV_TWO_PI + 0.5)
        angle = angle - k * TWO_PI_HI - k * TWO_PI_LO
    pe = tl.where((d % 2) == 0, tl.sin(angle), tl.cos(angle))
    y = x + pe
    if HAS_DROPOUT:
        scale = tl.cast(scale_hi, x.dtype) + tl.cast(scale_lo, x.dtype)
        y = y * dropout_multiplier(idx, seed, threshold, scale)
    store_as(out_ptr + idx, y, mask)


@triton.jit(do_not_specialize=["seed", "threshold"])
def _posenc_bwd_kernel(grad_ptr, grad_x_ptr, N, seed, threshold, scale_hi, scale_lo,
                       BLOCK: tl.constexpr):
    idx, mask = _block(N, BLOCK)
    g = to_compute(tl.load(grad_ptr + idx, mask=mask, other=0.0))
    scale = tl.cast(scale_hi, g.dtype) + tl.cast(scale_lo, g.dtype)
    store_as(grad_x_ptr + idx, g * dropout_multiplier(idx, seed, threshold, scale), mask)


def _f32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def _dropout_args(p: float, seed: int):
    """(seed as int32 bits, threshold, scale split into two fp32 so fp64 keeps its precision)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"pyseqk.kernels: dropout_p must be in [0, 1], got {p}")
    threshold = 0 if p <= 0 else (1 << 24 if p >= 1 else int(p * 16777216.0))
    scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
    hi = _f32(scale)
    seed32 = int(seed) & 0xFFFFFFFF
    seed32 = seed32 - (1 << 32) if seed32 >= (1 << 31) else seed32
    return seed32, threshold, hi, _f32(scale - hi)


def positional_encoding_forward(x, out, T: int, R: int, D: int, p: float, seed: int) -> None:
    """out = dropout(x + pe); see the module docstring for the layout."""
    check_tensors(x.dtype, x.device, x=x, out=out)
    N = x.numel()
    if out.numel() != N:
        raise ValueError(f"pyseqk.kernels: out has {out.numel()} elements, x has {N}")
    if N == 0:
        return
    if N % (T * R * D):
        raise ValueError(f"pyseqk.kernels: x ({tuple(x.shape)}) does not fit T={T}, R={R}, D={D}")
    seed32, threshold, hi, lo = _dropout_args(p, seed)
    with _device_guard(x):
        _posenc_fwd_kernel[(triton.cdiv(N, BLOCK),)](
            x, out, N, T, R, D, seed32, threshold, hi, lo, HAS_DROPOUT=p > 0.0,
            BLOCK=BLOCK, num_warps=NUM_WARPS)


def positional_encoding_backward(grad, grad_x, p: float, seed: int) -> None:
    """grad_x = grad * keep / (1 - p)."""
    check_tensors(grad.dtype, grad.device, grad=grad, grad_x=grad_x)
    if grad_x.shape != grad.shape:
        raise ValueError(f"pyseqk.kernels: grad_x has shape {tuple(grad_x.shape)}, expected "
                         f"{tuple(grad.shape)}")
    N = grad.numel()
    if N == 0:
        return
    seed32, threshold, hi, lo = _dropout_args(p, seed)
    with _device_guard(grad):
        _posenc_bwd_kernel[(triton.cdiv(N, BLOCK),)](grad, grad_x, N, seed32, threshold, hi, lo,
                                                     BLOCK=BLOCK, num_warps=NUM_WARPS)
