"""seq2seq attention (Luong dot, Bahdanau additive): scores, masked softmax and the weighted sum of
the values fused in one program per query row, and the Bahdanau score backward recomputing tanh.

Shapes (B = batch, Tq = query steps, Tk = key steps, D = score width, Hv = value width):
  q [B, Tq, D] (query, or wq = Wa(query)); k [B, Tk, D] (keys, or uk = Ua(keys)); v [D] (Va.weight)
  values [B, Tk, Hv]; mask [B, Tk] uint8 (a view of the bool mask, 1 = padding) or None
  context [B, Tq, Hv], weights [B, Tq, Tk] (out, the inputs' dtype)
  scratch [B, Tq, Tk] in the math dtype (fp32, fp64 for fp64): raw scores, then the weights
  ds [B, Tq, Tk] (math dtype): d loss / d score; dwq [B, Tq, D], duk [B, Tk, D] (math dtype, out)
  dv_part [B * Tq, D] (math dtype, out): per-row partial sums of d v, summed by the caller.

One program per query row makes Tq = 1 (a decoder step) the natural case: B programs, each
streaming its batch's keys once. A row whose keys are all masked gets zero weights and context."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _device_guard, check_tensors, tanh, to_compute

BLOCK_K = 32   # keys per tile
BLOCK_D = 32   # features per tile: a 32 x 32 tile is 8 values per thread at 4 warps
BLOCK_H = 32   # value features per context tile
NUM_WARPS = 4


@triton.jit
def _score_tile(q_row, k_base, v_ptr, offs_k, kmask, D, acc, ADDITIVE: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """acc[BLOCK_K] += scores of this query row against keys offs_k (masked lanes add 0)."""
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        qv = to_compute(tl.load(q_row + offs_d, mask=dmask, other=0.0))
        kt = to_compute(tl.load(k_base + offs_k[:, None] * D + offs_d[None, :],
                                mask=kmask[:, None] & dmask[None, :], other=0.0))
        if ADDITIVE:
            vv = to_compute(tl.load(v_ptr + offs_d, mask=dmask, other=0.0))
            acc += tl.sum(vv[None, :] * tanh(qv[None, :] + kt), axis=1).to(acc.dtype)
        else:
            acc += tl.sum(qv[None, :] * kt, axis=1).to(acc.dtype)
    return acc


@triton.jit
def _seq2seq_fwd_kernel(q_ptr, k_ptr, v_ptr, values_ptr, mask_ptr, context_ptr, weights_ptr,
                        scratch_ptr, Tq, Tk, D, Hv, ADDITIVE: tl.constexpr, HAS_MASK: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * Tq + i
    b = row // Tq
    q_row = q_ptr + row * D
    k_base = k_ptr + b * Tk * D
    s_row = scratch_ptr + row * Tk
    acc_ty = scratch_ptr.dtype.element_ty
    neg_inf = float("-inf")
    # Pass 1: raw scores (masked keys at -inf) to the scratch row, and their maximum.
    m = tl.full([], neg_inf, acc_ty)
    n_valid = tl.zeros([], tl.int32)  # keys not masked: none means an empty row (zero weights)
    n_nan = tl.zeros([], tl.int32)    # NaN scores: tl.max need not propagate them
    for k0 in range(0, Tk, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < Tk
        s = _score_tile(q_row, k_base, v_ptr, offs_k, kmask, D, tl.zeros([BLOCK_K], acc_ty),
                        ADDITIVE, BLOCK_D)
        valid = kmask
        if HAS_MASK:
            pad = tl.load(mask_ptr + b * Tk + offs_k, mask=kmask, other=1)
            valid = valid & (pad == 0)
        s = tl.where(valid, s, neg_inf)
        tl.store(s_row + offs_k, s, mask=kmask)
        m = tl.maximum(m, tl.max(s, axis=0))
        n_valid += tl.sum(valid.to(tl.int32), axis=0)
        n_nan += tl.sum((valid & (s != s)).to(tl.int32), axis=0)
    # The scratch row is global memory written and re-read by other threads of this program (the
    # later passes use other layouts): a CTA barrier orders it (a GPU race otherwise, seen on an
    # H200 as run-to-run differences; the interpreter runs one thread and cannot show it).
    tl.debug_barrier()
    # A row with no key left: shifting by 0 and scaling by 0 gives zero weights. A NaN score, or
    # keys whose scores are all -inf (infinite inputs), make the row NaN, as torch's softmax.
    empty = n_valid == 0
    m = tl.where((n_nan > 0) | ((m == neg_inf) & ~empty), float("nan"), m)
    m = tl.where(empty, 0.0, m).to(acc_ty)
    total = tl.zeros([], acc_ty)
    for k0 in range(0, Tk, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        s = tl.load(s_row + offs_k, mask=offs_k < Tk, other=neg_inf)
        total += tl.sum(tl.exp(s - m), axis=0).to(acc_ty)
    inv = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, total)).to(acc_ty)
    w_row = weights_ptr + row * Tk
    for k0 in range(0, Tk, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < Tk
        w = tl.exp(tl.load(s_row + offs_k, mask=kmask, other=neg_inf) - m) * inv
        if HAS_MASK:  # masked keys weigh exactly 0, even in a NaN row
            pad = tl.load(mask_ptr + b * Tk + offs_k, mask=kmask, other=1)
            w = tl.where(pad == 0, w, 0.0)
        tl.store(s_row + offs_k, w, mask=kmask)
        tl.store(w_row + offs_k, w.to(weights_ptr.dtype.element_ty), mask=kmask)
    tl.debug_barrier()  # the weights row complete before the context loop reads it as w[:, None]
    # Context from the full-precision weights.
    val_base = values_ptr + b * Tk * Hv
    for h0 in range(0, Hv, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        hmask = offs_h < Hv
        acc = tl.zeros([BLOCK_H], acc_ty)
        for k0 in range(0, Tk, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            kmask = offs_k < Tk
            w = tl.load(s_row + offs_k, mask=kmask, other=0.0)
            x = to_compute(tl.load(val_base + offs_k[:, None] * Hv + offs_h[None, :],
                                   mask=kmask[:, None] & hmask[None, :], other=0.0))
            acc += tl.sum(w[:, None] * x, axis=0).to(acc_ty)
        tl.store(context_ptr + row * Hv + offs_h, acc.to(context_ptr.dtype.element_ty), mask=hmask)


@triton.jit
def _bahdanau_bwd_q_kernel(wq_ptr, uk_ptr, v_ptr, ds_ptr, dwq_ptr, dv_part_ptr, Tq, Tk, D,
                           BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (query row, block of features): dwq = v sum_j ds (1 - t^2), dv_part = sum_j ds t."""
    row = tl.program_id(0).to(tl.int64)
    b = row // Tq
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    acc_ty = dwq_ptr.dtype.element_ty
    a = to_compute(tl.load(wq_ptr + row * D + offs_d, mask=dmask, other=0.0))
    ga = tl.zeros([BLOCK_D], acc_ty)
    gv = tl.zeros([BLOCK_D], acc_ty)
    for k0 in range(0, Tk, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < Tk
        g = tl.load(ds_ptr + row * Tk + offs_k, mask=kmask, other=0.0)
        kt = to_compute(tl.load(uk_ptr + (b * Tk + offs_k[:, None]) * D + offs_d[None, :],
                                mask=kmask[:, None] & dmask[None, :], other=0.0))
        t = tanh(a[None, :] + kt)
        ga += tl.sum(g[:, None] * (1.0 - t * t), axis=0).to(acc_ty)
        gv += tl.sum(g[:, None] * t, axis=0).to(acc_ty)
    vv = to_compute(tl.load(v_ptr + offs_d, mask=dmask, other=0.0))
    tl.store(dwq_ptr + row * D + offs_d, (ga * vv).to(acc_ty), mask=dmask)
    tl.store(dv_part_ptr + row * D + offs_d, gv, mask=dmask)


@triton.jit
def _bahdanau_bwd_k_kernel(wq_ptr, uk_ptr, v_ptr, ds_ptr, duk_ptr, Tq, Tk, D,
                           BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (key row, block of features): duk = v sum_i ds (1 - t^2)."""
    krow = tl.program_id(0).to(tl.int64)  # b * Tk + j
    b = krow // Tk
    j = krow - b * Tk
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    acc_ty = duk_ptr.dtype.element_ty
    k = to_compute(tl.load(uk_ptr + krow * D + offs_d, mask=dmask, other=0.0))
    gk = tl.zeros([BLOCK_D], acc_ty)
    for i0 in range(0, Tq, BLOCK_Q):
        offs_i = i0 + tl.arange(0, BLOCK_Q)
        imask = offs_i < Tq
        g = tl.load(ds_ptr + (b * Tq + offs_i) * Tk + j, mask=imask, other=0.0)
        qt = to_compute(tl.load(wq_ptr + (b * Tq + offs_i[:, None]) * D + offs_d[None, :],
                                mask=imask[:, None] & dmask[None, :], other=0.0))
        t = tanh(qt + k[None, :])
        gk += tl.sum(g[:, None] * (1.0 - t * t), axis=0).to(acc_ty)
    vv = to_compute(tl.load(v_ptr + offs_d, mask=dmask, other=0.0))
    tl.store(duk_ptr + krow * D + offs_d, (gk * vv).to(acc_ty), mask=dmask)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_forward(q, k, v, values, mask, context, weights, additive: bool) -> None:
    """Fills context and weights. v is None for Luong; mask bool [B, Tk] or None."""
    B, Tq, D = q.shape
    Tk, Hv = k.shape[1], values.shape[2]
    check_tensors(q.dtype, q.device, q=q, k=k, v=v, values=values, context=context, weights=weights)
    if B * Tq == 0:
        return
    scratch = torch.empty(B, Tq, Tk, dtype=acc_dtype(q.dtype), device=q.device)
    mask_u8 = None if mask is None else mask.contiguous().view(torch.uint8)
    with _device_guard(q):
        _seq2seq_fwd_kernel[(B * Tq,)](
            q, k, q if v is None else v, values, q if mask_u8 is None else mask_u8, context,
            weights, scratch, Tq, Tk, D, Hv, ADDITIVE=additive, HAS_MASK=mask is not None,
            BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, BLOCK_H=BLOCK_H, num_warps=NUM_WARPS)


def bahdanau_backward(wq, uk, v, ds):
    """(dwq, duk, dv) in the math dtype from ds [B, Tq, Tk] (math dtype)."""
    B, Tq, D = wq.shape
    Tk = uk.shape[1]
    check_tensors(wq.dtype, wq.device, wq=wq, uk=uk, v=v)
    check_tensors(ds.dtype, ds.device, ds=ds)
    dwq = torch.zeros(B, Tq, D, dtype=ds.dtype, device=wq.device)
    duk = torch.zeros(B, Tk, D, dtype=ds.dtype, device=wq.device)
    if B * Tq * Tk * D == 0:
        return dwq, duk, torch.zeros(D, dtype=ds.dtype, device=wq.device)
    dv_part = torch.empty(B * Tq, D, dtype=ds.dtype, device=wq.device)
    blocks = triton.cdiv(D, BLOCK_D)
    with _device_guard(wq):
        _bahdanau_bwd_q_kernel[(B * Tq, blocks)](wq, uk, v, ds, dwq, dv_part, Tq, Tk, D,
                                                 BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D,
                                                 num_warps=NUM_WARPS)
        _bahdanau_bwd_k_kernel[(B * Tk, blocks)](wq, uk, v, ds, duk, Tq, Tk, D, BLOCK_Q=BLOCK_K,
                                                 BLOCK_D=BLOCK_D, num_warps=NUM_WARPS)
    return dwq, duk, dv_part.sum(0)


def aot_kernels(dt: str) -> list[tuple[str, object, dict[str, str], dict[str, object]]]:
    """This module's rows of kernels/aot.py's all_kernels() for storage dtype `dt` (fp32, bf16,
    fp16): the math-dtype tensors (scratch, ds, gradients) are fp32."""
    def sig(pointers, f32_pointers="", ints="Tq Tk D"):
        s = {p: f"*{dt}" for p in pointers.split()}
        s.update({p: "*fp32" for p in f32_pointers.split()})
        s.update({p: "i32" for p in ints.split()})
        return s

    fwd = sig("q_ptr k_ptr v_ptr values_ptr context_ptr weights_ptr", "scratch_ptr",
              "Tq Tk D Hv")
    fwd["mask_ptr"] = "*u8"
    blocks = dict(BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D)
    return [
        ("luong_attention_fwd", _seq2seq_fwd_kernel, fwd,
         dict(ADDITIVE=False, HAS_MASK=True, BLOCK_H=BLOCK_H, **blocks)),
        ("bahdanau_attention_fwd", _seq2seq_fwd_kernel, fwd,
         dict(ADDITIVE=True, HAS_MASK=True, BLOCK_H=BLOCK_H, **blocks)),
        ("bahdanau_attention_bwd_q", _bahdanau_bwd_q_kernel,
         sig("wq_ptr uk_ptr v_ptr", "ds_ptr dwq_ptr dv_part_ptr"), blocks),
        ("bahdanau_attention_bwd_k", _bahdanau_bwd_k_kernel,
         sig("wq_ptr uk_ptr v_ptr", "ds_ptr duk_ptr"), dict(BLOCK_Q=BLOCK_K, BLOCK_D=BLOCK_D)),
    ]
