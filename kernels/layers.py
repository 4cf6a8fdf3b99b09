"""Whole-sequence layers (LSTM with projection, GRU, Elman RNN): the entire time loop in ONE launch.

One program per batch row loops over the T steps; per step it computes the recurrent GEMV
h_{t-1} W_hh^T block by block of hidden units (W_hh streamed from L2, a [BLOCK_H, BLOCK_K]
tile at a time), applies the gate math, writes h_t to global memory and meets a barrier before
the next step reads it (every thread of the program reads every element of h_{t-1}). The input
projection x W_ih^T + b of all steps is one torch GEMM before the launch; the weight gradients
are torch GEMMs over all T*B rows after the backward launch (pyseqk/_triton_layer_ops.py).

Shapes (B batch, H hidden, P projected size = H without projection, G = 4H / 3H / H) and the
time-ordered state buffers are those of the C++ ops (csrc/ops/layers.h):
  hs [T+1, B, P], cs [T+1, B, H]: forward, the state before step t is index t and after it t+1;
  reverse, before t is t+1 and after it t. lengths int64 [B]: row b is valid at step t when
  t < lengths[b]; an invalid row carries its state, outputs zero and has zero gate gradients.

One program per row keeps the row's recurrence in one CTA with no grid-wide synchronisation;
the price is that each row re-reads W_hh every step (from L2 at the benchmark sizes)."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import _device_guard, check_tensors, sigmoid, tanh, to_compute

# One config (the interpreter cannot autotune). A [64, 32] fp32 tile is 16 values per thread
# at 4 warps: the four gate accumulators and the tile stay in registers (aot.py: zero spills).
BLOCK_H = 64
BLOCK_K = 32
NUM_WARPS = 4


# --------------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def _load(ptr, mask):
    return to_compute(tl.load(ptr, mask=mask, other=0.0))


@triton.jit
def _store(ptr, x, mask):
    tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rows_dot(w_ptr, ld, rows, rmask, v_ptr, K, BLOCK_K: tl.constexpr):
    """sum_k W[rows, k] * v[k]: rows int64 [BLOCK_R], W row-major with leading dimension ld."""
    acc = to_compute(tl.zeros(rows.shape, v_ptr.dtype.element_ty))
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < K
        v = _load(v_ptr + k, km)
        w = _load(w_ptr + rows[:, None] * ld + k[None, :], rmask[:, None] & km[None, :])
        acc += tl.sum(w * v[None, :], axis=1)
    return acc


@triton.jit
def _cols_dot(w_ptr, ld, cols, cmask, v_ptr, G, BLOCK_K: tl.constexpr):
    """sum_g v[g] * W[g, cols]: cols int64 [BLOCK_C], W row-major [G, ld]."""
    acc = to_compute(tl.zeros(cols.shape, v_ptr.dtype.element_ty))
    for g0 in range(0, G, BLOCK_K):
        g = g0 + tl.arange(0, BLOCK_K)
        gm = g < G
        v = _load(v_ptr + g, gm)
        w = _load(w_ptr + g.to(tl.int64)[:, None] * ld + cols[None, :], gm[:, None] & cmask[None, :])
        acc += tl.sum(w * v[:, None], axis=0)
    return acc


@triton.jit
def _row_length(len_ptr, b, T, HAS_LEN: tl.constexpr):
    L = T
    if HAS_LEN:
        L = tl.load(len_ptr + b).to(tl.int32)
    return L


@triton.jit
def _step_index(s, T, REVERSE: tl.constexpr, BACKWARD: tl.constexpr):
    """(t, index of the state before t, index after t) of processing step s."""
    if REVERSE != BACKWARD:
        t = T - 1 - s
    else:
        t = s
    if REVERSE:
        ip = t + 1
        inn = t
    else:
        ip = t
        inn = t + 1
    return tl.cast(t, tl.int64), tl.cast(ip, tl.int64), tl.cast(inn, tl.int64)


# --------------------------------------------------------------------------------------------
# LSTM


@triton.jit
def _lstm_layer_fwd_kernel(gates_ptr, whh_ptr, whr_ptr, hs_ptr, cs_ptr, ms_ptr, out_ptr, len_ptr,
                           T, B, H, P, REVERSE: tl.constexpr, HAS_LEN: tl.constexpr,
                           PROJ: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    L = _row_length(len_ptr, b, T, HAS_LEN)
    for s in range(0, T):
        t, ip, inn = _step_index(s, T, REVERSE, False)
        valid = t < L
        g_row = gates_ptr + (t * B + b) * 4 * H
        hp = hs_ptr + (ip * B + b) * P
        hn = hs_ptr + (inn * B + b) * P
        cp = cs_ptr + (ip * B + b) * H
        cn = cs_ptr + (inn * B + b) * H
        row = (t * B + b) * P
        for j0 in range(0, H, BLOCK_H):
            j = j0 + tl.arange(0, BLOCK_H)
            jm = j < H
            r = j.to(tl.int64)
            pi = _load(g_row + j, jm) + _rows_dot(whh_ptr, P, r, jm, hp, P, BLOCK_K)
            pf = _load(g_row + H + j, jm) + _rows_dot(whh_ptr, P, r + H, jm, hp, P, BLOCK_K)
            pg = _load(g_row + 2 * H + j, jm) + _rows_dot(whh_ptr, P, r + 2 * H, jm, hp, P, BLOCK_K)
            po = _load(g_row + 3 * H + j, jm) + _rows_dot(whh_ptr, P, r + 3 * H, jm, hp, P, BLOCK_K)
            i = sigmoid(pi)
            f = sigmoid(pf)
            g = tanh(pg)
            o = sigmoid(po)
            c_prev = _load(cp + j, jm)
            c = f * c_prev + i * g
            h = o * tanh(c)
            _store(g_row + j, i, jm)
            _store(g_row + H + j, f, jm)
            _store(g_row + 2 * H + j, g, jm)
            _store(g_row + 3 * H + j, o, jm)
            _store(cn + j, tl.where(valid, c, c_prev), jm)
            if PROJ:
                _store(ms_ptr + (t * B + b) * H + j, tl.where(valid, h, 0.0), jm)
            else:
                _store(hn + j, tl.where(valid, h, _load(hp + j, jm)), jm)
                _store(out_ptr + row + j, tl.where(valid, h, 0.0), jm)
        if PROJ:
            tl.debug_barrier()  # m_t complete before the projection reads all of it
            m_row = ms_ptr + (t * B + b) * H
            for p0 in range(0, P, BLOCK_H):
                p = p0 + tl.arange(0, BLOCK_H)
                pm = p < P
                hproj = _rows_dot(whr_ptr, H, p.to(tl.int64), pm, m_row, H, BLOCK_K)
                _store(hn + p, tl.where(valid, hproj, _load(hp + p, pm)), pm)
                _store(out_ptr + row + p, tl.where(valid, hproj, 0.0), pm)
        tl.debug_barrier()  # h_t complete before step t+1 reads all of it


@triton.jit
def _lstm_layer_bwd_kernel(gates_ptr, whh_ptr, whr_ptr, cs_ptr, go_ptr, dh_ptr, dc_ptr, dg_ptr,
                           dr_ptr, len_ptr, T, B, H, P, REVERSE: tl.constexpr,
                           HAS_LEN: tl.constexpr, PROJ: tl.constexpr, HAS_GO: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """dh_ptr [2, B, P]: ping-pong gradient of h (index 0 holds grad_h_n on entry, index T % 2
    the gradient of h0 on exit); dc_ptr [B, H] grad_c_n in, grad_c0 out."""
    b = tl.program_id(0).to(tl.int64)
    L = _row_length(len_ptr, b, T, HAS_LEN)
    G = 4 * H
    for s in range(0, T):
        t, ip, inn = _step_index(s, T, REVERSE, True)
        valid = t < L
        cur = s % 2
        dh_cur = dh_ptr + (cur * B + b) * P
        dh_nxt = dh_ptr + ((1 - cur) * B + b) * P
        row = (t * B + b) * P
        g_row = gates_ptr + (t * B + b) * G
        dg_row = dg_ptr + (t * B + b) * G
        if PROJ:
            for p0 in range(0, P, BLOCK_H):
                p = p0 + tl.arange(0, BLOCK_H)
                pm = p < P
                v = _load(dh_cur + p, pm)
                if HAS_GO:
                    v += _load(go_ptr + row + p, pm)
                _store(dr_ptr + row + p, tl.where(valid, v, 0.0), pm)
            tl.debug_barrier()
        for j0 in range(0, H, BLOCK_H):
            j = j0 + tl.arange(0, BLOCK_H)
            jm = j < H
            if PROJ:
                dh = _cols_dot(whr_ptr, H, j.to(tl.int64), jm, dr_ptr + row, P, BLOCK_K)
            else:
                dh = _load(dh_cur + j, jm)
                if HAS_GO:
                    dh += _load(go_ptr + row + j, jm)
            i = _load(g_row + j, jm)
            f = _load(g_row + H + j, jm)
            g = _load(g_row + 2 * H + j, jm)
            o = _load(g_row + 3 * H + j, jm)
            c_prev = _load(cs_ptr + (ip * B + b) * H + j, jm)
            tc = tanh(_load(cs_ptr + (inn * B + b) * H + j, jm))
            dc_next = _load(dc_ptr + b * H + j, jm)
            dc = dc_next + dh * o * (1.0 - tc * tc)
            _store(dg_row + j, tl.where(valid, dc * g * i * (1.0 - i), 0.0), jm)
            _store(dg_row + H + j, tl.where(valid, dc * c_prev * f * (1.0 - f), 0.0), jm)
            _store(dg_row + 2 * H + j, tl.where(valid, dc * i * (1.0 - g * g), 0.0), jm)
            _store(dg_row + 3 * H + j, tl.where(valid, dh * tc * o * (1.0 - o), 0.0), jm)
            _store(dc_ptr + b * H + j, tl.where(valid, dc * f, dc_next), jm)
        tl.debug_barrier()  # dgates_t complete before the W_hh product reads all of it
        for p0 in range(0, P, BLOCK_H):
            p = p0 + tl.arange(0, BLOCK_H)
            pm = p < P
            acc = _cols_dot(whh_ptr, P, p.to(tl.int64), pm, dg_row, G, BLOCK_K)
            _store(dh_nxt + p, tl.where(valid, acc, _load(dh_cur + p, pm)), pm)
        tl.debug_barrier()


# --------------------------------------------------------------------------------------------
# GRU


@triton.jit
def _gru_layer_fwd_kernel(gi_ptr, whh_ptr, bhn_ptr, hs_ptr, ws_ptr, out_ptr, len_ptr, T, B, H,
                          REVERSE: tl.constexpr, HAS_LEN: tl.constexpr, HAS_BHN: tl.constexpr,
                          BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    L = _row_length(len_ptr, b, T, HAS_LEN)
    for s in range(0, T):
        t, ip, inn = _step_index(s, T, REVERSE, False)
        valid = t < L
        x_row = gi_ptr + (t * B + b) * 3 * H
        w_row = ws_ptr + (t * B + b) * 4 * H
        hp = hs_ptr + (ip * B + b) * H
        for j0 in range(0, H, BLOCK_H):
            j = j0 + tl.arange(0, BLOCK_H)
            jm = j < H
            r64 = j.to(tl.int64)
            hr = _rows_dot(whh_ptr, H, r64, jm, hp, H, BLOCK_K)
            hz = _rows_dot(whh_ptr, H, r64 + H, jm, hp, H, BLOCK_K)
            hn = _rows_dot(whh_ptr, H, r64 + 2 * H, jm, hp, H, BLOCK_K)
            if HAS_BHN:
                hn += _load(bhn_ptr + j, jm)
            r = sigmoid(_load(x_row + j, jm) + hr)
            z = sigmoid(_load(x_row + H + j, jm) + hz)
            n = tanh(_load(x_row + 2 * H + j, jm) + r * hn)
            h_prev = _load(hp + j, jm)
            h = n + z * (h_prev - n)
            _store(w_row + j, tl.where(valid, r, 0.0), jm)
            _store(w_row + H + j, tl.where(valid, z, 0.0), jm)
            _store(w_row + 2 * H + j, tl.where(valid, n, 0.0), jm)
            _store(w_row + 3 * H + j, tl.where(valid, hn, 0.0), jm)
            _store(hs_ptr + (inn * B + b) * H + j, tl.where(valid, h, h_prev), jm)
            _store(out_ptr + (t * B + b) * H + j, tl.where(valid, h, 0.0), jm)
        tl.debug_barrier()


@triton.jit
def _gru_layer_bwd_kernel(ws_ptr, whh_ptr, hs_ptr, go_ptr, dh_ptr, dgi_ptr, dgh_ptr, len_ptr,
                          T, B, H, REVERSE: tl.constexpr, HAS_LEN: tl.constexpr,
                          HAS_GO: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    L = _row_length(len_ptr, b, T, HAS_LEN)
    for s in range(0, T):
        t, ip, inn = _step_index(s, T, REVERSE, True)
        valid = t < L
        cur = s % 2
        dh_cur = dh_ptr + (cur * B + b) * H
        dh_nxt = dh_ptr + ((1 - cur) * B + b) * H
        w_row = ws_ptr + (t * B + b) * 4 * H
        di_row = dgi_ptr + (t * B + b) * 3 * H
        dh_row = dgh_ptr + (t * B + b) * 3 * H
        for j0 in range(0, H, BLOCK_H):
            j = j0 + tl.arange(0, BLOCK_H)
            jm = j < H
            dh = _load(dh_cur + j, jm)
            dh_t = dh
            if HAS_GO:
                dh_t += _load(go_ptr + (t * B + b) * H + j, jm)
            r = _load(w_row + j, jm)
            z = _load(w_row + H + j, jm)
            n = _load(w_row + 2 * H + j, jm)
            hn = _load(w_row + 3 * H + j, jm)
            h_prev = _load(hs_ptr + (ip * B + b) * H + j, jm)
            dn = dh_t * (1.0 - z)
            d_in = dn * (1.0 - n * n)
            dr = tl.where(valid, d_in * hn * r * (1.0 - r), 0.0)
            dz = tl.where(valid, dh_t * (h_prev - n) * z * (1.0 - z), 0.0)
            d_in = tl.where(valid, d_in, 0.0)
            _store(di_row + j, dr, jm)
            _store(di_row + H + j, dz, jm)
            _store(di_row + 2 * H + j, d_in, jm)
            _store(dh_row + j, dr, jm)
            _store(dh_row + H + j, dz, jm)
            _store(dh_row + 2 * H + j, d_in * r, jm)
            _store(dh_nxt + j, tl.where(valid, dh_t * z, dh), jm)
        tl.debug_barrier()
        for p0 in range(0, H, BLOCK_H):
            p = p0 + tl.arange(0, BLOCK_H)
            pm = p < H
            acc = _cols_dot(whh_ptr, H, p.to(tl.int64), pm, dh_row, 3 * H, BLOCK_K)
            _store(dh_nxt + p, _load(dh_nxt + p, pm) + acc, pm)
        tl.debug_barrier()


# --------------------------------------------------------------------------------------------
# Elman RNN


@triton.jit
def _rnn_layer_fwd_kernel(pre_ptr, whh_ptr, hs_ptr, out_ptr, len_ptr, T, B, H,
                          RELU: tl.constexpr, REVERSE: tl.constexpr, HAS_LEN: tl.constexpr,
                          BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    L = _row_length(len_ptr, b, T, HAS_LEN)
    for s in range(0, T):
        t, ip, inn = _step_index(s, T, REVERSE, False)
        valid = t < L
        hp = hs_ptr + (ip * B + b) * H
        row = (t * B + b) * H
        for j0 in range(0, H, BLOCK_H):
            j = j0 + tl.arange(0, BLOCK_H)
            jm = j < H
            a = _load(pre_ptr + row + j, jm) + _rows_dot(whh_ptr, H, j.to(tl.int64), jm, hp, H,
                                                         BLOCK_K)
            if RELU:
                h = tl.maximum(a, 0.0)
            else:
                h = tanh(a)
            _store(hs_ptr + (inn * B + b) * H + j, tl.where(valid, h, _load(hp + j, jm)), jm)
            _store(out_ptr + row + j, tl.where(valid, h, 0.0), jm)
        tl.debug_barrier()


@triton.jit
def _rnn_layer_bwd_kernel(hs_ptr, whh_ptr, go_ptr, dh_ptr, dp_ptr, len_ptr, T, B, H,
                          RELU: tl.constexpr, REVERSE: tl.constexpr, HAS_LEN: tl.constexpr,
                          HAS_GO: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    L = _row_length(len_ptr, b, T, HAS_LEN)
    for s in range(0, T):
        t, ip, inn = _step_index(s, T, REVERSE, True)
        valid = t < L
        cur = s % 2
        dh_cur = dh_ptr + (cur * B + b) * H
        dh_nxt = dh_ptr + ((1 - cur) * B + b) * H
        row = (t * B + b) * H
        for j0 in range(0, H, BLOCK_H):
            j = j0 + tl.arange(0, BLOCK_H)
            jm = j < H
            dh = _load(dh_cur + j, jm)
            if HAS_GO:
                dh += _load(go_ptr + row + j, jm)
            h = _load(hs_ptr + (inn * B + b) * H + j, jm)
            if RELU:
                dp = tl.where(h > 0.0, dh, 0.0)
            else:
                dp = dh * (1.0 - h * h)
            _store(dp_ptr + row + j, tl.where(valid, dp, 0.0), jm)
        tl.debug_barrier()
        for p0 in range(0, H, BLOCK_H):
            p = p0 + tl.arange(0, BLOCK_H)
            pm = p < H
            acc = _cols_dot(whh_ptr, H, p.to(tl.int64), pm, dp_ptr + row, H, BLOCK_K)
            _store(dh_nxt + p, tl.where(valid, acc, _load(dh_cur + p, pm)), pm)
        tl.debug_barrier()


# --------------------------------------------------------------------------------------------
# Host launchers: every tensor contiguous, of one dtype, on one device; lengths int64 [B] on that
# device or None. Nothing launches when T or B is 0.


def _launch(kernel, T: int, B: int, *args, **constexprs) -> None:
    if T == 0 or B == 0:
        return
    with _device_guard(args[0]):
        kernel[(B,)](*args, BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS, **constexprs)


def _check(lengths, like, acc=(), **tensors):
    """tensors: of like's dtype; acc: the fp32 (fp64 for double) gradient carries."""
    check_tensors(like.dtype, like.device, **tensors)
    acc_dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    check_tensors(acc_dtype, like.device, **dict(acc))
    if lengths is not None and (lengths.dtype != torch.int64 or lengths.device != like.device
                                or not lengths.is_contiguous()):
        raise ValueError("pyseqk.kernels: lengths must be contiguous int64 on "
                         f"{like.device}, got {lengths.dtype} on {lengths.device}")


