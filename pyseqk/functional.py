"""Drop-in functions: each checks its arguments, picks a backend (pyseqk.backends) and calls the
op of that backend: torch.ops.pyseqk.<op> (cpu, cuda), torch.ops.pyseqk.triton_<op> (triton)
or pyseqk.reference (reference)."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _ops  # noqa: F401  (registers fake kernels and autograd)
from . import backends, reference

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_triton_loaded = False


def _triton_ops():
    global _triton_loaded
    if not _triton_loaded:
        from . import _triton_ops  # noqa: F401  (defines torch.ops.pyseqk.triton_*)

        _triton_loaded = True
    return torch.ops.pyseqk


def _op(backend: str, name: str):
    if backend == "triton":
        return getattr(_triton_ops(), "triton_" + name)
    return getattr(torch.ops.pyseqk, name)


def check_cell(input, hx, w_ih, w_hh, b_ih, b_hh, gates, cx=None):
    """The checks of csrc/ops/cells.h (check_cell), for the backends that are not C++."""
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"pyseqk: input must be float32, float64, float16 or bfloat16, got {input.dtype}")
    for name, t, shape in (("input", input, "[batch, input_size]"), ("hx", hx, "[batch, hidden_size]"),
                           ("w_ih", w_ih, "[gates * hidden_size, input_size]"),
                           ("w_hh", w_hh, "[gates * hidden_size, hidden_size]")):
        if t.dim() != 2:
            raise RuntimeError(f"pyseqk: {name} must be 2-D {shape}, got shape {list(t.shape)}")
    named = [("hx", hx), ("w_ih", w_ih), ("w_hh", w_hh), ("b_ih", b_ih), ("b_hh", b_hh), ("cx", cx)]
    for name, t in named:
        if t is None:
            continue
        if t.device != input.device:
            raise RuntimeError(f"pyseqk: {name} is on {t.device} but input is on {input.device}; "
                               "expected all tensors on one device")
        if t.dtype != input.dtype:
            raise TypeError(f"pyseqk: {name} has dtype {t.dtype} but input has dtype {input.dtype}; "
                            "expected one dtype")
    H = w_hh.shape[1]
    if w_hh.shape[0] != gates * H:
        raise RuntimeError(f"pyseqk: w_hh must have shape [{gates * H}, {H}], got {list(w_hh.shape)}")
    if w_ih.shape[0] != gates * H:
        raise RuntimeError(f"pyseqk: w_ih must have {gates * H} rows (gates * hidden_size), "
                           f"got shape {list(w_ih.shape)}")
    if input.shape[1] != w_ih.shape[1]:
        raise RuntimeError(f"input has inconsistent input_size: got {input.shape[1]} expected {w_ih.shape[1]}")
    if input.shape[0] != hx.shape[0]:
        raise RuntimeError(f"Input batch size {input.shape[0]} doesn't match hidden0 batch size {hx.shape[0]}")
    if hx.shape[1] != H:
        raise RuntimeError(f"hidden0 has inconsistent hidden_size: got {hx.shape[1]}, expected {H}")
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None and (b.dim() != 1 or b.shape[0] != gates * H):
            raise RuntimeError(f"pyseqk: {name} must have shape [{gates * H}], got {list(b.shape)}")
    if cx is not None and cx.shape != hx.shape:
        raise RuntimeError(f"pyseqk: cx must have the shape of hx {list(hx.shape)}, got {list(cx.shape)}")


def lstm_cell(input: Tensor, hx: Tensor, cx: Tensor, w_ih: Tensor, w_hh: Tensor,
              b_ih: Tensor | None = None, b_hh: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One LSTM step on a batch: input [B, I], hx/cx [B, H], w_ih [4H, I], w_hh [4H, H],
    b_ih/b_hh [4H] or None. Returns (hy, cy), each [B, H]."""
    backend = backends.resolve(input.device)
    if backend in ("reference", "triton"):
        check_cell(input, hx, w_ih, w_hh, b_ih, b_hh, 4, cx)
        if backend == "reference":
            return reference.lstm_cell(input, hx, cx, w_ih, w_hh, b_ih, b_hh)
    hy, cy, _ = _op(backend, "lstm_cell")(input, hx, cx, w_ih, w_hh, b_ih, b_hh)
    return hy, cy


def gru_cell(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
             b_hh: Tensor | None = None) -> Tensor:
    """One GRU step: input [B, I], hx [B, H], w_ih [3H, I], w_hh [3H, H]. Returns hy [B, H]."""
    backend = backends.resolve(input.device)
    if backend in ("reference", "triton"):
        check_cell(input, hx, w_ih, w_hh, b_ih, b_hh, 3)
        if backend == "reference":
            return reference.gru_cell(input, hx, w_ih, w_hh, b_ih, b_hh)
    return _op(backend, "gru_cell")(input, hx, w_ih, w_hh, b_ih, b_hh)[0]


