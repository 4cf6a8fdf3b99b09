"""Elman RNN cell (tanh or ReLU): fused bias + activation, and its backward."""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import BLOCK_H, NUM_WARPS, check_contiguous, dummy, grid_rows, load_f, tanh


@triton.jit
def _rnn_cell_fwd_kernel(hy_ptr, b_ih_ptr, b_hh_ptr, H, RELU: tl.constexpr,
                         HAS_B_IH: tl.constexpr, HAS_B_HH: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = j < H
    p = hy_ptr + row * H
    pre = load_f(p, j, mask, True) + load_f(b_ih_ptr, j, mask, HAS_B_IH) + load_f(b_hh_ptr, j, mask, HAS_B_HH)
    if RELU:
        h = tl.maximum(pre, 0.0)
    else:
        h = tanh(pre)
    tl.store(p + j, h.to(hy_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rnn_cell_bwd_kernel(hy_ptr, dhy_ptr, dpre_ptr, H, RELU: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = j < H
    h = load_f(hy_ptr + row * H, j, mask, True)
    dh = load_f(dhy_ptr + row * H, j, mask, True)
    if RELU:
        d = tl.where(h > 0.0, dh, 0.0)
    else:
        d = dh * (1.0 - h * h)
    tl.store(dpre_ptr + row * H + j, d.to(dpre_ptr.dtype.element_ty), mask=mask)


def rnn_cell_forward(hy, b_ih, b_hh, relu):
    """hy [B, H]: the gate sum without bias in, act(sum + biases) out (in place)."""
    check_contiguous(hy=hy, b_ih=b_ih, b_hh=b_hh)
    B, H = hy.shape
    if B * H == 0:
        return
    _rnn_cell_fwd_kernel[grid_rows(B, H)](
        hy, dummy(b_ih, hy), dummy(b_hh, hy), H, RELU=relu, HAS_B_IH=b_ih is not None,
        HAS_B_HH=b_hh is not None, BLOCK=BLOCK_H, num_warps=NUM_WARPS)


def rnn_cell_backward(hy, dhy, dpre, relu):
    """dpre [B, H] out: the gradient of the pre-activation sum."""
    check_contiguous(hy=hy, dhy=dhy, dpre=dpre)
    B, H = hy.shape
    if B * H == 0:
        return
    _rnn_cell_bwd_kernel[grid_rows(B, H)](hy, dhy, dpre, H, RELU=relu, BLOCK=BLOCK_H,
                                          num_warps=NUM_WARPS)