def lstm_layer_forward(gates, w_hh, w_hr: Optional[torch.Tensor], hs, cs, ms, out, lengths,
                       reverse: bool) -> None:
    """gates [T, B, 4H] in: x W_ih^T + b_ih + b_hh, out: activated; hs [T+1, B, P] and
    cs [T+1, B, H] with the initial state at index 0 (T if reverse); ms [T, B, H] (w_hr given);
    out [T, B, P]."""
    T, B, G = gates.shape
    H, P = G // 4, hs.shape[2]
    _check(lengths, gates, gates=gates, w_hh=w_hh, w_hr=w_hr, hs=hs, cs=cs, ms=ms, out=out)
    _launch(_lstm_layer_fwd_kernel, T, B, gates, w_hh, w_hr if w_hr is not None else w_hh, hs, cs,
            ms, out, lengths if lengths is not None else gates, T, B, H, P, REVERSE=reverse,
            HAS_LEN=lengths is not None, PROJ=w_hr is not None)


def lstm_layer_backward(gates, w_hh, w_hr, cs, grad_output, dh, dc, dgates, dr, lengths,
                        reverse: bool) -> None:
    """dh [2, B, P] (grad_h_n at index 0 in, grad_h0 at index T % 2 out); dc [B, H] grad_c_n in,
    grad_c0 out (both fp32, fp64 for double); dgates [T, B, 4H] out; dr [T, B, P] out (gradient of the projected h, w_hr
    given); grad_output [T, B, P] or None."""
    T, B, G = gates.shape
    H, P = G // 4, dh.shape[2]
    _check(lengths, gates, (("dh", dh), ("dc", dc)), gates=gates, w_hh=w_hh, w_hr=w_hr, cs=cs,
           grad_output=grad_output, dgates=dgates, dr=dr)
    _launch(_lstm_layer_bwd_kernel, T, B, gates, w_hh, w_hr if w_hr is not None else w_hh, cs,
            grad_output if grad_output is not None else gates, dh, dc, dgates, dr,
            lengths if lengths is not None else gates, T, B, H, P, REVERSE=reverse,
            HAS_LEN=lengths is not None, PROJ=w_hr is not None, HAS_GO=grad_output is not None)


