"""Elman RNN cell (tanh or ReLU): fused bias + activation, and its backward.

Shapes (B = batch, H = hidden size): hy, dhy, dpre [B, H]; b_ih, b_hh [H] or None."""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import check_shape, check_tensors, dummy, launch, load_f, row_block, store_as, tanh


@triton.jit
def _rnn_cell_fwd_kernel(hy_ptr, b_ih_ptr, b_hh_ptr, H, RELU: tl.constexpr,
                         HAS_B_IH: tl.constexpr, HAS_B_HH: tl.constexpr, BLOCK: tl.constexpr):
    row, j, mask = row_block(H, BLOCK)
    p = hy_ptr + row * H + j
    pre = load_f(p, mask, True) + load_f(b_ih_ptr + j, mask, HAS_B_IH) + load_f(b_hh_ptr + j, mask, HAS_B_HH)
    if RELU:
        h = tl.where(pre < 0.0, 0.0, pre)  # NaN passes through, as in torch.relu
    else:
        h = tanh(pre)
    store_as(p, h, mask)


@triton.jit
def _rnn_cell_bwd_kernel(hy_ptr, dhy_ptr, dpre_ptr, H, RELU: tl.constexpr, BLOCK: tl.constexpr):
    row, j, mask = row_block(H, BLOCK)
    s = row * H + j
    h = load_f(hy_ptr + s, mask, True)
    dh = load_f(dhy_ptr + s, mask, True)
    # Both derivatives through the output: relu'(x) = [y > 0], tanh'(x) = 1 - y^2.
    if RELU:
        d = tl.where(h > 0.0, dh, 0.0)
    else:
        d = dh * (1.0 - h * h)
    store_as(dpre_ptr + s, d, mask)


def rnn_cell_forward(hy, b_ih, b_hh, relu):
    """hy [B, H]: the gate sum without bias in, act(sum + biases) out (in place)."""
    B, H = hy.shape
    check_tensors(hy.dtype, hy.device, hy=hy, b_ih=b_ih, b_hh=b_hh)
    for name, t in (("b_ih", b_ih), ("b_hh", b_hh)):
        check_shape(name, t, (H,))
    launch(_rnn_cell_fwd_kernel, B, H, hy, dummy(b_ih, hy), dummy(b_hh, hy), H, RELU=bool(relu),
           HAS_B_IH=b_ih is not None, HAS_B_HH=b_hh is not None)


def rnn_cell_backward(hy, dhy, dpre, relu):
    """dpre [B, H] out: the gradient of the pre-activation sum."""
    B, H = hy.shape
    check_tensors(hy.dtype, hy.device, hy=hy, dhy=dhy, dpre=dpre)
    check_shape("dhy", dhy, (B, H))
    check_shape("dpre", dpre, (B, H))
    launch(_rnn_cell_bwd_kernel, B, H, hy, dhy, dpre, H, RELU=bool(relu))
