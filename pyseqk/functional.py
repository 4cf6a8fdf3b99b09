"""Drop-in functions: each checks its arguments, picks a backend (pyseqk.backends) and calls the
op of that backend: torch.ops.pyseqk.<op> (cpu, cuda), torch.ops.pyseqk.triton_<op> (triton)
or pyseqk.reference (reference)."""
from __future__ import annotations

import importlib

import torch
from torch import Tensor

from . import _ops  # noqa: F401  (registers fake kernels and autograd)
from . import _layer_ops  # noqa: F401  (the layer ops' fake kernels and autograd)
from . import backends, reference

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_triton_modules_loaded: set[str] = set()


def _op(backend: str, name: str, triton_module: str = "_triton_ops"):
    """torch.ops.pyseqk.<name>, or for backend "triton" its twin torch.ops.pyseqk.triton_<name>,
    defined by the family's module pyseqk.<triton_module>: imported on first use, because
    importing Triton costs seconds that users of the other backends should not pay."""
    if backend != "triton":
        return getattr(torch.ops.pyseqk, name)
    if triton_module not in _triton_modules_loaded:
        try:
            importlib.import_module(f".{triton_module}", __package__)
        except ImportError as e:
            raise backends.BackendError(
                f"backend 'triton' has no {name} in this build: pyseqk.{triton_module} could not "
                f"be imported ({e})") from e
        _triton_modules_loaded.add(triton_module)
    return getattr(torch.ops.pyseqk, "triton_" + name)


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
        raise RuntimeError(f"input has inconsistent input_size: got {input.shape[1]} expected {w_ih.shape[1]} "
                           f"(input is {list(input.shape)}, w_ih is {list(w_ih.shape)})")
    if input.shape[0] != hx.shape[0]:
        raise RuntimeError(f"Input batch size {input.shape[0]} doesn't match hidden0 batch size {hx.shape[0]} "
                           f"(input is {list(input.shape)}, hx is {list(hx.shape)})")
    if hx.shape[1] != H:
        raise RuntimeError(f"hidden0 has inconsistent hidden_size: got {hx.shape[1]}, expected {H} "
                           f"(hx is {list(hx.shape)}, w_hh is {list(w_hh.shape)})")
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
        raise RuntimeError(f"pyseqk: h0 must have shape [{B}, {P}] (input's batch, hidden_size), "
                           f"got {list(h0.shape)}")
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None and list(b.shape) != [gates * H]:
            raise RuntimeError(f"pyseqk: {name} must have shape [{gates * H}], got {list(b.shape)}")
    if w_hr is not None and w_hr.shape[1] != H:
        raise RuntimeError(f"pyseqk: w_hr must have shape [{P}, {H}] (proj_size, hidden_size), "
                           f"got {list(w_hr.shape)}")
    if c0 is not None and list(c0.shape) != [B, H]:
        raise RuntimeError(f"pyseqk: c0 must have shape [{B}, {H}] (input's batch, hidden_size), "
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


def _workspace(*tensors: Tensor | None) -> bool:
    """Whether a layer op must return the workspace its backward reads: only when autograd will
    record it (torch.nn's inference path likewise saves nothing). A constant under
    torch.compile's tracing, which guards on grad mode and requires_grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


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
    op = _op(backend, "lstm_layer", "_triton_layer_ops")
    ws = _workspace(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    out, h, c = op(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, ws)[:3]
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
    op = _op(backend, "gru_layer", "_triton_layer_ops")
    ws = _workspace(input, h0, w_ih, w_hh, b_ih, b_hh)
    out, h = op(input, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, ws)[:2]
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
    op = _op(backend, "rnn_layer", "_triton_layer_ops")
    ws = _workspace(input, h0, w_ih, w_hh, b_ih, b_hh)
    out, h = op(input, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity == "relu", lengths, reverse,
                ws)[:2]
    return out, h


# ---------------------------------------------------------------------------------------------
# Attention: scaled dot-product (fused op torch.ops.pyseqk.sdpa; pyseqk/_sdpa_ops.py registers its
# fake kernel and autograd, pyseqk/_triton_sdpa_ops.py its Triton twin triton_sdpa).

from . import _sdpa_ops  # noqa: E402,F401  (fake kernel and autograd of torch.ops.pyseqk.sdpa)

def _heads(t: Tensor) -> int:
    return t.shape[-3] if t.dim() >= 3 else 1


def check_sdpa(query, key, value, attn_mask, dropout_p, enable_gqa):
    """Checks of scaled_dot_product_attention's arguments, including the inconsistencies that
    torch.nn.functional's version accepts and then computes garbage for."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"pyseqk: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise RuntimeError(f"pyseqk: {name} must have at least 2 dimensions [..., seq, embed], "
                               f"got shape {list(t.shape)}")
    if query.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"pyseqk: query must be float32, float64, float16 or bfloat16, got {query.dtype}")
    for name, t in (("key", key), ("value", value)):
        if t.device != query.device:
            raise RuntimeError(f"pyseqk: {name} is on {t.device} but query is on {query.device}; "
                               "expected all tensors on one device")
        if t.dtype != query.dtype:
            raise TypeError(f"pyseqk: {name} has dtype {t.dtype} but query has dtype {query.dtype}; "
                            "expected one dtype")
        if t.dim() != query.dim():
            raise RuntimeError(f"pyseqk: {name} must have as many dimensions as query "
                               f"({query.dim()}), got shape {list(t.shape)}")
        if t.shape[:-3] != query.shape[:-3]:
            raise RuntimeError(f"pyseqk: {name} must have the query's batch dimensions "
                               f"{list(query.shape[:-3])}, got shape {list(t.shape)}")
    if query.shape[-1] == 0:
        raise RuntimeError(f"pyseqk: query must have a non-empty embedding dimension E (its last), "
                           f"got shape {list(query.shape)}")
    if key.shape[-1] != query.shape[-1]:
        raise RuntimeError(f"pyseqk: key must have the query's embedding size E = {query.shape[-1]} "
                           f"in its last dimension, got key of shape {list(key.shape)}")
    if value.shape[-2] != key.shape[-2]:
        raise RuntimeError(f"pyseqk: value must have the key's sequence length S = {key.shape[-2]}, "
                           f"got value of shape {list(value.shape)} and key of shape {list(key.shape)}")
    Hq, Hk = _heads(query), _heads(key)
    if _heads(value) != Hk:
        raise RuntimeError(f"pyseqk: value must have the key's number of heads {Hk}, got value of "
                           f"shape {list(value.shape)}")
    if Hq != Hk:
        if not enable_gqa:
            raise RuntimeError(f"pyseqk: query has {Hq} heads but key and value have {Hk}; pass "
                               "enable_gqa=True for grouped-query attention")
        if Hk == 0 or Hq % Hk != 0:
            raise RuntimeError(f"pyseqk: the query's number of heads ({Hq}) must be a multiple of "
                               f"the key's ({Hk}) for grouped-query attention")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"pyseqk: dropout_p must be in [0, 1), got {dropout_p}")
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"pyseqk: attn_mask must be a Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.device != query.device:
            raise RuntimeError(f"pyseqk: attn_mask is on {attn_mask.device} but query is on "
                               f"{query.device}; expected all tensors on one device")
        if attn_mask.dtype not in (torch.bool, query.dtype):
            raise TypeError(f"pyseqk: attn_mask must be torch.bool or the query's dtype "
                            f"{query.dtype}, got {attn_mask.dtype}")
        target = tuple(query.shape[:-1]) + (key.shape[-2],)
        ok = attn_mask.dim() <= len(target) and all(
            m == 1 or m == t for m, t in zip(reversed(attn_mask.shape), reversed(target)))
        if not ok:
            raise RuntimeError(f"pyseqk: attn_mask must be broadcastable to [..., heads, L, S] = "
                               f"{list(target)}, got shape {list(attn_mask.shape)}")


