"""Fused scaled-dot-product attention (FlashAttention-2 style): forward with online softmax and
the logsumexp it returns, and a deterministic backward (no atomics) in three kernels.

Shapes (B batch, Hq query heads, Hk key/value heads with Hq % Hk == 0, L queries, S keys):
  q [B, Hq, L, E], k [B, Hk, S, E], v [B, Hk, S, Ev]   any strides
  mask None or [B, Hq, L, S] (stride 0 on broadcast dims), bool (True = take part) or additive
  out [B, Hq, L, Ev] (q's dtype), lse [B, Hq, L] float32, natural log (-inf on a fully masked
  row, whose output is 0 and whose gradients are 0, as torch's sdpa)
  delta [B, Hq, L] (backward scratch: rowsum(dO * O)); dq, dk, dv like q, k, v.
Query head h reads key/value head h // (Hq // Hk) (GQA). is_causal is top-left aligned: query i
sees keys j <= i, also when L != S. Dropout drops what csrc/include/pyseqk/dropout_hash.h drops
(bh = b * Hq + h), recomputed in the backward, so no mask is stored.

Scores are kept in the log2 domain (scale * log2(e) folded into one multiply) so that the
softmax uses exp2, one MUFU instruction on NVIDIA GPUs. Accumulation is fp32 (fp64 for fp64).
On a GPU fp16/bf16 operands go to tl.dot as they are (tensor cores: mma.sync on sm_80, wgmma on
sm_90), P is rounded to the value dtype before P @ V as in FlashAttention; fp32 operands use
input_precision="ieee" (torch's fp32 sdpa does not use TF32). Under TRITON_INTERPRET=1 every
operand is upcast first: the interpreter's bf16 arithmetic is wrong."""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

# Globals a @triton.jit function reads must be constexprs.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Device code


@triton.jit
def _fmix32(h):
    # MurmurHash3's finalizer on uint32 (multiplications wrap modulo 2**32, shifts are logical).
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _row_keys(seed, bh, offs_m):
    """dropout::row_key(seed, bh, i) for each row i of the block (uint32 [BLOCK_M])."""
    a = _fmix32(seed.to(tl.uint32) ^ (bh.to(tl.uint32) * 0x9E3779B9))
    return _fmix32(a ^ (offs_m.to(tl.uint32) * 0x85EBCA77))


@triton.jit
def _keep(rows, j, threshold):
    """dropout::keep for a tile: rows (uint32 row keys) and j (key columns) broadcast to it."""
    r = _fmix32(rows ^ (j.to(tl.uint32) * 0xC2B2AE3D))
    return (r >> 8) >= threshold.to(tl.uint32)


@triton.jit
def _scores(s, i, j, L, S, m_base, smm, sms, qk_scale,
            HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """A tile of raw scores q.k scaled into the log2 domain, everything that does not take part
    (out-of-range query i or key j, causal, bool mask) at -inf and the additive mask added.
    i and j are the query and key indices broadcast to the tile: [BM, 1] and [1, BN] for an
    S tile, [1, BM] and [BN, 1] for the S^T tile of the dK/dV kernel."""
    s = s * qk_scale
    valid = (i < L) & (j < S)
    if HAS_MASK:
        mptr = m_base + i.to(tl.int64) * smm + j.to(tl.int64) * sms
        if MASK_BOOL:
            valid = valid & (tl.load(mptr, mask=valid, other=0) != 0)
        else:
            s += tl.load(mptr, mask=valid, other=0.0).to(s.dtype) * LOG2E
    if IS_CAUSAL:
        valid = valid & (j <= i)
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _load_tile(base, rows, n_rows, stride_r, cols, n_cols, stride_c):
    """[len(rows), len(cols)] tile, zeros outside; 64-bit offsets (strides can be large)."""
    ptr = base + rows.to(tl.int64)[:, None] * stride_r + cols.to(tl.int64)[None, :] * stride_c
    return tl.load(ptr, mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :], other=0.0)


