"""Fake kernels and autograd of the whole-sequence layer ops (torch.ops.pyseqk.{lstm,gru,rnn}_layer
and their Triton twins torch.ops.pyseqk.triton_*_layer): forward and backward are separate ops,
so the backward through time is as fused as the forward. Shapes of the workspaces: see
csrc/ops/layers.cpp."""
from __future__ import annotations

import torch

from . import _ops


def _e(*shape, like):
    return like.new_empty(shape)


# ---------------------------------------------------------------------------------------------
# Fake kernels. Each first checks devices: a call mixing a meta tensor with real ones comes here
# and must raise as the real kernels do. lengths may also be on the CPU (as torch keeps them).


def _devices(input, lengths=None, **named):
    _ops._one_device(input, **named)
    if lengths is not None and lengths.device.type != "cpu" and lengths.device != input.device:
        raise RuntimeError(f"pyseqk: lengths is on {lengths.device} but input is on "
                           f"{input.device}; expected lengths on the CPU or on the input's device")


def _steps(T, workspace):
    """Time steps of a forward's workspaces: none unless workspace (T counts the states' +1)."""
    return T if workspace else 0


def _fake_lstm_layer(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse,
                     workspace=True):
    _devices(input, lengths, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, w_hr=w_hr)
    T, B = input.shape[0], input.shape[1]
    H = w_ih.shape[0] // 4
    P = w_hr.shape[0] if w_hr is not None else H
    return (_e(T, B, P, like=input), _e(B, P, like=input), _e(B, H, like=input),
            _e(_steps(T, workspace), B, 4 * H, like=input),
            _e(_steps(T + 1, workspace), B, P, like=input),
            _e(_steps(T + 1, workspace), B, H, like=input),
            _e(_steps(T, workspace) if w_hr is not None else 0, B, H, like=input))


def _fake_lstm_layer_backward(grad_output, grad_h_n, grad_c_n, input, w_ih, w_hh, w_hr, lengths,
                              reverse, gates, hs, cs, ms):
    _devices(input, lengths, grad_output=grad_output, grad_h_n=grad_h_n, grad_c_n=grad_c_n,
             w_ih=w_ih, w_hh=w_hh, w_hr=w_hr, gates=gates, hs=hs, cs=cs, ms=ms)
    B, H, P = input.shape[1], cs.shape[2], hs.shape[2]
    return (torch.empty_like(input), _e(B, P, like=input), _e(B, H, like=input),
            torch.empty_like(w_ih), torch.empty_like(w_hh), _e(4 * H, like=input),
            torch.empty_like(w_hr) if w_hr is not None else _e(0, like=input))


def _fake_gru_layer(input, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, workspace=True):
    _devices(input, lengths, h0=h0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh)
    T, B, H = input.shape[0], input.shape[1], w_ih.shape[0] // 3
    return (_e(T, B, H, like=input), _e(B, H, like=input),
            _e(_steps(T, workspace), B, 4 * H, like=input),
            _e(_steps(T + 1, workspace), B, H, like=input))


def _fake_gru_layer_backward(grad_output, grad_h_n, input, w_ih, w_hh, lengths, reverse, gates, hs):
    _devices(input, lengths, grad_output=grad_output, grad_h_n=grad_h_n, w_ih=w_ih, w_hh=w_hh,
             gates=gates, hs=hs)
    B, H = input.shape[1], hs.shape[2]
    return (torch.empty_like(input), _e(B, H, like=input), torch.empty_like(w_ih),
            torch.empty_like(w_hh), _e(3 * H, like=input), _e(3 * H, like=input))


def _fake_rnn_layer(input, h0, w_ih, w_hh, b_ih, b_hh, relu, lengths, reverse, workspace=True):
    _devices(input, lengths, h0=h0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh)
    T, B, H = input.shape[0], input.shape[1], w_ih.shape[0]
    return (_e(T, B, H, like=input), _e(B, H, like=input),
            _e(_steps(T + 1, workspace), B, H, like=input))


def _fake_rnn_layer_backward(grad_output, grad_h_n, input, w_ih, w_hh, relu, lengths, reverse, hs):
    _devices(input, lengths, grad_output=grad_output, grad_h_n=grad_h_n, w_ih=w_ih, w_hh=w_hh,
             hs=hs)
    B, H = input.shape[1], hs.shape[2]
    return (torch.empty_like(input), _e(B, H, like=input), torch.empty_like(w_ih),
            torch.empty_like(w_hh), _e(H, like=input))


FAKES = {
    "lstm_layer": _fake_lstm_layer,
    "lstm_layer_backward": _fake_lstm_layer_backward,
    "gru_layer": _fake_gru_layer,
    "gru_layer_backward": _fake_gru_layer_backward,
    "rnn_layer": _fake_rnn_layer,
    "rnn_layer_backward": _fake_rnn_layer_backward,
}


# ---------------------------------------------------------------------------------------------
# Autograd.

