"""The Triton backend's ops: torch.ops.pyseqk.triton_<op>, the same schemas and semantics as the
native ops (csrc/ops/cells.h), with the fused pointwise parts in kernels/ and the GEMMs in
torch. Imported on the first use of the triton backend."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _ops
from .kernels import gru as _gru
from .kernels import lstm as _lstm
from .kernels import rnn as _rnn


def _c(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _check_backward(gates, input, hx, w_ih, w_hh, state=(), workspace=None, ws_cols=0):
    """What check_cell_backward in csrc/ops/cells.h checks: the backward ops are public ops, and a
    direct call with mismatched tensors must raise rather than return gradients of wrong shapes."""
    for name, t in (("input", input), ("hx", hx), ("w_ih", w_ih), ("w_hh", w_hh)):
        if t.dim() != 2:
            raise RuntimeError(f"pyseqk: {name} must be 2-D, got shape {list(t.shape)}")
    B, I, H = input.shape[0], input.shape[1], w_hh.shape[1]
    expected = [("hx", hx, (B, H)), ("w_ih", w_ih, (gates * H, I)), ("w_hh", w_hh, (gates * H, H))]
    expected += [(name, t, (B, H)) for name, t in state]
    if workspace is not None:
        expected.append(("workspace", workspace, (B, ws_cols * H)))
    for name, t, shape in expected:
        if t is None:
            continue
        if t.device != input.device:
            raise RuntimeError(f"pyseqk: {name} is on {t.device} but input is on {input.device}; "
                               "expected all tensors on one device")
        if t.dtype != input.dtype:
            raise TypeError(f"pyseqk: {name} has dtype {t.dtype} but input has dtype {input.dtype}; "
                            "expected one dtype")
        if tuple(t.shape) != shape:
            raise RuntimeError(f"pyseqk: {name} must have shape {list(shape)}, got {list(t.shape)} "
                               f"(sizes from input {list(input.shape)} and w_hh {list(w_hh.shape)})")


def _gemm_backward(dgi, dgh, dh_direct, input, hx, w_ih, w_hh):
    """The parameter gradients every cell backward shares (cell_gemm_backward in C++)."""
    grad_input = dgi @ w_ih
    grad_hx = dgh @ w_hh if dh_direct is None else torch.addmm(dh_direct, dgh, w_hh)
    grad_b_ih = dgi.sum(0)
    grad_b_hh = grad_b_ih if dgh is dgi else dgh.sum(0)
    return grad_input, grad_hx, dgi.t() @ input, dgh.t() @ hx, grad_b_ih, grad_b_hh


@torch.library.custom_op("pyseqk::triton_lstm_cell", mutates_args=())
def triton_lstm_cell(input: Tensor, hx: Tensor, cx: Tensor, w_ih: Tensor, w_hh: Tensor,
                     b_ih: Optional[Tensor], b_hh: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    ws = torch.mm(input, w_ih.t())
    ws.addmm_(hx, w_hh.t())
    hy = input.new_empty(input.shape[0], w_hh.shape[1])
    cy = torch.empty_like(hy)
    _lstm.lstm_cell_forward(ws, _c(b_ih), _c(b_hh), cx.contiguous(), hy, cy)
    return hy, cy, ws


@torch.library.custom_op("pyseqk::triton_lstm_cell_backward", mutates_args=())
def triton_lstm_cell_backward(grad_hy: Optional[Tensor], grad_cy: Optional[Tensor], input: Tensor,
                              hx: Tensor, cx: Tensor, cy: Tensor, w_ih: Tensor, w_hh: Tensor,
                              workspace: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_backward(4, input, hx, w_ih, w_hh, (("grad_hy", grad_hy), ("grad_cy", grad_cy),
                                                 ("cx", cx), ("cy", cy)), workspace, 4)
    dgates = torch.empty_like(workspace, memory_format=torch.contiguous_format)
    dcx = torch.empty_like(cy, memory_format=torch.contiguous_format)
    _lstm.lstm_cell_backward(_c(workspace), cx.contiguous(), _c(cy), _c(grad_hy), _c(grad_cy),
                             dgates, dcx)
    gi, ghx, gwi, gwh, gb, _ = _gemm_backward(dgates, dgates, None, input, hx, w_ih, w_hh)
    return gi, ghx, dcx, gwi, gwh, gb


@torch.library.custom_op("pyseqk::triton_gru_cell", mutates_args=())
def triton_gru_cell(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                    b_hh: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    B, H = input.shape[0], w_hh.shape[1]
    ws = input.new_empty(B, 6 * H)
    torch.mm(input, w_ih.t(), out=ws[:, : 3 * H])
    torch.mm(hx, w_hh.t(), out=ws[:, 3 * H:])
    hy = input.new_empty(B, H)
    _gru.gru_cell_forward(ws, _c(b_ih), _c(b_hh), hx.contiguous(), hy)
    return hy, ws


@torch.library.custom_op("pyseqk::triton_gru_cell_backward", mutates_args=())
def triton_gru_cell_backward(grad_hy: Tensor, input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor,
                             workspace: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_backward(3, input, hx, w_ih, w_hh, (("grad_hy", grad_hy),), workspace, 6)
    B, H = input.shape[0], w_hh.shape[1]
    dgi = input.new_empty(B, 3 * H)
    dgh = input.new_empty(B, 3 * H)
    dh_direct = input.new_empty(B, H)
    _gru.gru_cell_backward(_c(workspace), hx.contiguous(), grad_hy.contiguous(), dgi, dgh, dh_direct)
    return _gemm_backward(dgi, dgh, dh_direct, input, hx, w_ih, w_hh)


def _rnn_cell(input, hx, w_ih, w_hh, b_ih, b_hh, relu):
    hy = torch.mm(input, w_ih.t())
    hy.addmm_(hx, w_hh.t())
    _rnn.rnn_cell_forward(hy, _c(b_ih), _c(b_hh), relu)
    return hy


@torch.library.custom_op("pyseqk::triton_rnn_tanh_cell", mutates_args=())
def triton_rnn_tanh_cell(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor,
                         b_ih: Optional[Tensor], b_hh: Optional[Tensor]) -> Tensor:
    return _rnn_cell(input, hx, w_ih, w_hh, b_ih, b_hh, False)


@torch.library.custom_op("pyseqk::triton_rnn_relu_cell", mutates_args=())
def triton_rnn_relu_cell(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor,
                         b_ih: Optional[Tensor], b_hh: Optional[Tensor]) -> Tensor:
    return _rnn_cell(input, hx, w_ih, w_hh, b_ih, b_hh, True)


@torch.library.custom_op("pyseqk::triton_rnn_cell_backward", mutates_args=())
def triton_rnn_cell_backward(grad_hy: Tensor, input: Tensor, hx: Tensor, hy: Tensor, w_ih: Tensor,
                             w_hh: Tensor, relu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_backward(1, input, hx, w_ih, w_hh, (("grad_hy", grad_hy), ("hy", hy)))
    dpre = torch.empty_like(hy, memory_format=torch.contiguous_format)
    _rnn.rnn_cell_backward(_c(hy), grad_hy.contiguous(), dpre, relu)
    return _gemm_backward(dpre, dpre, None, input, hx, w_ih, w_hh)[:5]


_ops.register("triton_", torch.ops.pyseqk)
