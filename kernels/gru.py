"""GRU cell: fused biases + gates + state update, and its backward."""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import BLOCK_H, NUM_WARPS, check_contiguous, dummy, grid_rows, load_f, sigmoid, tanh


@triton.jit
def _gru_cell_fwd_kernel(ws_ptr, b_ih_ptr, b_hh_ptr, hx_ptr, hy_ptr, H,
                         HAS_B_IH: tl.constexpr, HAS_B_HH: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = j < H
    g = ws_ptr + row * 6 * H
    ir = load_f(g, j, mask, True) + load_f(b_ih_ptr, j, mask, HAS_B_IH)
    iz = load_f(g, H + j, mask, True) + load_f(b_ih_ptr, H + j, mask, HAS_B_IH)
    in_ = load_f(g, 2 * H + j, mask, True) + load_f(b_ih_ptr, 2 * H + j, mask, HAS_B_IH)
    hr = load_f(g, 3 * H + j, mask, True) + load_f(b_hh_ptr, j, mask, HAS_B_HH)
    hz = load_f(g, 4 * H + j, mask, True) + load_f(b_hh_ptr, H + j, mask, HAS_B_HH)
    hn = load_f(g, 5 * H + j, mask, True) + load_f(b_hh_ptr, 2 * H + j, mask, HAS_B_HH)
    r = sigmoid(ir + hr)
    z = sigmoid(iz + hz)
    n = tanh(in_ + r * hn)
    h = n + z * (load_f(hx_ptr + row * H, j, mask, True) - n)
    dt = ws_ptr.dtype.element_ty
    tl.store(hy_ptr + row * H + j, h.to(dt), mask=mask)
    tl.store(g + j, r.to(dt), mask=mask)
    tl.store(g + H + j, z.to(dt), mask=mask)
    tl.store(g + 2 * H + j, n.to(dt), mask=mask)
    tl.store(g + 3 * H + j, hn.to(dt), mask=mask)


@triton.jit
def _gru_cell_bwd_kernel(ws_ptr, hx_ptr, dhy_ptr, dgi_ptr, dgh_ptr, dh_direct_ptr, H,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = j < H
    g = ws_ptr + row * 6 * H
    r = load_f(g, j, mask, True)
    z = load_f(g, H + j, mask, True)
    n = load_f(g, 2 * H + j, mask, True)
    hn = load_f(g, 3 * H + j, mask, True)
    h_prev = load_f(hx_ptr + row * H, j, mask, True)
    dh = load_f(dhy_ptr + row * H, j, mask, True)
    d_in = dh * (1.0 - z) * (1.0 - n * n)
    d_r = d_in * hn * r * (1.0 - r)
    d_z = dh * (h_prev - n) * z * (1.0 - z)
    dt = dgi_ptr.dtype.element_ty
    di = dgi_ptr + row * 3 * H
    dg = dgh_ptr + row * 3 * H
    tl.store(di + j, d_r.to(dt), mask=mask)
    tl.store(di + H + j, d_z.to(dt), mask=mask)
    tl.store(di + 2 * H + j, d_in.to(dt), mask=mask)
    tl.store(dg + j, d_r.to(dt), mask=mask)
    tl.store(dg + H + j, d_z.to(dt), mask=mask)
    tl.store(dg + 2 * H + j, (d_in * r).to(dt), mask=mask)
    tl.store(dh_direct_ptr + row * H + j, (dh * z).to(dt), mask=mask)


def gru_cell_forward(ws, b_ih, b_hh, hx, hy):
    """ws [B, 6H] = [x W_ih^T | h W_hh^T] -> [:, :4H] = r, z, n, hn (in place); hy [B, H] out."""
    check_contiguous(ws=ws, b_ih=b_ih, b_hh=b_hh, hx=hx, hy=hy)
    B, H = hx.shape
    if B * H == 0:
        return
    _gru_cell_fwd_kernel[grid_rows(B, H)](
        ws, dummy(b_ih, ws), dummy(b_hh, ws), hx, hy, H,
        HAS_B_IH=b_ih is not None, HAS_B_HH=b_hh is not None, BLOCK=BLOCK_H, num_warps=NUM_WARPS)


def gru_cell_backward(ws, hx, dhy, dgi, dgh, dh_direct):
    """Gradients of the input and hidden gate sums (dgi, dgh [B, 3H]) and dh_direct [B, H]."""
    check_contiguous(ws=ws, hx=hx, dhy=dhy, dgi=dgi, dgh=dgh, dh_direct=dh_direct)
    B, H = hx.shape
    if B * H == 0:
        return
    _gru_cell_bwd_kernel[grid_rows(B, H)](ws, hx, dhy, dgi, dgh, dh_direct, H, BLOCK=BLOCK_H,
                                          num_warps=NUM_WARPS)
