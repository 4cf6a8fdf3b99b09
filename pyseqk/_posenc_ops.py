"""Fake kernels and autograd of the positional-encoding ops: torch.ops.pyseqk.positional_encoding
(C++: CPU and CUDA) and its Triton twin torch.ops.pyseqk.triton_positional_encoding (defined in
pyseqk/_triton_posenc_ops.py). The backward op recomputes the dropout mask from the seed."""
from __future__ import annotations

import torch

from . import backends


def _fake_forward(x, dropout_p, seed, batch_first):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_backward(grad, dropout_p, seed):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    _, ctx.dropout_p, ctx.seed, _ = inputs


def _autograd(backward_op):
    def backward(ctx, grad):
        if ctx.dropout_p == 0.0:
            return grad, None, None, None  # the add has gradient 1
        return backward_op(grad, ctx.dropout_p, ctx.seed), None, None, None

    return backward


def register(prefix: str, ns) -> None:
    """Fake kernels and autograd for ``pyseqk::<prefix>positional_encoding`` in ``ns``."""
    torch.library.register_fake(f"pyseqk::{prefix}positional_encoding", _fake_forward)
    torch.library.register_fake(f"pyseqk::{prefix}positional_encoding_backward", _fake_backward)
    torch.library.register_autograd(
        f"pyseqk::{prefix}positional_encoding",
        _autograd(getattr(ns, f"{prefix}positional_encoding_backward")), setup_context=_setup)


if backends.native_status()[0] and hasattr(torch.ops.pyseqk, "positional_encoding"):
    register("", torch.ops.pyseqk)