def _mask_4d(attn_mask: Tensor, batch: tuple, B: int, Hq: int, L: int, S: int) -> Tensor:
    """attn_mask as a 4-D [B, Hq, L, S] view (stride 0 where it broadcasts): never materialised,
    except over the batch dimensions when several of them cannot be merged into one stride."""
    nd = len(batch) + 3
    m = attn_mask.reshape((1,) * (nd - attn_mask.dim()) + tuple(attn_mask.shape))
    full = m.expand(*batch, Hq, L, S)
    try:
        return full.view(B, Hq, L, S)
    except RuntimeError:
        return m.expand(*batch, *m.shape[-3:]).reshape(B, *m.shape[-3:]).expand(B, Hq, L, S)


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                 attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention's signature and semantics.

    query [..., Hq, L, E], key [..., Hk, S, E], value [..., Hk, S, Ev] (Hq a multiple of Hk with
    enable_gqa=True), any number of leading batch dimensions (the same for all three). attn_mask:
    bool (True = take part) or additive in the query's dtype, broadcastable to [..., Hq, L, S].
    is_causal: top-left aligned (query i sees keys j <= i); unlike torch it may be combined with
    attn_mask (both apply). A query row with nothing to attend gets zeros, as torch's CPU kernel.
    dropout_p > 0 draws the dropout seed from torch's default generator (reproducible under
    torch.manual_seed). Returns [..., Hq, L, Ev] in the query's dtype. Gradients flow to query,
    key and value (not to attn_mask, except on the reference backend)."""
    check_sdpa(query, key, value, attn_mask, dropout_p, enable_gqa)
    E = query.shape[-1]
    scale = E ** -0.5 if scale is None else float(scale)
    seed = int(torch.randint(0, 2 ** 32, ()).item()) if dropout_p > 0.0 else 0
    backend = backends.resolve(query.device)
    if backend == "reference":
        return reference.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
            seed if dropout_p > 0.0 else None)
    batch = tuple(query.shape[:-3])
    B = 1
    for n in batch:
        B *= n
    Hq, Hk, L, S, Ev = _heads(query), _heads(key), query.shape[-2], key.shape[-2], value.shape[-1]
    q = query.reshape(B, Hq, L, E)
    k = key.reshape(B, Hk, S, E)
    v = value.reshape(B, Hk, S, Ev)
    mask = None if attn_mask is None else _mask_4d(attn_mask, batch, B, Hq, L, S)
    op = _op(backend, "sdpa", "_triton_sdpa_ops")
    out, _ = op(q, k, v, mask, float(dropout_p), bool(is_causal), scale, seed)
    return out.reshape(query.shape[:-1] + (Ev,))

    """torch.nn.functional.scaled_dot_product_attention's signature and semantics."""
    return reference.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p,
                                                  is_causal, scale, enable_gqa)


