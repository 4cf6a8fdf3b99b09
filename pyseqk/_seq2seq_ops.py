"""Fake kernels and autograd of the seq2seq attention ops (torch.ops.pyseqk.luong_attention,
bahdanau_attention, and their Triton twins triton_*, defined in pyseqk/_triton_seq2seq_ops.py).
Forward and backward are separate ops; autograd saves the forward's weights [B, Tq, Tk], never
anything of size B x Tq x Tk x units."""
from __future__ import annotations

import torch

from . import backends
from ._ops import _one_device  # a meta tensor among real ones reaches the fakes: raise

NATIVE = backends.native_status()[0]


def _fake_forward(q, k, *rest):
    values = rest[-2]
    B, Tq, Tk = q.shape[0], q.shape[1], k.shape[1]
    return q.new_empty(B, Tq, values.shape[2]), q.new_empty(B, Tq, Tk)


def _fake_luong(query, keys, values, key_padding_mask):
    _one_device(query, "query", keys=keys, values=values, key_padding_mask=key_padding_mask)
    return _fake_forward(query, keys, values, key_padding_mask)


def _fake_bahdanau(wq, uk, v, values, key_padding_mask):
    _one_device(wq, "wq", uk=uk, v=v, values=values, key_padding_mask=key_padding_mask)
    return _fake_forward(wq, uk, v, values, key_padding_mask)


def _fake_luong_backward(grad_context, grad_weights, query, keys, values, weights):
    _one_device(query, "query", grad_context=grad_context, grad_weights=grad_weights, keys=keys,
                values=values, weights=weights)
    return torch.empty_like(query), torch.empty_like(keys), torch.empty_like(values)


def _fake_bahdanau_backward(grad_context, grad_weights, wq, uk, v, values, weights):
    _one_device(wq, "wq", grad_context=grad_context, grad_weights=grad_weights, uk=uk, v=v,
                values=values, weights=weights)
    return torch.empty_like(wq), torch.empty_like(uk), torch.empty_like(v), torch.empty_like(values)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:-1], output[1])  # every tensor but the mask, and the weights
    ctx.set_materialize_grads(False)


def _autograd(backward_op, n_inputs):
    def backward(ctx, grad_context, grad_weights):
        if grad_context is None and grad_weights is None:
            return (None,) * n_inputs
        return tuple(backward_op(grad_context, grad_weights, *ctx.saved_tensors)) + (None,)

    return backward


def register(prefix: str, ns) -> None:
    """Fake kernels and autograd for the seq2seq ops named ``<prefix><op>`` in ``ns``."""
    for name, fake in (("luong_attention", _fake_luong), ("bahdanau_attention", _fake_bahdanau),
                       ("luong_attention_backward", _fake_luong_backward),
                       ("bahdanau_attention_backward", _fake_bahdanau_backward)):
        torch.library.register_fake(f"pyseqk::{prefix}{name}", fake)
    for name, n in (("luong_attention", 4), ("bahdanau_attention", 5)):
        torch.library.register_autograd(
            f"pyseqk::{prefix}{name}", _autograd(getattr(ns, f"{prefix}{name}_backward"), n),
            setup_context=_setup)


if NATIVE:
    register("", torch.ops.pyseqk)
