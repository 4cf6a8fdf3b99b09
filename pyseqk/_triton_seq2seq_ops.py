"""The Triton backend's seq2seq attention ops: torch.ops.pyseqk.triton_luong_attention and
triton_bahdanau_attention (and their backward ops), the schemas and semantics of the native ops
(csrc/ops/seq2seq.h). Forward: one fused kernel (kernels/seq2seq_attention.py). Backward: the
softmax backward and the GEMMs in torch, the Bahdanau tanh recompute in Triton. Imported on the
first use of the triton backend."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _seq2seq_ops
from .kernels import seq2seq_attention as _k


def _score_grad(grad_context, grad_weights, values, weights):
    """d loss / d score in the math dtype (score_grad in csrc/ops/seq2seq.h)."""
    acc = _k.acc_dtype(weights.dtype)
    p = weights.to(acc)
    dp = None if grad_weights is None else grad_weights.to(acc)
    if grad_context is not None:
        g = torch.bmm(grad_context.to(acc), values.to(acc).transpose(1, 2))
        dp = g if dp is None else dp + g
    if dp is None:
        return torch.zeros_like(p)
    return p * (dp - (p * dp).sum(-1, keepdim=True))


def _values_grad(grad_context, values, weights):
    if grad_context is None:
        return torch.zeros_like(values)
    acc = _k.acc_dtype(weights.dtype)
    return torch.bmm(weights.to(acc).transpose(1, 2), grad_context.to(acc)).to(values.dtype)


def _forward(q, k, v, values, mask, additive):
    B, Tq, Tk, Hv = q.shape[0], q.shape[1], k.shape[1], values.shape[2]
    context = q.new_empty(B, Tq, Hv)
    weights = q.new_empty(B, Tq, Tk)
    _k.attention_forward(q.contiguous(), k.contiguous(), None if v is None else v.contiguous(),
                         values.contiguous(), mask, context, weights, additive)
    return context, weights


@torch.library.custom_op("pyseqk::triton_luong_attention", mutates_args=())
def triton_luong_attention(query: Tensor, keys: Tensor, values: Tensor,
                           key_padding_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _forward(query, keys, None, values, key_padding_mask, False)


@torch.library.custom_op("pyseqk::triton_luong_attention_backward", mutates_args=())
def triton_luong_attention_backward(grad_context: Optional[Tensor], grad_weights: Optional[Tensor],
                                    query: Tensor, keys: Tensor, values: Tensor,
                                    weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    ds = _score_grad(grad_context, grad_weights, values, weights)
    return (torch.bmm(ds, keys.to(ds.dtype)).to(query.dtype),
            torch.bmm(ds.transpose(1, 2), query.to(ds.dtype)).to(keys.dtype),
            _values_grad(grad_context, values, weights))


@torch.library.custom_op("pyseqk::triton_bahdanau_attention", mutates_args=())
def triton_bahdanau_attention(wq: Tensor, uk: Tensor, v: Tensor, values: Tensor,
                              key_padding_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _forward(wq, uk, v, values, key_padding_mask, True)


@torch.library.custom_op("pyseqk::triton_bahdanau_attention_backward", mutates_args=())
def triton_bahdanau_attention_backward(grad_context: Optional[Tensor],
                                       grad_weights: Optional[Tensor], wq: Tensor, uk: Tensor,
                                       v: Tensor, values: Tensor,
                                       weights: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    ds = _score_grad(grad_context, grad_weights, values, weights).contiguous()
    dwq, duk, dv = _k.bahdanau_backward(wq.contiguous(), uk.contiguous(), v.contiguous(), ds)
    return (dwq.to(wq.dtype), duk.to(uk.dtype), dv.to(v.dtype),
            _values_grad(grad_context, values, weights))


_seq2seq_ops.register("triton_", torch.ops.pyseqk)
