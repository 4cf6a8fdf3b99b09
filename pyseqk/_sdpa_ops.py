"""Fake kernels and autograd of the scaled-dot-product attention op (torch.ops.pyseqk.sdpa, schema
in csrc/ops/sdpa.cpp).

    sdpa(query [B, Hq, L, E], key [B, Hk, S, E], value [B, Hk, S, Ev], attn_mask, dropout_p,
         is_causal, scale, seed) -> (out [B, Hq, L, Ev], lse [B, Hq, L])

lse is float32, or float64 for float64 inputs (a float32 lse would put 6e-8 relative errors
into every float64 probability the backward recomputes from it).

Gradients flow to query, key and value only. ``attn_mask`` is not differentiated (an additive
mask gets no gradient; use the reference backend if you need one), and ``lse`` and ``seed`` are
not differentiable: ``lse`` is what the backward recomputes the probabilities from, ``seed`` fixes
the dropout mask so that the backward drops exactly what the forward dropped.

``register(prefix, ns)`` gives the same registrations to a twin op ``<prefix>sdpa`` (for instance
the Triton one, ``triton_sdpa`` / ``triton_sdpa_backward``), which must have the same schema.
"""
from __future__ import annotations

import torch

from . import backends

NATIVE = backends.native_status()[0]


def _fake_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, seed):
    B, Hq, L = query.shape[:3]
    Ev = value.shape[-1]
    lse_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    return query.new_empty(B, Hq, L, Ev), query.new_empty(B, Hq, L, dtype=lse_dtype)


def _fake_sdpa_backward(grad_out, query, key, value, out, lse, attn_mask, dropout_p, is_causal,
                        scale, seed):
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


def _setup(ctx, inputs, output):
    query, key, value, attn_mask, dropout_p, is_causal, scale, seed = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse, attn_mask)
    ctx.args = (dropout_p, is_causal, scale, seed)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _autograd(backward_op):
    def backward(ctx, grad_out, _grad_lse):
        if grad_out is None:
            return (None,) * 8
        query, key, value, out, lse, attn_mask = ctx.saved_tensors
        dropout_p, is_causal, scale, seed = ctx.args
        gq, gk, gv = backward_op(grad_out, query, key, value, out, lse, attn_mask, dropout_p,
                                 is_causal, scale, seed)
        return gq, gk, gv, None, None, None, None, None

    return backward


def register(prefix: str, ns) -> None:
    """Fake kernels and autograd for ``<prefix>sdpa`` and ``<prefix>sdpa_backward`` in ``ns``."""
    torch.library.register_fake(f"pyseqk::{prefix}sdpa", _fake_sdpa)
    torch.library.register_fake(f"pyseqk::{prefix}sdpa_backward", _fake_sdpa_backward)
    torch.library.register_autograd(f"pyseqk::{prefix}sdpa",
                                    _autograd(getattr(ns, f"{prefix}sdpa_backward")),
                                    setup_context=_setup)


if NATIVE:
    register("", torch.ops.pyseqk)
