"""LSTM cell: fused bias + activations + state update, and its backward (one program per row and
block of hidden units; the GEMMs that produce the gate sums run before, in torch).

Shapes (B = batch, H = hidden size; gate order i, f, g, o as torch.nn.LSTMCell):
  ws [B, 4H]   forward in: x W_ih^T + h W_hh^T (no bias); out: activated gates i, f, g, o
  b_ih, b_hh [4H] or None; cx, cy, hy, dhy, dcy, dcx [B, H]; dgates [B, 4H]"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import check_shape, check_tensors, dummy, launch, load_f, row_block, sigmoid, store_as, tanh


@triton.jit
def _gate_sum(ws_row, b_ih_ptr, b_hh_ptr, mask, HAS_B_IH: tl.constexpr, HAS_B_HH: tl.constexpr):
    return (load_f(ws_row, mask, True) + load_f(b_ih_ptr, mask, HAS_B_IH)
            + load_f(b_hh_ptr, mask, HAS_B_HH))


@triton.jit
def _lstm_cell_fwd_kernel(ws_ptr, b_ih_ptr, b_hh_ptr, cx_ptr, hy_ptr, cy_ptr, H,
                          HAS_B_IH: tl.constexpr, HAS_B_HH: tl.constexpr, BLOCK: tl.constexpr):
    row, j, mask = row_block(H, BLOCK)
    wi = ws_ptr + row * 4 * H + j  # the i chunk; f, g, o follow at +H, +2H, +3H
    bi = b_ih_ptr + j
    bh = b_hh_ptr + j
    i = sigmoid(_gate_sum(wi, bi, bh, mask, HAS_B_IH, HAS_B_HH))
    f = sigmoid(_gate_sum(wi + H, bi + H, bh + H, mask, HAS_B_IH, HAS_B_HH))
    g = tanh(_gate_sum(wi + 2 * H, bi + 2 * H, bh + 2 * H, mask, HAS_B_IH, HAS_B_HH))
    o = sigmoid(_gate_sum(wi + 3 * H, bi + 3 * H, bh + 3 * H, mask, HAS_B_IH, HAS_B_HH))
    s = row * H + j
    c = f * load_f(cx_ptr + s, mask, True) + i * g
    h = o * tanh(c)
    store_as(wi, i, mask)
    store_as(wi + H, f, mask)
    store_as(wi + 2 * H, g, mask)
    store_as(wi + 3 * H, o, mask)
    store_as(cy_ptr + s, c, mask)
    store_as(hy_ptr + s, h, mask)


@triton.jit
def _lstm_cell_bwd_kernel(ws_ptr, cx_ptr, cy_ptr, dhy_ptr, dcy_ptr, dgates_ptr, dcx_ptr, H,
                          HAS_DHY: tl.constexpr, HAS_DCY: tl.constexpr, BLOCK: tl.constexpr):
    row, j, mask = row_block(H, BLOCK)
    wi = ws_ptr + row * 4 * H + j
    i = load_f(wi, mask, True)
    f = load_f(wi + H, mask, True)
    g = load_f(wi + 2 * H, mask, True)
    o = load_f(wi + 3 * H, mask, True)
    s = row * H + j
    c_prev = load_f(cx_ptr + s, mask, True)
    tc = tanh(load_f(cy_ptr + s, mask, True))
    dh = load_f(dhy_ptr + s, mask, HAS_DHY)
    dc = load_f(dcy_ptr + s, mask, HAS_DCY) + dh * o * (1.0 - tc * tc)
    di = dgates_ptr + row * 4 * H + j
    store_as(di, dc * g * i * (1.0 - i), mask)
    store_as(di + H, dc * c_prev * f * (1.0 - f), mask)
    store_as(di + 2 * H, dc * i * (1.0 - g * g), mask)
    store_as(di + 3 * H, dh * tc * o * (1.0 - o), mask)
    store_as(dcx_ptr + s, dc * f, mask)


def lstm_cell_forward(ws, b_ih, b_hh, cx, hy, cy):
    """ws [B, 4H] gate sums without bias -> activated gates (in place); hy, cy [B, H] out."""
    B, H = cx.shape
    check_tensors(ws.dtype, ws.device, ws=ws, b_ih=b_ih, b_hh=b_hh, cx=cx, hy=hy, cy=cy)
    check_shape("ws", ws, (B, 4 * H))
    for name, t in (("b_ih", b_ih), ("b_hh", b_hh)):
        check_shape(name, t, (4 * H,))
    for name, t in (("hy", hy), ("cy", cy)):
        check_shape(name, t, (B, H))
    launch(_lstm_cell_fwd_kernel, B, H, ws, dummy(b_ih, ws), dummy(b_hh, ws), cx, hy, cy, H,
           HAS_B_IH=b_ih is not None, HAS_B_HH=b_hh is not None)


def lstm_cell_backward(ws, cx, cy, dhy, dcy, dgates, dcx):
    """Gradients of the pre-activation gate sums (dgates [B, 4H]) and of cx (dcx [B, H]);
    dhy / dcy None mean zero."""
    B, H = cx.shape
    check_tensors(ws.dtype, ws.device, ws=ws, cx=cx, cy=cy, dhy=dhy, dcy=dcy, dgates=dgates, dcx=dcx)
    check_shape("ws", ws, (B, 4 * H))
    check_shape("dgates", dgates, (B, 4 * H))
    for name, t in (("cy", cy), ("dhy", dhy), ("dcy", dcy), ("dcx", dcx)):
        check_shape(name, t, (B, H))
    launch(_lstm_cell_bwd_kernel, B, H, ws, cx, cy, dummy(dhy, cy), dummy(dcy, cy), dgates, dcx, H,
           HAS_DHY=dhy is not None, HAS_DCY=dcy is not None)
