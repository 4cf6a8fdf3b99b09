"""The Triton backend's positional-encoding ops: torch.ops.pyseqk.triton_positional_encoding and
its backward, the schemas and semantics of the native ops (csrc/ops/posenc.h), the kernels in
kernels/posenc.py. Imported on the first use of the triton backend."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _posenc_ops
from .kernels import posenc as _posenc


def layout(x: Tensor, batch_first: bool) -> tuple[int, int, int]:
    """(T, R, D) of posenc.h for x [T, B, D], [B, T, D] (batch_first) or [T, D]."""
    if x.dim() == 3:
        return (x.shape[1], 1, x.shape[2]) if batch_first else (x.shape[0], x.shape[1], x.shape[2])
    return x.shape[0], 1, x.shape[1]


@torch.library.custom_op("pyseqk::triton_positional_encoding", mutates_args=())
def triton_positional_encoding(x: Tensor, dropout_p: float, seed: int, batch_first: bool) -> Tensor:
    if x.dim() not in (2, 3):
        raise RuntimeError("pyseqk: x must be 3-D [seq, batch, d_model] ([batch, seq, d_model] "
                           f"with batch_first) or 2-D [seq, d_model], got shape {list(x.shape)}")
    x = x.contiguous()
    out = torch.empty_like(x)
    _posenc.positional_encoding_forward(x, out, *layout(x, batch_first), dropout_p, seed)
    return out


@torch.library.custom_op("pyseqk::triton_positional_encoding_backward", mutates_args=())
def triton_positional_encoding_backward(grad: Tensor, dropout_p: float, seed: int) -> Tensor:
    grad = grad.contiguous()
    grad_x = torch.empty_like(grad)
    _posenc.positional_encoding_backward(grad, grad_x, dropout_p, seed)
    return grad_x


_posenc_ops.register("triton_", torch.ops.pyseqk)