def _rnn_cell(name, input, hx, w_ih, w_hh, b_ih, b_hh):
    backend = backends.resolve(input.device)
    if backend in ("reference", "triton"):
        check_cell(input, hx, w_ih, w_hh, b_ih, b_hh, 1)
        if backend == "reference":
            return getattr(reference, name)(input, hx, w_ih, w_hh, b_ih, b_hh)
    return _op(backend, name)(input, hx, w_ih, w_hh, b_ih, b_hh)


def rnn_tanh_cell(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
                  b_hh: Tensor | None = None) -> Tensor:
    """One Elman step, h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh). Shapes as gru_cell, G = 1."""
    return _rnn_cell("rnn_tanh_cell", input, hx, w_ih, w_hh, b_ih, b_hh)


def rnn_relu_cell(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
                  b_hh: Tensor | None = None) -> Tensor:
    """One Elman step with ReLU."""
    return _rnn_cell("rnn_relu_cell", input, hx, w_ih, w_hh, b_ih, b_hh)


# ---------------------------------------------------------------------------------------------
# Whole sequences (one layer, one direction; the nn modules compose layers and directions).
# Time-major input [T, B, I]; lengths: int64 [B] or None (see reference._run_layer).

def lstm_layer(input: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor,
               b_ih: Tensor | None = None, b_hh: Tensor | None = None, w_hr: Tensor | None = None,
               lengths: Tensor | None = None, reverse: bool = False
               ) -> tuple[Tensor, Tensor, Tensor]:
    """input [T, B, I], h0 [B, P], c0 [B, H], w_ih [4H, I], w_hh [4H, P], w_hr [P, H] or None.
    Returns output [T, B, P], h_n [B, P], c_n [B, H]."""
    return reference.lstm_layer(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse)


def gru_layer(input: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
              b_hh: Tensor | None = None, lengths: Tensor | None = None, reverse: bool = False
              ) -> tuple[Tensor, Tensor]:
    """input [T, B, I], h0 [B, H], w_ih [3H, I], w_hh [3H, H]. Returns output [T, B, H], h_n."""
    return reference.gru_layer(input, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse)


def rnn_layer(input: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
              b_hh: Tensor | None = None, nonlinearity: str = "tanh",
              lengths: Tensor | None = None, reverse: bool = False) -> tuple[Tensor, Tensor]:
    """input [T, B, I], h0 [B, H], w_ih [H, I], w_hh [H, H]. Returns output [T, B, H], h_n."""
    return reference.rnn_layer(input, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, lengths, reverse)


# ---------------------------------------------------------------------------------------------
# Attention.

def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                 attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention's signature and semantics."""
    return reference.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p,
                                                  is_causal, scale, enable_gqa)


# ---------------------------------------------------------------------------------------------
# Positional encoding.

from . import _posenc_ops  # noqa: E402,F401  (fake kernels and autograd of the posenc ops)

_triton_posenc_loaded = False


def _posenc_op(backend: str, name: str):
    global _triton_posenc_loaded
    if backend == "triton" and not _triton_posenc_loaded:
        from . import _triton_posenc_ops  # noqa: F401  (defines torch.ops.pyseqk.triton_positional_encoding)

        _triton_posenc_loaded = True
    return _op(backend, name)


def check_positional_encoding(input: Tensor, dropout_p: float) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"pyseqk: input must be a Tensor, got {type(input).__name__}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"pyseqk: input must be float32, float64, float16 or bfloat16, got {input.dtype}")
    if input.dim() not in (2, 3):
        raise RuntimeError("pyseqk: input must be 3-D [seq, batch, d_model] ([batch, seq, d_model] "
                           f"with batch_first) or 2-D [seq, d_model], got shape {list(input.shape)}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"pyseqk: dropout_p must be in [0, 1], got {dropout_p}")


def positional_encoding(input: Tensor, dropout_p: float = 0.0, training: bool = True,
                        batch_first: bool = False, seed: int | None = None) -> Tensor:
    """dropout(input + pe[t]) in one pass, pe the sinusoid of "Attention Is All You Need"
    (pe[t, 2i] = sin(t / 10000^(2i/D)), pe[t, 2i+1] = cos(...)). input: [T, B, D], [B, T, D]
    (batch_first) or [T, D]. Dropout runs when training and dropout_p > 0; its mask is a hash of
    (seed, element index), the seed drawn from torch's generator unless given (torch.manual_seed
    makes runs reproducible). Drawing the seed is a .item(): under torch.compile(fullgraph=True)
    pass ``seed`` or run without dropout."""
    check_positional_encoding(input, dropout_p)
    p = float(dropout_p) if training else 0.0
    if p > 0.0 and seed is None:
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item())
    seed = 0 if seed is None else int(seed)
    backend = backends.resolve(input.device)
    if backend == "reference":
        return reference.positional_encoding(input, p, seed, batch_first)
    return _posenc_op(backend, "positional_encoding")(input, p, seed, batch_first)