# A forward called with workspace=False (functional.py passes it when no gradient is wanted) has
# nothing to differentiate with: its backward raises, naming the op.
def _check_workspace(ctx, name):
    if not ctx.workspace:
        raise RuntimeError(f"pyseqk: {name} was called with workspace=False, so it saved nothing "
                           f"to differentiate with; call it with workspace=True to get gradients")


def _lstm_setup(ctx, inputs, output):
    input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse = inputs[:10]
    gates, hs, cs, ms = output[3:]
    ctx.save_for_backward(input, w_ih, w_hh, w_hr, lengths, gates, hs, cs, ms)
    ctx.reverse = reverse
    ctx.workspace = inputs[10] if len(inputs) > 10 else True
    ctx.n_inputs = len(inputs)
    ctx.has_b = (b_ih is not None, b_hh is not None)
    ctx.mark_non_differentiable(gates, hs, cs, ms)
    ctx.set_materialize_grads(False)


def _none(ctx, given):
    """The Nones that complete a backward's gradients to one per input of the forward."""
    return (None,) * (ctx.n_inputs - given)


def _lstm_autograd(backward_op):
    def backward(ctx, g_out, g_h, g_c, *_ws):
        if g_out is None and g_h is None and g_c is None:
            return (None,) * ctx.n_inputs
        _check_workspace(ctx, "lstm_layer")
        input, w_ih, w_hh, w_hr, lengths, gates, hs, cs, ms = ctx.saved_tensors
        gi, gh0, gc0, gwi, gwh, gb, gwr = backward_op(g_out, g_h, g_c, input, w_ih, w_hh, w_hr,
                                                      lengths, ctx.reverse, gates, hs, cs, ms)
        return (gi, gh0, gc0, gwi, gwh, gb if ctx.has_b[0] else None,
                gb if ctx.has_b[1] else None, gwr if w_hr is not None else None) + _none(ctx, 8)

    return backward


def _gru_setup(ctx, inputs, output):
    input, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse = inputs[:8]
    ctx.save_for_backward(input, w_ih, w_hh, lengths, output[2], output[3])
    ctx.reverse = reverse
    ctx.workspace = inputs[8] if len(inputs) > 8 else True
    ctx.n_inputs = len(inputs)
    ctx.has_b = (b_ih is not None, b_hh is not None)
    ctx.mark_non_differentiable(output[2], output[3])
    ctx.set_materialize_grads(False)


def _gru_autograd(backward_op):
    def backward(ctx, g_out, g_h, *_ws):
        if g_out is None and g_h is None:
            return (None,) * ctx.n_inputs
        _check_workspace(ctx, "gru_layer")
        input, w_ih, w_hh, lengths, gates, hs = ctx.saved_tensors
        gi, gh0, gwi, gwh, gbi, gbh = backward_op(g_out, g_h, input, w_ih, w_hh, lengths,
                                                  ctx.reverse, gates, hs)
        return (gi, gh0, gwi, gwh, gbi if ctx.has_b[0] else None,
                gbh if ctx.has_b[1] else None) + _none(ctx, 6)

    return backward


def _rnn_setup(ctx, inputs, output):
    input, h0, w_ih, w_hh, b_ih, b_hh, relu, lengths, reverse = inputs[:9]
    ctx.save_for_backward(input, w_ih, w_hh, lengths, output[2])
    ctx.relu, ctx.reverse = relu, reverse
    ctx.workspace = inputs[9] if len(inputs) > 9 else True
    ctx.n_inputs = len(inputs)
    ctx.has_b = (b_ih is not None, b_hh is not None)
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)


def _rnn_autograd(backward_op):
    def backward(ctx, g_out, g_h, _g_hs):
        if g_out is None and g_h is None:
            return (None,) * ctx.n_inputs
        _check_workspace(ctx, "rnn_layer")
        input, w_ih, w_hh, lengths, hs = ctx.saved_tensors
        gi, gh0, gwi, gwh, gb = backward_op(g_out, g_h, input, w_ih, w_hh, ctx.relu, lengths,
                                            ctx.reverse, hs)
        return (gi, gh0, gwi, gwh, gb if ctx.has_b[0] else None,
                gb if ctx.has_b[1] else None) + _none(ctx, 6)

    return backward


def register(prefix: str, ns) -> None:
    """Fake kernels and autograd for the layer ops named ``<prefix><op>`` in namespace ``ns``."""
    for name, fake in FAKES.items():
        torch.library.register_fake(f"pyseqk::{prefix}{name}", fake)
    for name, make, setup in (("lstm_layer", _lstm_autograd, _lstm_setup),
                              ("gru_layer", _gru_autograd, _gru_setup),
                              ("rnn_layer", _rnn_autograd, _rnn_setup)):
        torch.library.register_autograd(
            f"pyseqk::{prefix}{name}", make(getattr(ns, f"{prefix}{name}_backward")),
            setup_context=setup)


# A stale extension built before the layer ops existed loads without them: import must not fail.
if _ops.NATIVE and hasattr(torch.ops.pyseqk, "lstm_layer"):
    register("", torch.ops.pyseqk)
