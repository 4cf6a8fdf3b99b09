"""The Triton backend of scaled-dot-product attention: torch.ops.pyseqk.triton_sdpa and
triton_sdpa_backward, with the schemas of the native sdpa / sdpa_backward ops, their fake
kernels and autograd. Imported by pyseqk.functional on the first use of the triton backend."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .kernels import sdpa as _sdpa


@torch.library.custom_op("pyseqk::triton_sdpa", mutates_args=())
def triton_sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
                dropout_p: float, is_causal: bool, scale: float, seed: int
                ) -> tuple[Tensor, Tensor]:
    return _sdpa.sdpa_forward(query, key, value, attn_mask, dropout_p, is_causal, scale, seed)


@torch.library.custom_op("pyseqk::triton_sdpa_backward", mutates_args=())
def triton_sdpa_backward(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor,
                         lse: Tensor, attn_mask: Optional[Tensor], dropout_p: float,
                         is_causal: bool, scale: float, seed: int
                         ) -> tuple[Tensor, Tensor, Tensor]:
    return _sdpa.sdpa_backward(grad_out, query, key, value, out, lse, attn_mask, dropout_p,
                               is_causal, scale, seed)


@triton_sdpa.register_fake
def _(query, key, value, attn_mask, dropout_p, is_causal, scale, seed):
    B, Hq, L, _ = query.shape
    return (query.new_empty(B, Hq, L, value.shape[-1]),
            query.new_empty(B, Hq, L, dtype=torch.float32))


@triton_sdpa_backward.register_fake
def _(grad_out, query, key, value, out, lse, attn_mask, dropout_p, is_causal, scale, seed):
    return (torch.empty_like(query, memory_format=torch.contiguous_format),
            torch.empty_like(key, memory_format=torch.contiguous_format),
            torch.empty_like(value, memory_format=torch.contiguous_format))


def _setup(ctx, inputs, output):
    query, key, value, attn_mask, dropout_p, is_causal, scale, seed = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse, attn_mask)
    ctx.args = (dropout_p, is_causal, scale, seed)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    if ctx.needs_input_grad[3]:
        raise NotImplementedError("pyseqk: the gradient with respect to an additive attn_mask is "
                                  "not implemented; detach the mask")
    query, key, value, out, lse, attn_mask = ctx.saved_tensors
    dq, dk, dv = torch.ops.pyseqk.triton_sdpa_backward(grad_out, query, key, value, out, lse,
                                                      attn_mask, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


triton_sdpa.register_autograd(_backward, setup_context=_setup)
