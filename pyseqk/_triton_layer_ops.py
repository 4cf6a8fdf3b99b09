"""The Triton backend's layer ops: torch.ops.pyseqk.triton_{lstm,gru,rnn}_layer and their
backward ops, the same schemas and semantics as the native ops (csrc/ops/layers.cpp). The time
loop is one Triton launch (kernels/layers.py); the input projection before it and the weight
gradients after the backward are torch GEMMs over all T*B rows. Imported on the first use of
the triton backend for a layer."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _layer_ops
from .kernels import layers as _k


def _c(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _lengths(lengths: Optional[Tensor], input: Tensor) -> Optional[Tensor]:
    return None if lengths is None else lengths.to(device=input.device).contiguous()


def _projection(input: Tensor, w_ih: Tensor, bias: Optional[Tensor]) -> Tensor:
    T, B, I = input.shape
    x = input.reshape(T * B, I)
    out = torch.addmm(bias, x, w_ih.t()) if bias is not None else x @ w_ih.t()
    return out.view(T, B, w_ih.shape[0])


def _bias_sum(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    if a is not None and b is not None:
        return a + b
    return a if a is not None else b


def _states(T: int, B: int, width: int, init: Tensor, reverse: bool) -> Tensor:
    s = init.new_empty(T + 1, B, width)
    s[T if reverse else 0] = init
    return s


def _acc_dtype(like: Tensor) -> torch.dtype:
    return torch.float64 if like.dtype == torch.float64 else torch.float32


def _dh(grad: Optional[Tensor], B: int, width: int, like: Tensor) -> Tensor:
    """The gradient carried from step to step, in fp32 (fp64 for double): in bf16 it would be
    rounded at every step (twice for the GRU, whose kernel adds the W_hh product in place)."""
    dh = like.new_zeros(2, B, width, dtype=_acc_dtype(like))
    if grad is not None:
        dh[0] = grad
    return dh


def _weight_grads(dgi: Tensor, dgh: Tensor, input: Tensor, hs: Tensor, w_ih: Tensor,
                  reverse: bool):
    """grad_input, grad_w_ih, grad_w_hh from the gate gradients of all steps (one GEMM each)."""
    T, B, I = input.shape
    gi2 = dgi.reshape(T * B, dgi.shape[2])
    gh2 = dgh.reshape(T * B, dgh.shape[2])
    hprev = hs[1:] if reverse else hs[:T]
    return ((gi2 @ w_ih).view(T, B, I), gi2.t() @ input.reshape(T * B, I),
            gh2.t() @ hprev.reshape(T * B, hs.shape[2]))


def _returned_ws(workspace: bool, *ws: Tensor) -> tuple[Tensor, ...]:
    """The workspaces as the op returns them: whole, or (workspace=False) with no time steps,
    as the native ops (csrc/ops/layers.cpp)."""
    return ws if workspace else tuple(w[:0].clone() for w in ws)


@torch.library.custom_op("pyseqk::triton_lstm_layer", mutates_args=())
def triton_lstm_layer(input: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor,
                      b_ih: Optional[Tensor], b_hh: Optional[Tensor], w_hr: Optional[Tensor],
                      lengths: Optional[Tensor], reverse: bool, workspace: bool = True
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    T, B, _ = input.shape
    H = w_ih.shape[0] // 4
    P = w_hr.shape[0] if w_hr is not None else H
    gates = _projection(input, w_ih, _bias_sum(b_ih, b_hh))
    hs = _states(T, B, P, h0, reverse)
    cs = _states(T, B, H, c0, reverse)
    ms = input.new_zeros(T if w_hr is not None else 0, B, H)
    out = input.new_empty(T, B, P)
    _k.lstm_layer_forward(gates, w_hh.contiguous(), _c(w_hr), hs, cs, ms, out,
                          _lengths(lengths, input), reverse)
    last = 0 if reverse else T
    return (out, hs[last].clone(), cs[last].clone()) + _returned_ws(workspace, gates, hs, cs, ms)


@torch.library.custom_op("pyseqk::triton_lstm_layer_backward", mutates_args=())
def triton_lstm_layer_backward(grad_output: Optional[Tensor], grad_h_n: Optional[Tensor],
                               grad_c_n: Optional[Tensor], input: Tensor, w_ih: Tensor,
                               w_hh: Tensor, w_hr: Optional[Tensor], lengths: Optional[Tensor],
                               reverse: bool, gates: Tensor, hs: Tensor, cs: Tensor, ms: Tensor
                               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    T, B, _ = input.shape
    H, P = cs.shape[2], hs.shape[2]
    dh = _dh(grad_h_n, B, P, input)
    dc = input.new_zeros(B, H, dtype=_acc_dtype(input))
    if grad_c_n is not None:
        dc.copy_(grad_c_n)
    dgates = torch.empty_like(gates)
    dr = input.new_zeros(T if w_hr is not None else 0, B, P)
    _k.lstm_layer_backward(gates, w_hh.contiguous(), _c(w_hr), cs, _c(grad_output), dh, dc,
                           dgates, dr, _lengths(lengths, input), reverse)
    gi, gwi, gwh = _weight_grads(dgates, dgates, input, hs, w_ih, reverse)
    gwr = (dr.reshape(T * B, P).t() @ ms.reshape(T * B, H) if w_hr is not None
           else input.new_empty(0))
    return (gi, dh[T % 2].to(input.dtype, copy=True), dc.to(input.dtype), gwi, gwh,
            dgates.reshape(T * B, 4 * H).sum(0), gwr)


@torch.library.custom_op("pyseqk::triton_gru_layer", mutates_args=())
def triton_gru_layer(input: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor,
                     b_ih: Optional[Tensor], b_hh: Optional[Tensor], lengths: Optional[Tensor],
                     reverse: bool, workspace: bool = True
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    T, B, _ = input.shape
    H = w_ih.shape[0] // 3
    # r and z take both biases in the input GEMM; b_hn stays inside r * (h W_hn^T + b_hn).
    bias = b_ih
    if b_hh is not None:
        rz = torch.cat([b_hh[: 2 * H], b_hh.new_zeros(H)])
        bias = rz if b_ih is None else b_ih + rz
    gi = _projection(input, w_ih, bias)
    hs = _states(T, B, H, h0, reverse)
    ws = input.new_empty(T, B, 4 * H)
    out = input.new_empty(T, B, H)
    _k.gru_layer_forward(gi, w_hh.contiguous(), _c(b_hh[2 * H:]) if b_hh is not None else None,
                         hs, ws, out, _lengths(lengths, input), reverse)
    return (out, hs[0 if reverse else T].clone()) + _returned_ws(workspace, ws, hs)


@torch.library.custom_op("pyseqk::triton_gru_layer_backward", mutates_args=())
def triton_gru_layer_backward(grad_output: Optional[Tensor], grad_h_n: Optional[Tensor],
                              input: Tensor, w_ih: Tensor, w_hh: Tensor,
                              lengths: Optional[Tensor], reverse: bool, gates: Tensor, hs: Tensor
                              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    T, B, _ = input.shape
    H = hs.shape[2]
    dh = _dh(grad_h_n, B, H, input)
    dgi = input.new_empty(T, B, 3 * H)
    dgh = input.new_empty(T, B, 3 * H)
    _k.gru_layer_backward(gates, w_hh.contiguous(), hs, _c(grad_output), dh, dgi, dgh,
                          _lengths(lengths, input), reverse)
    gi, gwi, gwh = _weight_grads(dgi, dgh, input, hs, w_ih, reverse)
    return (gi, dh[T % 2].to(input.dtype, copy=True), gwi, gwh, dgi.reshape(T * B, 3 * H).sum(0),
            dgh.reshape(T * B, 3 * H).sum(0))


@torch.library.custom_op("pyseqk::triton_rnn_layer", mutates_args=())
def triton_rnn_layer(input: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor,
                     b_ih: Optional[Tensor], b_hh: Optional[Tensor], relu: bool,
                     lengths: Optional[Tensor], reverse: bool, workspace: bool = True
                     ) -> tuple[Tensor, Tensor, Tensor]:
    T, B, _ = input.shape
    H = w_ih.shape[0]
    pre = _projection(input, w_ih, _bias_sum(b_ih, b_hh))
    hs = _states(T, B, H, h0, reverse)
    out = input.new_empty(T, B, H)
    _k.rnn_layer_forward(pre, w_hh.contiguous(), hs, out, _lengths(lengths, input), relu, reverse)
    return (out, hs[0 if reverse else T].clone()) + _returned_ws(workspace, hs)


@torch.library.custom_op("pyseqk::triton_rnn_layer_backward", mutates_args=())
def triton_rnn_layer_backward(grad_output: Optional[Tensor], grad_h_n: Optional[Tensor],
                              input: Tensor, w_ih: Tensor, w_hh: Tensor, relu: bool,
                              lengths: Optional[Tensor], reverse: bool, hs: Tensor
                              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    T, B, _ = input.shape
    H = hs.shape[2]
    dh = _dh(grad_h_n, B, H, input)
    dpre = input.new_empty(T, B, H)
    _k.rnn_layer_backward(hs, w_hh.contiguous(), _c(grad_output), dh, dpre,
                          _lengths(lengths, input), relu, reverse)
    gi, gwi, gwh = _weight_grads(dpre, dpre, input, hs, w_ih, reverse)
    return gi, dh[T % 2].to(input.dtype, copy=True), gwi, gwh, dpre.reshape(T * B, H).sum(0)


_layer_ops.register("triton_", torch.ops.pyseqk)
