"""Plain-PyTorch implementation of every pyseqk op: the oracle the kernels are tested against
(in float64) and the backend of last resort. Written for clarity, not speed."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lstm_cell(input, hx, cx, w_ih, w_hh, b_ih=None, b_hh=None):
    gates = F.linear(input, w_ih, b_ih) + F.linear(hx, w_hh, b_hh)
    i, f, g, o = gates.chunk(4, 1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    cy = f * cx + i * g
    hy = o * cy.tanh()
    return hy, cy


def gru_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    ir, iz, in_ = F.linear(input, w_ih, b_ih).chunk(3, 1)
    hr, hz, hn = F.linear(hx, w_hh, b_hh).chunk(3, 1)
    r = (ir + hr).sigmoid()
    z = (iz + hz).sigmoid()
    n = (in_ + r * hn).tanh()
    return (1 - z) * n + z * hx


def rnn_tanh_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    return (F.linear(input, w_ih, b_ih) + F.linear(hx, w_hh, b_hh)).tanh()


def rnn_relu_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    return (F.linear(input, w_ih, b_ih) + F.linear(hx, w_hh, b_hh)).relu()


# ---------------------------------------------------------------------------------------------
# Whole sequences: one layer, one direction. Time-major: input [T, B, I]. With lengths (int64
# [B]), sequence b has steps 0 .. lengths[b]-1: its output is zero at later steps and its final
# state is the one after step lengths[b]-1 (reverse: the one after step 0, having started at
# step lengths[b]-1). This is what torch.nn's layers compute for a PackedSequence.

def _run_layer(step, states, input, lengths, reverse):
    """states: tuple of [B, *] tensors; step(x_t, states) -> (out_t, new_states)."""
    T = input.shape[0]
    outs = [None] * T
    order = range(T - 1, -1, -1) if reverse else range(T)
    for t in order:
        out, new = step(input[t], states)
        if lengths is None:
            states = new
        else:
            valid = (t < lengths.to(input.device)).unsqueeze(1)
            states = tuple(torch.where(valid, n, s) for n, s in zip(new, states))
            out = torch.where(valid, out, torch.zeros_like(out))
        outs[t] = out
    if T == 0:
        return input.new_empty(0, states[0].shape[0], states[0].shape[1]), states
    return torch.stack(outs), states


def lstm_layer(input, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, lengths=None,
               reverse=False):
    """input [T, B, I]; h0 [B, P]; c0 [B, H]; w_ih [4H, I]; w_hh [4H, P]; b_ih/b_hh [4H] or None;
    w_hr [P, H] or None (P = H without projection). Returns output [T, B, P], h_n [B, P],
    c_n [B, H]."""
    def step(x, s):
        h, c = lstm_cell(x, s[0], s[1], w_ih, w_hh, b_ih, b_hh)
        if w_hr is not None:
            h = h @ w_hr.t()
        return h, (h, c)

    out, (h, c) = _run_layer(step, (h0, c0), input, lengths, reverse)
    return out, h, c


def gru_layer(input, h0, w_ih, w_hh, b_ih=None, b_hh=None, lengths=None, reverse=False):
    """input [T, B, I]; h0 [B, H]; w_ih [3H, I]; w_hh [3H, H]. Returns output [T, B, H], h_n."""
    def step(x, s):
        h = gru_cell(x, s[0], w_ih, w_hh, b_ih, b_hh)
        return h, (h,)

    out, (h,) = _run_layer(step, (h0,), input, lengths, reverse)
    return out, h


def rnn_layer(input, h0, w_ih, w_hh, b_ih=None, b_hh=None, nonlinearity="tanh", lengths=None,
              reverse=False):
    """input [T, B, I]; h0 [B, H]; w_ih [H, I]; w_hh [H, H]. Returns output [T, B, H], h_n."""
    cell = {"tanh": rnn_tanh_cell, "relu": rnn_relu_cell}[nonlinearity]

    def step(x, s):
        h = cell(x, s[0], w_ih, w_hh, b_ih, b_hh)
        return h, (h,)

    out, (h,) = _run_layer(step, (h0,), input, lengths, reverse)
    return out, h


# ---------------------------------------------------------------------------------------------
# Scaled dot-product attention: query [..., Hq, L, E], key [..., Hk, S, E], value [..., Hk, S, Ev]
# (Hq a multiple of Hk with enable_gqa). attn_mask: bool (True = attend) or additive, broadcast
# to [..., Hq, L, S]. is_causal: top-left aligned (query i sees keys j <= i), as torch.

def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False, seed=None):
    """seed: None drops with torch's RNG (F.dropout); an int drops exactly what the kernels drop
    for that seed (dropout_keep_mask), which is how the kernels are tested. A query row with no
    key to attend (every score masked) gets a zero output and zero gradients, as torch's CPU
    kernel gives (softmax over nothing would be NaN)."""
    L, S, E = query.shape[-2], key.shape[-2], query.shape[-1]
    scale = E ** -0.5 if scale is None else scale
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(rep, dim=-3)
        value = value.repeat_interleave(rep, dim=-3)
    # Both sides scaled by sqrt(scale) before the product, as torch's math backend does: in
    # float16 the unscaled product overflows to inf (then NaN) where torch's result is finite.
    root = math.sqrt(scale) if scale >= 0 else None
    if root is not None:
        scores = (query * root) @ (key * root).transpose(-2, -1)
    else:
        scores = (query @ key.transpose(-2, -1)) * scale
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    # Fully masked rows: softmax of zeros instead of all -inf (no NaN, in the values or the
    # gradient), then zeroed.
    empty = (scores == float("-inf")).all(-1, keepdim=True)
    weights = scores.masked_fill(empty, 0.0).softmax(-1).masked_fill(empty, 0.0)
    if dropout_p > 0.0:
        if seed is None:
            weights = F.dropout(weights, dropout_p)
        else:
            shape = weights.shape
            keep = dropout_keep_mask(seed, shape[:-2].numel(), L, S, dropout_p, query.device)
            weights = weights * keep.reshape(shape).to(weights.dtype) / (1.0 - dropout_p)
    return weights @ value


_M32 = 0xFFFFFFFF


def _fmix32(h):
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def dropout_keep_mask(seed, BH, L, S, p, device="cpu"):
    """bool [BH, L, S]: which attention probabilities survive dropout with probability p; the
    hash of csrc/include/pyseqk/dropout_hash.h, in int64 arithmetic masked to 32 bits (products of
    two 32-bit values wrap in int64 but keep their low 32 bits)."""
    bh = torch.arange(BH, device=device, dtype=torch.int64).view(-1, 1, 1)
    i = torch.arange(L, device=device, dtype=torch.int64).view(1, -1, 1)
    j = torch.arange(S, device=device, dtype=torch.int64).view(1, 1, -1)
    a = _fmix32((seed & _M32) ^ ((bh * 0x9E3779B9) & _M32))
    row = _fmix32(a ^ ((i * 0x85EBCA77) & _M32))
    r = _fmix32(row ^ ((j * 0xC2B2AE3D) & _M32))
    threshold = 0 if p <= 0 else (1 << 24 if p >= 1 else int(p * 16777216.0))
    return (r >> 8) >= threshold


# ---------------------------------------------------------------------------------------------
# Sinusoidal positional encoding fused with its add and dropout: out = dropout(x + pe[t]),
# pe[t, 2i] = sin(t w_i), pe[t, 2i+1] = cos(t w_i), w_i = 10000^(-2i/D). x: [T, B, D],
# [B, T, D] (batch_first) or [T, D]. The dropout mask of the kernels is a hash of (seed, element
# index in the contiguous tensor): csrc/include/pyseqk/posenc.h.

import math  # noqa: E402


def sinusoid_table(T, D, dtype=torch.float64, device="cpu"):
    """pe [T, D]. float64 inputs get a float64 table (the oracle); other dtypes one computed in
    float32 (as the PyTorch tutorial does), rounded once."""
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    t = torch.arange(T, device=device, dtype=ct).unsqueeze(1)
    d = torch.arange(D, device=device)
    freq = torch.exp2(-(d - d % 2).to(torch.float64) * math.log2(10000.0) / max(D, 1)).to(ct)
    angle = t * freq
    return torch.where(d % 2 == 0, angle.sin(), angle.cos())


def positional_encoding_keep_mask(seed, N, p, device="cpu"):
    """bool [N]: which elements survive dropout with probability p (the hash of posenc.h)."""
    idx = torch.arange(N, device=device, dtype=torch.int64)
    a = _fmix32((seed & _M32) ^ (((idx >> 32) * 0x9E3779B9) & _M32))
    r = _fmix32(a ^ (((idx & _M32) * 0x85EBCA77) & _M32))
    threshold = 0 if p <= 0 else (1 << 24 if p >= 1 else int(p * 16777216.0))
    return (r >> 8) >= threshold


def positional_encoding(x, dropout_p=0.0, seed=None, batch_first=False):
    """seed: None drops with torch's RNG (F.dropout); an int drops exactly what the kernels drop."""
    T = x.shape[1] if (x.dim() == 3 and batch_first) else x.shape[0]
    pe = sinusoid_table(T, x.shape[-1], x.dtype, x.device)
    if x.dim() == 3:
        pe = pe.unsqueeze(0) if batch_first else pe.unsqueeze(1)
    out = (x.to(pe.dtype) + pe).to(x.dtype)
    if dropout_p > 0.0:
        if seed is None:
            out = F.dropout(out, dropout_p)
        else:
            keep = positional_encoding_keep_mask(seed, out.numel(), dropout_p, x.device)
            scale = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)
            out = out * (keep.view(out.shape).to(out.dtype) * scale)
    return out

