"""LSTM cell: fused bias + activations + state update, and its backward (one program per row and
block of hidden units; the GEMMs run before, in torch)."""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import BLOCK_H, NUM_WARPS, check_contiguous, dummy, grid_rows, load_f, sigmoid, tanh


@triton.jit
def _lstm_cell_fwd_kernel(ws_ptr, b_ih_ptr, b_hh_ptr, cx_ptr, hy_ptr, cy_ptr, H,
                          HAS_B_IH: tl.constexpr, HAS_B_HH: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = j < H
    g = ws_ptr + row * 4 * H
    pre_i = load_f(g, j, mask, True) + load_f(b_ih_ptr, j, mask, HAS_B_IH) + load_f(b_hh_ptr, j, mask, HAS_B_HH)
    pre_f = load_f(g, H + j, mask, True) + load_f(b_ih_ptr, H + j, mask, HAS_B_IH) + load_f(b_hh_ptr, H + j, mask, HAS_B_HH)
    pre_g = load_f(g, 2 * H + j, mask, True) + load_f(b_ih_ptr, 2 * H + j, mask, HAS_B_IH) + load_f(b_hh_ptr, 2 * H + j, mask, HAS_B_HH)
    pre_o = load_f(g, 3 * H + j, mask, True) + load_f(b_ih_ptr, 3 * H + j, mask, HAS_B_IH) + load_f(b_hh_ptr, 3 * H + j, mask, HAS_B_HH)
    i = sigmoid(pre_i)
    f = sigmoid(pre_f)
    gg = tanh(pre_g)
    o = sigmoid(pre_o)
    c = f * load_f(cx_ptr + row * H, j, mask, True) + i * gg
    h = o * tanh(c)
    dt = ws_ptr.dtype.element_ty
    tl.store(g + j, i.to(dt), mask=mask)
    tl.store(g + H + j, f.to(dt), mask=mask)
    tl.store(g + 2 * H + j, gg.to(dt), mask=mask)
    tl.store(g + 3 * H + j, o.to(dt), mask=mask)
    tl.store(cy_ptr + row * H + j, c.to(dt), mask=mask)
    tl.store(hy_ptr + row * H + j, h.to(dt), mask=mask)


@triton.jit
def _lstm_cell_bwd_kernel(ws_ptr, cx_ptr, cy_ptr, dhy_ptr, dcy_ptr, dgates_ptr, dcx_ptr, H,
                          HAS_DHY: tl.constexpr, HAS_DCY: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = j < H
    g = ws_ptr + row * 4 * H
    i = load_f(g, j, mask, True)
    f = load_f(g, H + j, mask, True)
    gg = load_f(g, 2 * H + j, mask, True)
    o = load_f(g, 3 * H + j, mask, True)
    o_row = row * H
    c_prev = load_f(cx_ptr + o_row, j, mask, True)
    tc = tanh(load_f(cy_ptr + o_row, j, mask, True))
    dh = load_f(dhy_ptr + o_row, j, mask, HAS_DHY)
    dc = load_f(dcy_ptr + o_row, j, mask, HAS_DCY) + dh * o * (1.0 - tc * tc)
    dt = dgates_ptr.dtype.element_ty
    d = dgates_ptr + row * 4 * H
    tl.store(d + j, (dc * gg * i * (1.0 - i)).to(dt), mask=mask)
    tl.store(d + H + j, (dc * c_prev * f * (1.0 - f)).to(dt), mask=mask)
    tl.store(d + 2 * H + j, (dc * i * (1.0 - gg * gg)).to(dt), mask=mask)
    tl.store(d + 3 * H + j, (dh * tc * o * (1.0 - o)).to(dt), mask=mask)
    tl.store(dcx_ptr + o_row + j, (dc * f).to(dt), mask=mask)


def lstm_cell_forward(ws, b_ih, b_hh, cx, hy, cy):
    """ws [B, 4H] gate sums without bias -> activated gates (in place); hy, cy [B, H] out."""
    check_contiguous(ws=ws, b_ih=b_ih, b_hh=b_hh, cx=cx, hy=hy, cy=cy)
    B, H = cx.shape
    if B * H == 0:
        return
    _lstm_cell_fwd_kernel[grid_rows(B, H)](
        ws, dummy(b_ih, ws), dummy(b_hh, ws), cx, hy, cy, H,
        HAS_B_IH=b_ih is not None, HAS_B_HH=b_hh is not None, BLOCK=BLOCK_H, num_warps=NUM_WARPS)


def lstm_cell_backward(ws, cx, cy, dhy, dcy, dgates, dcx):
    """Gradients of the pre-activation gate sums (dgates [B, 4H]) and of cx (dcx [B, H])."""
    check_contiguous(ws=ws, cx=cx, cy=cy, dhy=dhy, dcy=dcy, dgates=dgates, dcx=dcx)
    B, H = cx.shape
    if B * H == 0:
        return
    _lstm_cell_bwd_kernel[grid_rows(B, H)](
        ws, cx, cy, dummy(dhy, cy), dummy(dcy, cy), dgates, dcx, H,
        HAS_DHY=dhy is not None, HAS_DCY=dcy is not None, BLOCK=BLOCK_H, num_warps=NUM_WARPS)