# ---------------------------------------------------------------------------------------------
# Positional encoding.

from . import _posenc_ops  # noqa: E402,F401  (fake kernels and autograd of the posenc ops)

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
    return _op(backend, "positional_encoding", "_triton_posenc_ops")(input, p, seed, batch_first)

# seq2seq attention (Luong, Bahdanau): ops in csrc/ops/seq2seq.cpp, autograd in _seq2seq_ops.py.
# key_padding_mask: bool [B, Tk], True = padding. A query row whose keys are all padding gets
# zero weights and a zero context (and passes no gradient), not a softmax's NaN.

from . import _seq2seq_ops  # noqa: E402,F401  (registers fake kernels and autograd)

def _shape(t):
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_seq2seq(q, qn, k, kn, values, mask, v=None):
    """The checks of csrc/ops/seq2seq.h (check_attention), message for message, for the backends
    that are not C++. q/k are the two sides of the score (query/keys or wq/uk)."""
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"pyseqk: {qn} must be float32, float64, float16 or bfloat16, got {q.dtype}")
    for name, t, shape in ((qn, q, "[batch, query_len, features]"), (kn, k, "[batch, key_len, features]"),
                           ("values", values, "[batch, key_len, value_size]")):
        if t.dim() != 3:
            raise RuntimeError(f"pyseqk: {name} must be 3-D {shape}, got shape {_shape(t)}")
    for name, t in ((kn, k), ("values", values), ("v", v)):
        if t is None:
            continue
        if t.device != q.device:
            raise RuntimeError(f"pyseqk: {name} is on {t.device} but {qn} is on {q.device}; "
                               "expected all tensors on one device")
        if t.dtype != q.dtype:
            raise TypeError(f"pyseqk: {name} has dtype {t.dtype} but {qn} has dtype {q.dtype}; "
                            "expected one dtype")
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise RuntimeError(f"pyseqk: {kn} must have shape [{q.shape[0]}, key_len, {q.shape[2]}] "
                           f"(batch and features of {qn}), got {_shape(k)}")
    if values.shape[0] != k.shape[0] or values.shape[1] != k.shape[1]:
        raise RuntimeError(f"pyseqk: values must have shape [{k.shape[0]}, {k.shape[1]}, value_size] "
                           f"(batch and key_len of {kn}), got {_shape(values)}")
    if mask is not None:
        if mask.device != q.device:
            raise RuntimeError(f"pyseqk: key_padding_mask is on {mask.device} but {qn} is on "
                               f"{q.device}; expected all tensors on one device")
        if mask.dtype != torch.bool:
            raise TypeError(f"pyseqk: key_padding_mask must be a bool tensor (True = padding), got {mask.dtype}")
        if mask.dim() != 2 or mask.shape[0] != k.shape[0] or mask.shape[1] != k.shape[1]:
            raise RuntimeError(f"pyseqk: key_padding_mask must have shape [{k.shape[0]}, {k.shape[1]}] "
                               f"([batch, key_len]), got {_shape(mask)}")
    if v is not None and (v.dim() != 1 or v.shape[0] != q.shape[2]):
        raise RuntimeError(f"pyseqk: v must have shape [{q.shape[2]}] ([units], Va.weight flattened), "
                           f"got {_shape(v)}")


