"""GRU cell: fused biases + gates + state update, and its backward.

Shapes (B = batch, H = hidden size; gate order r, z, n as torch.nn.GRUCell):
  ws [B, 6H]   forward in: [:, :3H] = x W_ih^T, [:, 3H:] = h W_hh^T (no bias);
               out: [:, :4H] = r, z, n, hn (hn = h W_hn^T + b_hn, needed by backward)
  b_ih, b_hh [3H] or None; hx, hy, dhy, dh_direct [B, H]; dgi, dgh [B, 3H]"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import check_shape, check_tensors, dummy, launch, load_f, row_block, sigmoid, store_as, tanh


@triton.jit
def _gru_cell_fwd_kernel(ws_ptr, b_ih_ptr, b_hh_ptr, hx_ptr, hy_ptr, H,
                         HAS_B_IH: tl.constexpr, HAS_B_HH: tl.constexpr, BLOCK: tl.constexpr):
    row, j, mask = row_block(H, BLOCK)
    wi = ws_ptr + row * 6 * H + j  # ir, iz, in at +0, +H, +2H
    wh = wi + 3 * H                # hr, hz, hn
    bi = b_ih_ptr + j
    bh = b_hh_ptr + j
    ir = load_f(wi, mask, True) + load_f(bi, mask, HAS_B_IH)
    iz = load_f(wi + H, mask, True) + load_f(bi + H, mask, HAS_B_IH)
    in_ = load_f(wi + 2 * H, mask, True) + load_f(bi + 2 * H, mask, HAS_B_IH)
    hr = load_f(wh, mask, True) + load_f(bh, mask, HAS_B_HH)
    hz = load_f(wh + H, mask, True) + load_f(bh + H, mask, HAS_B_HH)
    hn = load_f(wh + 2 * H, mask, True) + load_f(bh + 2 * H, mask, HAS_B_HH)
    r = sigmoid(ir + hr)
    z = sigmoid(iz + hz)
    n = tanh(in_ + r * hn)
    s = row * H + j
    h = n + z * (load_f(hx_ptr + s, mask, True) - n)
    store_as(hy_ptr + s, h, mask)
    store_as(wi, r, mask)
    store_as(wi + H, z, mask)
    store_as(wi + 2 * H, n, mask)
    store_as(wi + 3 * H, hn, mask)


@triton.jit
def _gru_cell_bwd_kernel(ws_ptr, hx_ptr, dhy_ptr, dgi_ptr, dgh_ptr, dh_direct_ptr, H,
                         BLOCK: tl.constexpr):
    row, j, mask = row_block(H, BLOCK)
    wi = ws_ptr + row * 6 * H + j
    r = load_f(wi, mask, True)
    z = load_f(wi + H, mask, True)
    n = load_f(wi + 2 * H, mask, True)
    hn = load_f(wi + 3 * H, mask, True)
    s = row * H + j
    h_prev = load_f(hx_ptr + s, mask, True)
    dh = load_f(dhy_ptr + s, mask, True)
    # d(pre r) and d(pre z) are shared by the input and hidden sums; the n gate splits into
    # d(in) on the input side and d(in) * r on the hidden side.
    d_in = dh * (1.0 - z) * (1.0 - n * n)
    d_r = d_in * hn * r * (1.0 - r)
    d_z = dh * (h_prev - n) * z * (1.0 - z)
    di = dgi_ptr + row * 3 * H + j
    dg = dgh_ptr + row * 3 * H + j
    store_as(di, d_r, mask)
    store_as(di + H, d_z, mask)
    store_as(di + 2 * H, d_in, mask)
    store_as(dg, d_r, mask)
    store_as(dg + H, d_z, mask)
    store_as(dg + 2 * H, d_in * r, mask)
    store_as(dh_direct_ptr + s, dh * z, mask)


def gru_cell_forward(ws, b_ih, b_hh, hx, hy):
    """ws [B, 6H] = [x W_ih^T | h W_hh^T] -> [:, :4H] = r, z, n, hn (in place); hy [B, H] out."""
    B, H = hx.shape
    check_tensors(ws.dtype, ws.device, ws=ws, b_ih=b_ih, b_hh=b_hh, hx=hx, hy=hy)
    check_shape("ws", ws, (B, 6 * H))
    for name, t in (("b_ih", b_ih), ("b_hh", b_hh)):
        check_shape(name, t, (3 * H,))
    check_shape("hy", hy, (B, H))
    launch(_gru_cell_fwd_kernel, B, H, ws, dummy(b_ih, ws), dummy(b_hh, ws), hx, hy, H,
           HAS_B_IH=b_ih is not None, HAS_B_HH=b_hh is not None)


def gru_cell_backward(ws, hx, dhy, dgi, dgh, dh_direct):
    """Gradients of the input and hidden gate sums (dgi, dgh [B, 3H]) and the part of the
    gradient of hx that does not pass through W_hh (dh_direct [B, H])."""
    B, H = hx.shape
    check_tensors(ws.dtype, ws.device, ws=ws, hx=hx, dhy=dhy, dgi=dgi, dgh=dgh, dh_direct=dh_direct)
    check_shape("ws", ws, (B, 6 * H))
    for name, t in (("dgi", dgi), ("dgh", dgh)):
        check_shape(name, t, (B, 3 * H))
    for name, t in (("dhy", dhy), ("dh_direct", dh_direct)):
        check_shape(name, t, (B, H))
    launch(_gru_cell_bwd_kernel, B, H, ws, hx, dhy, dgi, dgh, dh_direct, H)
