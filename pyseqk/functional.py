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
# Attention: scaled dot-product (fused op torch.ops.pyseqk.sdpa; pyseqk/_sdpa_ops.py registers its
# fake kernel and autograd, pyseqk/_triton_sdpa_ops.py its Triton twin triton_sdpa).

from . import _sdpa_ops  # noqa: E402,F401  (fake kernel and autograd of torch.ops.pyseqk.sdpa)

_triton_sdpa_loaded = False


def _triton_sdpa():
    global _triton_sdpa_loaded
    if not _triton_sdpa_loaded:
        try:
            from . import _triton_sdpa_ops  # noqa: F401  (defines torch.ops.pyseqk.triton_sdpa)
        except ImportError as e:
            raise backends.BackendError(
                f"backend 'triton' has no scaled_dot_product_attention in this build: "
                f"pyseqk._triton_sdpa_ops could not be imported ({e})") from e
        _triton_sdpa_loaded = True
    return torch.ops.pyseqk.triton_sdpa


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
    op = _triton_sdpa() if backend == "triton" else torch.ops.pyseqk.sdpa
    out, _ = op(q, k, v, mask, float(dropout_p), bool(is_causal), scale, seed)
    return out.reshape(query.shape[:-1] + (Ev,))