def luong_attention(query: Tensor, keys: Tensor, values: Tensor | None = None,
                    key_padding_mask: Tensor | None = None, weight: Tensor | None = None
                    ) -> tuple[Tensor, Tensor]:
    """Luong attention: query [B, Tq, Hq], keys [B, Tk, Hk], values [B, Tk, Hv] (default: keys),
    key_padding_mask bool [B, Tk] (True = padding) or None. Without ``weight`` the score is the dot
    product q . k (Hq = Hk); with weight [Hq, Hk] it is "general", (q W) . k, computed as one GEMM
    on the query followed by the dot form. Returns (context [B, Tq, Hv], weights [B, Tq, Tk])."""
    if values is None:
        values = keys
    if weight is not None:
        if weight.dim() != 2 or weight.shape[0] != query.shape[-1] or weight.shape[1] != keys.shape[-1]:
            raise RuntimeError(f"pyseqk: weight must have shape [{query.shape[-1]}, {keys.shape[-1]}] "
                               f"([query features, key features]), got {_shape(weight)}")
        query = torch.matmul(query, weight)
    backend = backends.resolve(query.device)
    if backend in ("reference", "triton"):
        check_seq2seq(query, "query", keys, "keys", values, key_padding_mask)
        if backend == "reference":
            return reference.luong_attention(query, keys, values, key_padding_mask)
    op = _op(backend, "luong_attention", "_triton_seq2seq_ops")
    return tuple(op(query, keys, values, key_padding_mask))


def bahdanau_attention(wq: Tensor, uk: Tensor, v: Tensor, values: Tensor,
                       key_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Bahdanau (additive) attention on projected inputs: wq [B, Tq, U] = Wa(query), uk [B, Tk, U]
    = Ua(keys), v [U] or [1, U] = Va.weight, values [B, Tk, Hv]. score[b,i,j] = v . tanh(wq[b,i] +
    uk[b,j]) (Va's bias shifts every score of a row alike and cancels in the softmax). The
    [B, Tq, Tk, U] tanh tensor is never materialised, forward or backward (except on the
    reference backend). Returns (context [B, Tq, Hv], weights [B, Tq, Tk])."""
    if v.dim() == 2 and v.shape[0] == 1:
        v = v.reshape(-1)
    backend = backends.resolve(wq.device)
    if backend in ("reference", "triton"):
        check_seq2seq(wq, "wq", uk, "uk", values, key_padding_mask, v)
        if backend == "reference":
            return reference.bahdanau_attention(wq, uk, v, values, key_padding_mask)
    op = _op(backend, "bahdanau_attention", "_triton_seq2seq_ops")
    return tuple(op(wq, uk, v, values, key_padding_mask))