# seq2seq attention (Luong, Bahdanau). query/wq [B, Tq, *], keys/uk [B, Tk, *], values
# [B, Tk, Hv], key_padding_mask bool [B, Tk] or None (True = padding: that key gets weight 0).
# A query row whose keys are all padding gets zero weights and a zero context (and zero
# gradients), not the NaN of a plain softmax over nothing. Materialises [B, Tq, Tk] (Luong) and
# [B, Tq, Tk, U] (Bahdanau): an oracle, not a kernel.

def _masked_softmax(scores, key_padding_mask):
    if key_padding_mask is None:
        return scores.softmax(-1)
    pad = key_padding_mask.unsqueeze(1)                      # [B, 1, Tk]
    empty = pad.all(-1, keepdim=True)                        # [B, 1, 1]: no key to attend to
    # Fully masked rows are filled with 0 (not -inf) so that their softmax and its gradient
    # stay finite, then zeroed.
    scores = scores.masked_fill(pad & ~empty, float("-inf"))
    return scores.softmax(-1).masked_fill(pad | empty, 0.0)


def luong_attention(query, keys, values, key_padding_mask=None):
    """Luong dot attention: score[b,i,j] = query[b,i] . keys[b,j]. ("general" is dot attention
    on query @ W.) Returns (context [B, Tq, Hv], weights [B, Tq, Tk])."""
    weights = _masked_softmax(query @ keys.transpose(1, 2), key_padding_mask)
    return weights @ values, weights


def bahdanau_attention(wq, uk, v, values, key_padding_mask=None):
    """Bahdanau additive attention: score[b,i,j] = v . tanh(wq[b,i] + uk[b,j]), wq [B, Tq, U]
    = Wa(query), uk [B, Tk, U] = Ua(keys), v [U] = Va.weight. Va's bias adds the same number to
    every score of a row and cancels in the softmax. Returns (context, weights)."""
    scores = torch.tanh(wq.unsqueeze(2) + uk.unsqueeze(1)) @ v   # [B, Tq, Tk]
    weights = _masked_softmax(scores, key_padding_mask)
    return weights @ values, weights