@triton.jit
def _operand(x, ACC: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        x = x.to(ACC)
    return x


@triton.jit(do_not_specialize=["seed", "threshold"])
def _sdpa_fwd_kernel(Q, K, V, Mask, Out, Lse,
                     sqb, sqh, sql, sqe, skb, skh, sks, ske, svb, svh, svs, sve,
                     smb, smh, sml, sms, sob, soh, sol, soe,
                     Hq, group, L, S, E, Ev, qk_scale, seed, threshold, drop_scale,
                     HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr,
                     DROPOUT: tl.constexpr, UPCAST: tl.constexpr, FP64: tl.constexpr,
                     PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    # One flat grid (no 65535 limit on B * Hq); query blocks of one head are adjacent so they
    # share K/V in L2, and with is_causal the longest (last) blocks start first.
    n_m = tl.cdiv(L, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // n_m
    pid_m = pid % n_m
    if IS_CAUSAL:
        pid_m = n_m - 1 - pid_m
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    hk = (h // group).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q = _operand(_load_tile(Q + b * sqb + h.to(tl.int64) * sqh, offs_m, L, sql, offs_d, E, sqe),
                 ACC, UPCAST)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    m_base = Mask + b * smb + h.to(tl.int64) * smh
    if DROPOUT:
        rows = _row_keys(seed, bh, offs_m)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
    hi = S
    if IS_CAUSAL:
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M)  # blocks above the diagonal: nothing to see
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kt = _operand(_load_tile(k_base, offs_d, E, ske, offs_n, S, sks), ACC, UPCAST)
        s = _scores(tl.dot(q, kt, input_precision=PREC), offs_m[:, None], offs_n[None, :], L, S,
                    m_base, sml, sms, qk_scale, HAS_MASK, MASK_BOOL, IS_CAUSAL)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing unmasked yet has m = -inf: subtract 0 instead so that
        # exp2(-inf - -inf) never makes a NaN; its p and alpha are then exactly 0.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_keep(rows[:, None], offs_n[None, :], threshold), p * drop_scale, 0.0)
        v = _operand(_load_tile(v_base, offs_n, S, svs, offs_dv, Ev, sve), ACC, UPCAST)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    o_ptr = (Out + b * sob + h.to(tl.int64) * soh + offs_m.to(tl.int64)[:, None] * sol
             + offs_dv[None, :] * soe)
    tl.store(o_ptr, out.to(Out.dtype.element_ty),
             mask=(offs_m < L)[:, None] & (offs_dv < Ev)[None, :])
    tl.store(Lse + bh.to(tl.int64) * L + offs_m, lse.to(Lse.dtype.element_ty), mask=offs_m < L)


@triton.jit
def _sdpa_bwd_preprocess(Out, DO, Delta, sob, soh, sol, soe, sdb, sdh, sdl, sde, Hq, L, Ev,
                         FP64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """delta[b, h, i] = sum_e dO[i, e] * O[i, e] (= sum_j P_ij dP_ij, also with dropout)."""
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    n_m = tl.cdiv(L, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // n_m
    offs_m = (pid % n_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    o = _load_tile(Out + b * sob + h * soh, offs_m, L, sol, offs_dv, Ev, soe).to(ACC)
    do = _load_tile(DO + b * sdb + h * sdh, offs_m, L, sdl, offs_dv, Ev, sde).to(ACC)
    tl.store(Delta + bh.to(tl.int64) * L + offs_m, tl.sum(o * do, 1), mask=offs_m < L)


@triton.jit
def _row_stats(lse_ptr, delta_ptr, offs_m, L):
    """The saved logsumexp in the log2 domain and delta of the rows offs_m. lse = -inf (a row
    that sees no key) becomes +inf, so that P = exp2(-inf - inf) = 0 rather than NaN."""
    lse = tl.load(lse_ptr + offs_m, mask=offs_m < L, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    return lse2, tl.load(delta_ptr + offs_m, mask=offs_m < L, other=0.0)


@triton.jit(do_not_specialize=["seed", "threshold"])
def _sdpa_bwd_dkdv(Q, K, V, Mask, DO, Lse, Delta, DK, DV,
                   sqb, sqh, sql, sqe, skb, skh, sks, ske, svb, svh, svs, sve,
                   smb, smh, sml, sms, sdb, sdh, sdl, sde,
                   sdkb, sdkh, sdks, sdke, sdvb, sdvh, sdvs, sdve,
                   Hq, Hk, group, L, S, E, Ev, qk_scale, sm_scale, seed, threshold, drop_scale,
                   HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr,
                   DROPOUT: tl.constexpr, UPCAST: tl.constexpr, FP64: tl.constexpr,
                   PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dK, dV of one key block of one key/value head: it owns them, looping over the query
    blocks of every query head of its GQA group, so nothing is accumulated atomically."""
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    # Computed transposed (keys as rows): K and V are the left operands held in registers for
    # the whole loop, Q^T and dO stream through as right operands, and P^T, dS^T come out of
    # one product in the layout the next one takes (no transposes of the score tile).
    n_n = tl.cdiv(S, BLOCK_N)
    pid = tl.program_id(0)
    bhk = pid // n_n
    pid_n = pid % n_n
    b = (bhk // Hk).to(tl.int64)
    hk = (bhk % Hk).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _operand(_load_tile(K + b * skb + hk * skh, offs_n, S, sks, offs_d, E, ske), ACC, UPCAST)
    v = _operand(_load_tile(V + b * svb + hk * svh, offs_n, S, svs, offs_dv, Ev, sve), ACC, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], ACC)
    lo = 0
    if IS_CAUSAL:
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M  # earlier queries see none of these keys
    for g in range(group):
        h = hk * group + g
        bh = b * Hq + h
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdb + h * sdh
        m_base = Mask + b * smb + h * smh
        for start_m in range(lo, L, BLOCK_M):
            offs_m = start_m + offs_m0
            qt = _operand(_load_tile(q_base, offs_d, E, sqe, offs_m, L, sql), ACC, UPCAST)
            do = _operand(_load_tile(do_base, offs_m, L, sdl, offs_dv, Ev, sde), ACC, UPCAST)
            lse2, delta = _row_stats(Lse + bh * L, Delta + bh * L, offs_m, L)
            st = _scores(tl.dot(k, qt, input_precision=PREC), offs_m[None, :], offs_n[:, None],
                         L, S, m_base, sml, sms, qk_scale, HAS_MASK, MASK_BOOL, IS_CAUSAL)
            pt = tl.math.exp2(st - lse2.to(ACC)[None, :])
            dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
            if DROPOUT:
                keep = _keep(_row_keys(seed, bh, offs_m)[None, :], offs_n[:, None], threshold)
                pdt = tl.where(keep, pt * drop_scale, 0.0)
                dpt = tl.where(keep, dpt * drop_scale, 0.0)
            else:
                pdt = pt
            dv += tl.dot(pdt.to(do.dtype), do, input_precision=PREC)
            dst = pt * (dpt - delta.to(ACC)[None, :])
            dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PREC)
    dk *= sm_scale
    n_ok = (offs_n < S)[:, None]
    dk_ptr = (DK + b * sdkb + hk * sdkh + offs_n.to(tl.int64)[:, None] * sdks
              + offs_d[None, :] * sdke)
    tl.store(dk_ptr, dk.to(DK.dtype.element_ty), mask=n_ok & (offs_d < E)[None, :])
    dv_ptr = (DV + b * sdvb + hk * sdvh + offs_n.to(tl.int64)[:, None] * sdvs
              + offs_dv[None, :] * sdve)
    tl.store(dv_ptr, dv.to(DV.dtype.element_ty), mask=n_ok & (offs_dv < Ev)[None, :])


@triton.jit(do_not_specialize=["seed", "threshold"])
def _sdpa_bwd_dq(Q, K, V, Mask, DO, Lse, Delta, DQ,
                 sqb, sqh, sql, sqe, skb, skh, sks, ske, svb, svh, svs, sve,
                 smb, smh, sml, sms, sdb, sdh, sdl, sde, sdqb, sdqh, sdql, sdqe,
                 Hq, group, L, S, E, Ev, qk_scale, sm_scale, seed, threshold, drop_scale,
                 HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr,
                 DROPOUT: tl.constexpr, UPCAST: tl.constexpr, FP64: tl.constexpr,
                 PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dQ of one query block of one query head, looping over key blocks."""
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    n_m = tl.cdiv(L, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // n_m
    pid_m = pid % n_m
    if IS_CAUSAL:
        pid_m = n_m - 1 - pid_m
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    hk = h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _operand(_load_tile(Q + b * sqb + h * sqh, offs_m, L, sql, offs_d, E, sqe), ACC, UPCAST)
    do = _operand(_load_tile(DO + b * sdb + h * sdh, offs_m, L, sdl, offs_dv, Ev, sde),
                  ACC, UPCAST)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    m_base = Mask + b * smb + h * smh
    if DROPOUT:
        rows = _row_keys(seed, bh, offs_m)
    lse2, delta = _row_stats(Lse + bh * L, Delta + bh * L, offs_m, L)
    lse2 = lse2.to(ACC)
    delta = delta.to(ACC)
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    hi = S
    if IS_CAUSAL:
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kt = _operand(_load_tile(k_base, offs_d, E, ske, offs_n, S, sks), ACC, UPCAST)
        vt = _operand(_load_tile(v_base, offs_dv, Ev, sve, offs_n, S, svs), ACC, UPCAST)
        s = _scores(tl.dot(q, kt, input_precision=PREC), offs_m[:, None], offs_n[None, :], L, S,
                    m_base, sml, sms, qk_scale, HAS_MASK, MASK_BOOL, IS_CAUSAL)
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, vt, input_precision=PREC)
        if DROPOUT:
            dp = tl.where(_keep(rows[:, None], offs_n[None, :], threshold), dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PREC)
    dq *= sm_scale
    dq_ptr = (DQ + b * sdqb + h * sdqh + offs_m.to(tl.int64)[:, None] * sdql
              + offs_d[None, :] * sdqe)
    tl.store(dq_ptr, dq.to(DQ.dtype.element_ty),
             mask=(offs_m < L)[:, None] & (offs_d < E)[None, :])


# --------------------------------------------------------------------------------------------
# Host side


def _interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


def head_block(d: int) -> int:
    """Padded head dimension: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(d))


# Block sizes per padded head dim (BLOCK_M, BLOCK_N, num_warps, num_stages) on sm_80/sm_90,
# each checked to compile for sm_80 with zero spills with every mode flag on (the first of each
# list for sm_90 too: kernels/aot.py). The forward keeps a [BLOCK_M, D] fp32 accumulator, the Q
# tile and a [BLOCK_M, BLOCK_N] score tile in registers: 128 x 64 with 8 warps up to D = 128
# (4 warps spill once mask + dropout + causal are on), 64 x 64 at D = 256. dK/dV hold two
# [BLOCK_N, D] accumulators plus K and V, hence the small tiles; dQ one accumulator.
# fp32 operands run on FMA units (input_precision="ieee"), which needs far smaller tiles.
# The first config of each list is the one the AOT report compiles (zero spills, all features on);
# the larger ones after it are candidates for the GPU autotuner, added after the first H200 run
# showed the forward at 100-280 TFLOP/s against torch's 260-560 (bench/NOTES.md).
_CONFIGS = {
    ("fwd", False): {
        16: [(128, 64, 8, 3), (128, 128, 8, 3)],
        32: [(128, 64, 8, 3), (128, 128, 8, 3)],
        64: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
        128: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3), (64, 128, 4, 3)],
        256: [(64, 64, 8, 2)],
    },
    ("fwd", True): {16: [(32, 32, 4, 2)], 32: [(32, 32, 4, 2)], 64: [(32, 32, 4, 2)],
                    128: [(32, 32, 4, 2)], 256: [(16, 32, 4, 1)]},
    ("dkdv", False): {
        16: [(32, 32, 4, 2), (16, 64, 4, 2)],
        32: [(32, 32, 4, 2), (16, 64, 4, 2)],
        64: [(32, 32, 4, 2), (16, 64, 4, 2), (64, 64, 4, 2), (32, 128, 8, 2)],
        128: [(32, 64, 8, 2), (16, 64, 8, 1), (64, 64, 8, 2), (32, 128, 8, 2)],
        256: [(16, 32, 8, 1), (32, 32, 8, 1)],
    },
    ("dkdv", True): {16: [(16, 32, 4, 2)], 32: [(16, 32, 4, 2)], 64: [(16, 32, 4, 2)],
                     128: [(16, 32, 4, 1)], 256: [(16, 16, 4, 1)]},
    ("dq", False): {
        16: [(128, 32, 8, 2), (64, 32, 4, 2)],
        32: [(128, 32, 8, 2), (64, 32, 4, 2)],
        64: [(128, 32, 8, 2), (64, 32, 4, 2), (64, 64, 4, 2), (128, 64, 8, 2)],
        128: [(64, 32, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2)],
        256: [(64, 16, 8, 1), (32, 16, 4, 1)],
    },
    ("dq", True): {16: [(32, 16, 4, 1)], 32: [(32, 16, 4, 1)], 64: [(32, 16, 4, 1)],
                   128: [(32, 16, 4, 1)], 256: [(16, 16, 4, 1)]},
}
_INTERPRETER_CONFIG = (16, 16, 4, 1)  # tests use L, S <= 40: a few programs of a few blocks


def config_table(kind: str, fp32: bool) -> dict[int, list[tuple[int, int, int, int]]]:
    """{padded head dim: [(BLOCK_M, BLOCK_N, num_warps, num_stages), ...]} of a kernel kind
    (fwd, dkdv, dq) for fp32 operands or for fp16/bf16."""
    return _CONFIGS[(kind, fp32)]


@functools.lru_cache(maxsize=None)
def _tuned(kernel_name: str, d: int, fp32: bool):
    """The kernel autotuned over its configs for padded head dim d (GPU only)."""
    kernel = {"fwd": _sdpa_fwd_kernel, "dkdv": _sdpa_bwd_dkdv, "dq": _sdpa_bwd_dq}[kernel_name]
    configs = [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=st)
               for m, n, w, st in config_table(kernel_name, fp32)[d]]
    return triton.autotune(configs, key=["L", "S", "E", "Ev", "group"])(kernel)


def _launch(kernel_name: str, kernel, d: int, grid_of, *args, **constexprs) -> None:
    if _interpreting():
        m, n, w, _ = _INTERPRETER_CONFIG
        kernel[(grid_of(m, n),)](*args, BLOCK_M=m, BLOCK_N=n, num_warps=w, **constexprs)
    else:
        _tuned(kernel_name, d, constexprs["PREC"] == "ieee")[lambda meta: (grid_of(meta["BLOCK_M"], meta["BLOCK_N"]),)](
            *args, **constexprs)


def _strides(t: Optional[torch.Tensor]) -> tuple[int, ...]:
    return (0, 0, 0, 0) if t is None else tuple(t.stride())


def check_args(query, key, value, attn_mask, dropout_p, scale, grad_out=None, out=None, lse=None):
    """Shapes, dtypes and devices of the op's arguments; returns (B, Hq, Hk, L, S, E, Ev)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"pyseqk.kernels.sdpa: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"pyseqk.kernels.sdpa: {name} must be 4-D [batch, heads, seq, dim], "
                             f"got shape {tuple(t.shape)}")
    dtype, device = query.dtype, query.device
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"pyseqk.kernels.sdpa: query has dtype {dtype}, expected one of "
                        f"{', '.join(map(str, SUPPORTED_DTYPES))}")
    if dtype == torch.float64 and not _interpreting():
        raise TypeError("pyseqk.kernels.sdpa: float64 runs only under TRITON_INTERPRET=1 (GPU "
                        "tensor cores have no fp64 path in this kernel); use the cuda or "
                        "reference backend for float64 on a GPU")
    B, Hq, L, E = query.shape
    _, Hk, S, _ = key.shape
    Ev = value.shape[3]
    named = [("key", key), ("value", value), ("grad_out", grad_out), ("out", out)]
    for name, t in named:
        if t is None:
            continue
        if t.dtype != dtype:
            raise TypeError(f"pyseqk.kernels.sdpa: {name} has dtype {t.dtype}, expected {dtype} "
                            "(the query's)")
        if t.device != device:
            raise ValueError(f"pyseqk.kernels.sdpa: {name} is on {t.device}, expected {device}")
    if key.shape[0] != B or key.shape[3] != E:
        raise ValueError(f"pyseqk.kernels.sdpa: key must have shape [{B}, Hk, S, {E}] to match "
                         f"query {tuple(query.shape)}, got {tuple(key.shape)}")
    if tuple(value.shape[:3]) != (B, Hk, S):
        raise ValueError(f"pyseqk.kernels.sdpa: value must have shape [{B}, {Hk}, {S}, Ev] to "
                         f"match key {tuple(key.shape)}, got {tuple(value.shape)}")
    if Hk == 0 or Hq % Hk != 0:
        raise ValueError(f"pyseqk.kernels.sdpa: query heads ({Hq}) must be a multiple of key/value "
                         f"heads ({Hk})")
    if E > MAX_HEAD_DIM or Ev > MAX_HEAD_DIM:
        raise ValueError(f"pyseqk.kernels.sdpa: head dims up to {MAX_HEAD_DIM} are supported, got "
                         f"E={E}, Ev={Ev}")
    if attn_mask is not None:
        if attn_mask.dtype not in (torch.bool, dtype):
            raise TypeError(f"pyseqk.kernels.sdpa: attn_mask must be bool or {dtype} (the query's "
                            f"dtype), got {attn_mask.dtype}")
        if tuple(attn_mask.shape) != (B, Hq, L, S):
            raise ValueError(f"pyseqk.kernels.sdpa: attn_mask must be expanded to [B, Hq, L, S] = "
                             f"{[B, Hq, L, S]}, got {tuple(attn_mask.shape)}")
        if attn_mask.device != device:
            raise ValueError(f"pyseqk.kernels.sdpa: attn_mask is on {attn_mask.device}, "
                             f"expected {device}")
    if not 0.0 <= dropout_p <= 1.0 or math.isnan(dropout_p):
        raise ValueError(f"pyseqk.kernels.sdpa: dropout_p must be in [0, 1], got {dropout_p}")
    if not math.isfinite(scale):
        raise ValueError(f"pyseqk.kernels.sdpa: scale must be finite, got {scale}")
    if grad_out is not None and tuple(grad_out.shape) != (B, Hq, L, Ev):
        raise ValueError(f"pyseqk.kernels.sdpa: grad_out must have shape {[B, Hq, L, Ev]}, got "
                         f"{tuple(grad_out.shape)}")
    if out is not None and tuple(out.shape) != (B, Hq, L, Ev):
        raise ValueError(f"pyseqk.kernels.sdpa: out must have shape {[B, Hq, L, Ev]}, got "
                         f"{tuple(out.shape)}")
    if lse is not None and (lse.dtype != torch.float32 or tuple(lse.shape) != (B, Hq, L)
                            or lse.device != device):
        raise ValueError(f"pyseqk.kernels.sdpa: lse must be float32 {[B, Hq, L]} on {device}, got "
                         f"{lse.dtype} {tuple(lse.shape)} on {lse.device}")
    return B, Hq, Hk, L, S, E, Ev


def _dropout_args(dropout_p: float, seed: int) -> tuple[int, int, float]:
    """(seed mod 2**32, threshold = floor(p * 2**24) as dropout::threshold, 1 / (1 - p))."""
    if dropout_p <= 0.0:
        return 0, 0, 1.0
    threshold = 1 << 24 if dropout_p >= 1.0 else int(dropout_p * 16777216.0)
    # p = 1 drops everything: scale kept values (there are none) by 0, not inf.
    return seed & 0xFFFFFFFF, threshold, 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)


def _modes(query, attn_mask, dropout_p, is_causal):
    fp64 = query.dtype == torch.float64
    return dict(HAS_MASK=attn_mask is not None,
                MASK_BOOL=attn_mask is not None and attn_mask.dtype == torch.bool,
                IS_CAUSAL=bool(is_causal), DROPOUT=dropout_p > 0.0,
                UPCAST=_interpreting() or query.dtype in (torch.float32, torch.float64),
                FP64=fp64, PREC="ieee" if query.dtype in (torch.float32, torch.float64) else "tf32")


def _guard(t: torch.Tensor):
    import contextlib
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _result(like, *shape):
    """An output buffer. The interpreter converts fp32 to bf16 by truncation where a GPU rounds
    to nearest (twice the rounding error), so under it bf16 results are written in fp32 and
    rounded by torch (_rounded)."""
    dtype = torch.float32 if _interpreting() and like.dtype == torch.bfloat16 else like.dtype
    return like.new_empty(shape, dtype=dtype)


def _rounded(t, dtype):
    return t if t.dtype == dtype else t.to(dtype)


def _forward_into(query, key, value, attn_mask, dropout_p, is_causal, scale, seed, lse):
    B, Hq, L, E = query.shape
    Hk, S, Ev = key.shape[1], key.shape[2], value.shape[3]
    out = _result(query, B, Hq, L, Ev)
    if B * Hq * L == 0:
        return _rounded(out, query.dtype), lse
    seed32, threshold, drop_scale = _dropout_args(dropout_p, seed)
    d = head_block(E)
    with _guard(query):
        _launch("fwd", _sdpa_fwd_kernel, d, lambda bm, bn: triton.cdiv(L, bm) * B * Hq,
                query, key, value, query if attn_mask is None else attn_mask, out, lse,
                *query.stride(), *key.stride(), *value.stride(), *_strides(attn_mask),
                *out.stride(), Hq, Hq // Hk, L, S, E, Ev, scale * LOG2E.value, seed32, threshold,
                drop_scale, BLOCK_D=d, BLOCK_DV=head_block(Ev),
                **_modes(query, attn_mask, dropout_p, is_causal))
    return _rounded(out, query.dtype), lse


def sdpa_forward(query, key, value, attn_mask, dropout_p, is_causal, scale, seed):
    """Returns (out [B, Hq, L, Ev] in query's dtype, lse float32 [B, Hq, L])."""
    B, Hq, Hk, L, S, E, Ev = check_args(query, key, value, attn_mask, dropout_p, scale)
    lse = query.new_empty(B, Hq, L, dtype=torch.float32)
    return _forward_into(query, key, value, attn_mask, dropout_p, is_causal, scale, seed, lse)


def sdpa_backward(grad_out, query, key, value, out, lse, attn_mask, dropout_p, is_causal, scale,
                  seed):
    """Returns (grad_query, grad_key, grad_value), each like its input. Deterministic."""
    B, Hq, Hk, L, S, E, Ev = check_args(query, key, value, attn_mask, dropout_p, scale,
                                        grad_out=grad_out, out=out, lse=lse)
    dq, dk, dv = (_result(t, *t.shape) for t in (query, key, value))
    if L == 0 or S == 0 or B * Hq == 0:
        return tuple(_rounded(t.zero_(), query.dtype) for t in (dq, dk, dv))
    lse = lse.contiguous()
    fp64 = query.dtype == torch.float64
    if fp64:
        # The op's lse is float32: P recomputed from it would carry its 1e-7 relative error into
        # every float64 gradient. float64 only runs under the interpreter (tests, gradcheck), so
        # recompute lse in float64 with one more forward pass instead.
        lse = _forward_into(query, key, value, attn_mask, dropout_p, is_causal, scale, seed,
                            torch.empty(B, Hq, L, dtype=torch.float64, device=query.device))[1]
    delta = torch.empty(B, Hq, L, dtype=torch.float64 if fp64 else torch.float32,
                        device=query.device)
    seed32, threshold, drop_scale = _dropout_args(dropout_p, seed)
    modes = _modes(query, attn_mask, dropout_p, is_causal)
    mask = query if attn_mask is None else attn_mask
    d, dvb = head_block(E), head_block(Ev)
    common = (*query.stride(), *key.stride(), *value.stride(), *_strides(attn_mask),
              *grad_out.stride())
    with _guard(query):
        # Two [bm, Ev] fp32 tiles in the registers of 4 warps: 64 values a thread at most.
        bm = _INTERPRETER_CONFIG[0] if _interpreting() else max(16, 8192 // dvb)
        _sdpa_bwd_preprocess[(triton.cdiv(L, bm) * B * Hq,)](
            out, grad_out, delta, *out.stride(), *grad_out.stride(), Hq, L, Ev, FP64=fp64,
            BLOCK_M=bm, BLOCK_DV=dvb)
        _launch("dkdv", _sdpa_bwd_dkdv, d, lambda bm, bn: triton.cdiv(S, bn) * B * Hk,
                query, key, value, mask, grad_out, lse, delta, dk, dv, *common,
                *dk.stride(), *dv.stride(), Hq, Hk, Hq // Hk, L, S, E, Ev, scale * LOG2E.value, scale,
                seed32, threshold, drop_scale, BLOCK_D=d, BLOCK_DV=dvb, **modes)
        _launch("dq", _sdpa_bwd_dq, d, lambda bm, bn: triton.cdiv(L, bm) * B * Hq,
                query, key, value, mask, grad_out, lse, delta, dq, *common, *dq.stride(),
                Hq, Hq // Hk, L, S, E, Ev, scale * LOG2E.value, scale, seed32, threshold, drop_scale,
                BLOCK_D=d, BLOCK_DV=dvb, **modes)
    return tuple(_rounded(t, query.dtype) for t in (dq, dk, dv))
