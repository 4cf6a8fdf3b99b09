"""Loads the compiled ops (pyseqk._C) and gives every op its fake kernel and autograd formula.

The Triton twins of the cell ops (torch.ops.pyseqk.triton_<name>, defined in
pyseqk/_triton_ops.py) get their autograd here; the native ops (torch.ops.pyseqk.<name>) have the
same formulas in C++ (csrc/ops/autograd.cpp). Forward and backward are separate ops, so the
backward is as fused as the forward.
"""
from __future__ import annotations

import torch

from . import backends

NATIVE = backends.native_status()[0]


def _empty(*shape, like):
    return like.new_empty(shape)


def _one_device(input, _input_name="input", **named):
    """The dispatcher sends a call that mixes a meta tensor with real ones to the fake (Meta)
    kernel, which would hand back uninitialised tensors on input's device: raise like the real
    kernels do instead."""
    for name, t in named.items():
        if t is not None and t.device != input.device:
            raise RuntimeError(f"pyseqk: {name} is on {t.device} but {_input_name} is on "
                               f"{input.device}; expected all tensors on one device")


# ---------------------------------------------------------------------------------------------
# Fake kernels: output shapes only, for torch.compile and opcheck.

def _fake_lstm_cell(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    _one_device(input, hx=hx, cx=cx, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh)
    B, H = input.shape[0], w_hh.shape[1]
    return _empty(B, H, like=input), _empty(B, H, like=input), _empty(B, 4 * H, like=input)


def _fake_lstm_cell_backward(grad_hy, grad_cy, input, hx, cx, cy, w_ih, w_hh, workspace):
    _one_device(input, grad_hy=grad_hy, grad_cy=grad_cy, hx=hx, cx=cx, cy=cy, w_ih=w_ih,
                w_hh=w_hh, workspace=workspace)
    return (torch.empty_like(input), torch.empty_like(hx), torch.empty_like(cx),
            torch.empty_like(w_ih), torch.empty_like(w_hh), _empty(w_hh.shape[0], like=input))


def _fake_gru_cell(input, hx, w_ih, w_hh, b_ih, b_hh):
    _one_device(input, hx=hx, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh)
    B, H = input.shape[0], w_hh.shape[1]
    return _empty(B, H, like=input), _empty(B, 6 * H, like=input)


def _fake_gru_cell_backward(grad_hy, input, hx, w_ih, w_hh, workspace):
    _one_device(input, grad_hy=grad_hy, hx=hx, w_ih=w_ih, w_hh=w_hh, workspace=workspace)
    G = w_hh.shape[0]
    return (torch.empty_like(input), torch.empty_like(hx), torch.empty_like(w_ih),
            torch.empty_like(w_hh), _empty(G, like=input), _empty(G, like=input))


def _fake_rnn_cell(input, hx, w_ih, w_hh, b_ih, b_hh):
    _one_device(input, hx=hx, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh)
    return _empty(input.shape[0], w_hh.shape[1], like=input)


def _fake_rnn_cell_backward(grad_hy, input, hx, hy, w_ih, w_hh, relu):
    _one_device(input, grad_hy=grad_hy, hx=hx, hy=hy, w_ih=w_ih, w_hh=w_hh)
    return (torch.empty_like(input), torch.empty_like(hx), torch.empty_like(w_ih),
            torch.empty_like(w_hh), _empty(w_hh.shape[0], like=input))


FAKES = {
    "lstm_cell": _fake_lstm_cell,
    "lstm_cell_backward": _fake_lstm_cell_backward,
    "gru_cell": _fake_gru_cell,
    "gru_cell_backward": _fake_gru_cell_backward,
    "rnn_tanh_cell": _fake_rnn_cell,
    "rnn_relu_cell": _fake_rnn_cell,
    "rnn_cell_backward": _fake_rnn_cell_backward,
}


# ---------------------------------------------------------------------------------------------
# Autograd: one formula per op family, parametrised by the backward op to call.

def _bias_grads(ctx, grad_b_ih, grad_b_hh):
    return (grad_b_ih if ctx.has_b_ih else None), (grad_b_hh if ctx.has_b_hh else None)


def _lstm_setup(ctx, inputs, output):
    input, hx, cx, w_ih, w_hh, b_ih, b_hh = inputs
    _, cy, ws = output
    ctx.save_for_backward(input, hx, cx, cy, w_ih, w_hh, ws)
    ctx.has_b_ih, ctx.has_b_hh = b_ih is not None, b_hh is not None
    ctx.mark_non_differentiable(ws)
    ctx.set_materialize_grads(False)


def _lstm_autograd(backward_op):
    def backward(ctx, grad_hy, grad_cy, _grad_ws):
        if grad_hy is None and grad_cy is None:
            return (None,) * 7
        input, hx, cx, cy, w_ih, w_hh, ws = ctx.saved_tensors
        gi, ghx, gcx, gwi, gwh, gb = backward_op(grad_hy, grad_cy, input, hx, cx, cy, w_ih, w_hh, ws)
        return (gi, ghx, gcx, gwi, gwh) + _bias_grads(ctx, gb, gb)

    return backward


def _gru_setup(ctx, inputs, output):
    input, hx, w_ih, w_hh, b_ih, b_hh = inputs
    ctx.save_for_backward(input, hx, w_ih, w_hh, output[1])
    ctx.has_b_ih, ctx.has_b_hh = b_ih is not None, b_hh is not None
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _gru_autograd(backward_op):
    def backward(ctx, grad_hy, _grad_ws):
        if grad_hy is None:
            return (None,) * 6
        input, hx, w_ih, w_hh, ws = ctx.saved_tensors
        gi, ghx, gwi, gwh, gbi, gbh = backward_op(grad_hy, input, hx, w_ih, w_hh, ws)
        return (gi, ghx, gwi, gwh) + _bias_grads(ctx, gbi, gbh)

    return backward


def _rnn_setup(ctx, inputs, output):
    input, hx, w_ih, w_hh, b_ih, b_hh = inputs
    ctx.save_for_backward(input, hx, output, w_ih, w_hh)
    ctx.has_b_ih, ctx.has_b_hh = b_ih is not None, b_hh is not None


def _rnn_autograd(backward_op, relu):
    def backward(ctx, grad_hy):
        input, hx, hy, w_ih, w_hh = ctx.saved_tensors
        gi, ghx, gwi, gwh, gb = backward_op(grad_hy, input, hx, hy, w_ih, w_hh, relu)
        return (gi, ghx, gwi, gwh) + _bias_grads(ctx, gb, gb)

    return backward


def register(prefix: str, ns, autograd: bool = True) -> None:
    """Fake kernels and (``autograd``) autograd for the cell ops named ``<prefix><op>`` in
    namespace ``ns``. The native ops' autograd is the same formulas in C++
    (csrc/ops/autograd.cpp): a Python autograd kernel costs ~3 us a call even under no_grad."""
    for name, fake in FAKES.items():
        torch.library.register_fake(f"pyseqk::{prefix}{name}", fake)
    if not autograd:
        return
    torch.library.register_autograd(
        f"pyseqk::{prefix}lstm_cell", _lstm_autograd(getattr(ns, f"{prefix}lstm_cell_backward")),
        setup_context=_lstm_setup)
    torch.library.register_autograd(
        f"pyseqk::{prefix}gru_cell", _gru_autograd(getattr(ns, f"{prefix}gru_cell_backward")),
        setup_context=_gru_setup)
    for relu, cell in ((False, "rnn_tanh_cell"), (True, "rnn_relu_cell")):
        torch.library.register_autograd(
            f"pyseqk::{prefix}{cell}",
            _rnn_autograd(getattr(ns, f"{prefix}rnn_cell_backward"), relu),
            setup_context=_rnn_setup)


if NATIVE:
    register("", torch.ops.pyseqk, autograd=False)
