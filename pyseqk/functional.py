"""Drop-in functions: each checks its arguments, picks a backend (pyseqk.backends) and calls the
op of that backend: torch.ops.pyseqk.<op> (cpu, cuda), torch.ops.pyseqk.triton_<op> (triton)
or pyseqk.reference (reference)."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _ops  # noqa: F401  (registers fake kernels and autograd)
from . import _layer_ops  # noqa: F401  (the layer ops' fake kernels and autograd)
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

def check_layer(input, h0, w_ih, w_hh, b_ih, b_hh, gates, lengths, c0=None, w_hr=None):
    """The checks of csrc/ops/layers.h (check_layer, layer_lengths), for the backends that are
    not C++. Shapes: input [T, B, I], h0 [B, P], c0 [B, H], w_ih [G*H, I], w_hh [G*H, P],
    w_hr [P, H], lengths int64 [B] with values in [0, T]."""
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"pyseqk: input must be float32, float64, float16 or bfloat16, got {input.dtype}")
    for name, t, dim, shape in (("input", input, 3, "[T, batch, input_size]"),
                                ("h0", h0, 2, "[batch, hidden_size]"),
                                ("w_ih", w_ih, 2, "[gates * hidden_size, input_size]"),
                                ("w_hh", w_hh, 2, "[gates * hidden_size, hidden_size]"),
                                ("w_hr", w_hr, 2, "[proj_size, hidden_size]")):
        if t is not None and t.dim() != dim:
            raise RuntimeError(f"pyseqk: {name} must be {dim}-D {shape}, got shape {list(t.shape)}")
    for name, t in (("h0", h0), ("w_ih", w_ih), ("w_hh", w_hh), ("w_hr", w_hr), ("b_ih", b_ih),
                    ("b_hh", b_hh), ("c0", c0)):
        if t is None:
            continue
        if t.device != input.device:
            raise RuntimeError(f"pyseqk: {name} is on {t.device} but input is on {input.device}; "
                               "expected all tensors on one device")
        if t.dtype != input.dtype:
            raise TypeError(f"pyseqk: {name} has dtype {t.dtype} but input has dtype {input.dtype}; "
                            "expected one dtype")
    T, B = input.shape[0], input.shape[1]
    if w_ih.shape[0] % gates:
        raise RuntimeError(f"pyseqk: w_ih must have gates * hidden_size rows ({gates} gates), "
                           f"got shape {list(w_ih.shape)}")
    H = w_ih.shape[0] // gates
    P = w_hr.shape[0] if w_hr is not None else H
    if list(w_hh.shape) != [gates * H, P]:
        raise RuntimeError(f"pyseqk: w_hh must have shape [{gates * H}, {P}], got {list(w_hh.shape)}")
    if input.shape[2] != w_ih.shape[1]:
        raise RuntimeError(f"pyseqk: input has inconsistent input_size: got {input.shape[2]}, "
                           f"expected {w_ih.shape[1]} (w_ih.shape[1])")
    if list(h0.shape) != [B, P]:
        raise RuntimeError(f"pyseqk: h0 must have shape [{B}, {P}] (batch, hidden_size), "
                           f"got {list(h0.shape)}")
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None and list(b.shape) != [gates * H]:
            raise RuntimeError(f"pyseqk: {name} must have shape [{gates * H}], got {list(b.shape)}")
    if w_hr is not None and w_hr.shape[1] != H:
        raise RuntimeError(f"pyseqk: w_hr must have shape [{P}, {H}] (proj_size, hidden_size), "
                           f"got {list(w_hr.shape)}")
    if c0 is not None and list(c0.shape) != [B, H]:
        raise RuntimeError(f"pyseqk: c0 must have shape [{B}, {H}] (batch, hidden_size), "
                           f"got {list(c0.shape)}")
    if lengths is not None:
        if lengths.dtype != torch.int64:
            raise TypeError(f"pyseqk: lengths must be int64, got {lengths.dtype}")
        if lengths.dim() != 1 or lengths.shape[0] != B:
            raise RuntimeError(f"pyseqk: lengths must have shape [B] = [{B}], got {list(lengths.shape)}")
        if lengths.device.type != "cpu" and lengths.device != input.device:
            raise RuntimeError(f"pyseqk: lengths is on {lengths.device} but input is on "
                               f"{input.device}; expected lengths on the CPU or on the input's device")
        bad = ((lengths < 0) | (lengths > T)).nonzero()
        if bad.numel():
            b = int(bad[0, 0])
            raise RuntimeError(f"pyseqk: lengths values must be in [0, T] = [0, {T}], got "
                               f"lengths[{b}] = {int(lengths[b])}")


def lstm_layer(input: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor,
               b_ih: Tensor | None = None, b_hh: Tensor | None = None, w_hr: Tensor | None = None,
               lengths: Tensor | None = None, reverse: bool = False
               ) -> tuple[Tensor, Tensor, Tensor]:
    """input [T, B, I], h0 [B, P], c0 [B, H], w_ih [4H, I], w_hh [4H, P], w_hr [P, H] or None.
    Returns output [T, B, P], h_n [B, P], c_n [B, H]."""
    backend = backends.resolve(input.device)
    if backend in ("reference", "triton"):
        check_layer(input, h0, w_ih, w_hh, b_ih, b_hh, 4, lengths, c0, w_hr)
        if backend == "reference":
            return reference.lstm_layer(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
                                        reverse)
    out, h, c = _layer_op(backend, "lstm_layer")(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                                                 lengths, reverse)[:3]
    return out, h, c


def gru_layer(input: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
              b_hh: Tensor | None = None, lengths: Tensor | None = None, reverse: bool = False
              ) -> tuple[Tensor, Tensor]:
    """input [T, B, I], h0 [B, H], w_ih [3H, I], w_hh [3H, H]. Returns output [T, B, H], h_n."""
    backend = backends.resolve(input.device)
    if backend in ("reference", "triton"):
        check_layer(input, h0, w_ih, w_hh, b_ih, b_hh, 3, lengths)
        if backend == "reference":
            return reference.gru_layer(input, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse)
    out, h = _layer_op(backend, "gru_layer")(input, h0, w_ih, w_hh, b_ih, b_hh, lengths,
                                             reverse)[:2]
    return out, h


def rnn_layer(input: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
              b_hh: Tensor | None = None, nonlinearity: str = "tanh",
              lengths: Tensor | None = None, reverse: bool = False) -> tuple[Tensor, Tensor]:
    """input [T, B, I], h0 [B, H], w_ih [H, I], w_hh [H, H]. Returns output [T, B, H], h_n."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"pyseqk: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    backend = backends.resolve(input.device)
    if backend in ("reference", "triton"):
        check_layer(input, h0, w_ih, w_hh, b_ih, b_hh, 1, lengths)
        if backend == "reference":
            return reference.rnn_layer(input, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, lengths,
                                       reverse)
    out, h = _layer_op(backend, "rnn_layer")(input, h0, w_ih, w_hh, b_ih, b_hh,
                                             nonlinearity == "relu", lengths, reverse)[:2]
    return out, h


_triton_layers_loaded = False


def _layer_op(backend: str, name: str):
    global _triton_layers_loaded
    if backend == "triton" and not _triton_layers_loaded:
        from . import _triton_layer_ops  # noqa: F401  (defines torch.ops.pyseqk.triton_*_layer)

        _triton_layers_loaded = True
    return _op(backend, name)


# ---------------------------------------------------------------------------------------------
# Attention.

def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                 attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention's signature and semantics."""
    return reference.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p,
                                                  is_causal, scale, enable_gqa)