def gru_layer_forward(gi, w_hh, b_hn, hs, ws, out, lengths, reverse: bool) -> None:
    """gi [T, B, 3H]: x W_ih^T + b_ih + (b_hr, b_hz, 0); b_hn [H] or None; hs [T+1, B, H];
    ws [T, B, 4H] out (r, z, n, hn); out [T, B, H]."""
    T, B, G = gi.shape
    _check(lengths, gi, gi=gi, w_hh=w_hh, b_hn=b_hn, hs=hs, ws=ws, out=out)
    _launch(_gru_layer_fwd_kernel, T, B, gi, w_hh, b_hn if b_hn is not None else gi, hs, ws, out,
            lengths if lengths is not None else gi, T, B, G // 3, REVERSE=reverse,
            HAS_LEN=lengths is not None, HAS_BHN=b_hn is not None)


def gru_layer_backward(ws, w_hh, hs, grad_output, dh, dgi, dgh, lengths, reverse: bool) -> None:
    """dh [2, B, H] as in lstm_layer_backward; dgi, dgh [T, B, 3H] out."""
    T, B, G = ws.shape
    _check(lengths, ws, (("dh", dh),), ws=ws, w_hh=w_hh, hs=hs, grad_output=grad_output, dgi=dgi,
           dgh=dgh)
    _launch(_gru_layer_bwd_kernel, T, B, ws, w_hh, hs,
            grad_output if grad_output is not None else ws, dh, dgi, dgh,
            lengths if lengths is not None else ws, T, B, G // 4, REVERSE=reverse,
            HAS_LEN=lengths is not None, HAS_GO=grad_output is not None)


def rnn_layer_forward(pre, w_hh, hs, out, lengths, relu: bool, reverse: bool) -> None:
    """pre [T, B, H]: x W_ih^T + b_ih + b_hh; hs [T+1, B, H]; out [T, B, H]."""
    T, B, H = pre.shape
    _check(lengths, pre, pre=pre, w_hh=w_hh, hs=hs, out=out)
    _launch(_rnn_layer_fwd_kernel, T, B, pre, w_hh, hs, out,
            lengths if lengths is not None else pre, T, B, H, RELU=relu, REVERSE=reverse,
            HAS_LEN=lengths is not None)


def rnn_layer_backward(hs, w_hh, grad_output, dh, dpre, lengths, relu: bool, reverse: bool) -> None:
    """dh [2, B, H] as in lstm_layer_backward; dpre [T, B, H] out."""
    T, B, H = dpre.shape
    _check(lengths, hs, (("dh", dh),), hs=hs, w_hh=w_hh, grad_output=grad_output, dpre=dpre)
    _launch(_rnn_layer_bwd_kernel, T, B, hs, w_hh,
            grad_output if grad_output is not None else hs, dh, dpre,
            lengths if lengths is not None else hs, T, B, H, RELU=relu, REVERSE=reverse,
            HAS_LEN=lengths is not None, HAS_GO=grad_output is not None)
