"""Scaled dot-product attention (torch.ops.pyseqk.sdpa and pyseqk.functional's entry) on every
backend against the float64 reference: forward and gradients, masks of every broadcast shape,
causal, GQA, dropout, odd sizes; its registration (opcheck, gradcheck, torch.compile), its
bad-input errors and its O(N) memory."""
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as TF

import pyseqk
from pyseqk import functional as F
from pyseqk import reference as R

from _util import assert_close_rule, max_err
from conftest import cpu_backends

# Triton's twin is tested by its author (tests of pyseqk._triton_sdpa_ops); it joins these tests
# when it is present.
HAVE_TRITON_SDPA = importlib.util.find_spec("pyseqk._triton_sdpa_ops") is not None
BACKENDS = [b for b in cpu_backends() if b != "triton" or HAVE_TRITON_SDPA]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def make_qkv(batch, Hq, Hk, L, S, E, Ev, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*batch, Hq, L, E, generator=g)
    k = torch.randn(*batch, Hk, S, E, generator=g)
    v = torch.randn(*batch, Hk, S, Ev, generator=g)
    return [t.to(dtype) for t in (q, k, v)]


def make_mask(shape, kind, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "bool":
        m = torch.rand(*shape, generator=g) > 0.3
        return m
    return (torch.randn(*shape, generator=g)).to(dtype)


def run_with_grads(fn, tensors, grad_seed=2):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*tensors)
    g = torch.Generator().manual_seed(grad_seed)
    go = torch.randn(out.shape, generator=g).to(out)
    out.backward(go)
    return out.detach(), [t.grad for t in tensors]


def torch_sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """PyTorch's own attention in the same dtype: what our error is measured against."""
    if attn_mask is not None:  # torch's fused kernels want the mask at least 2-D
        attn_mask = attn_mask.expand(q.shape[:-1] + (k.shape[-2],))
    if attn_mask is not None and is_causal:  # torch refuses the combination; build one mask
        L, S = q.shape[-2], k.shape[-2]
        causal = torch.ones(L, S, dtype=torch.bool).tril()
        if attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & causal
        else:
            attn_mask = attn_mask.masked_fill(~causal, float("-inf"))
        is_causal = False
    return TF.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           scale=scale, enable_gqa=enable_gqa)


def check(backend, dtype, batch=(2,), Hq=3, Hk=3, L=5, S=7, E=4, Ev=4, mask_shape=None,
          mask_kind="bool", is_causal=False, scale=None, what="", transpose_mask=False):
    q, k, v = make_qkv(batch, Hq, Hk, L, S, E, Ev, dtype)
    mask = None if mask_shape is None else make_mask(mask_shape, mask_kind, dtype)
    if transpose_mask:  # the same values through a non-contiguous view (key stride != 1)
        mask = mask.transpose(-1, -2).contiguous().transpose(-1, -2)
    gqa = Hq != Hk
    kw = dict(is_causal=is_causal, scale=scale, enable_gqa=gqa)

    def ours(q, k, v):
        with pyseqk.use_backend(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)

    out, grads = run_with_grads(ours, [q, k, v])
    mask64 = mask if mask is None or mask.dtype == torch.bool else mask.double()
    ref_out, ref_grads = run_with_grads(
        lambda q, k, v: R.scaled_dot_product_attention(q, k, v, mask64, **kw),
        [q.double(), k.double(), v.double()])
    t_out, t_grads = run_with_grads(lambda q, k, v: torch_sdpa(q, k, v, mask, **kw), [q, k, v])
    assert out.dtype == dtype and out.shape == ref_out.shape, (out.dtype, out.shape)
    tag = f"sdpa[{backend}, {dtype}, {what}]"
    assert_close_rule(out, t_out, ref_out, dtype, tag + " out")
    for name, g, t, r in zip("qkv", grads, t_grads, ref_grads):
        assert_close_rule(g, t, r, dtype, f"{tag} grad {name}")


SHAPES = [  # (batch, Hq, Hk, L, S, E, Ev)
    ((1,), 1, 1, 1, 1, 1, 1),
    ((2,), 3, 3, 3, 5, 5, 3),
    ((1,), 2, 2, 97, 97, 16, 16),
    ((2,), 2, 1, 130, 200, 8, 5),  # crosses the 64-row diagonal strips and 128 x 128 backward tiles
    ((1,), 2, 1, 300, 270, 8, 8),  # crosses the 256-row and 256-key forward tiles; the fp32
                                   # forward's 128-row tiles, 112-key blocks and a 12-row partial
                                   # 32-row micro-tile
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_matches_reference(backend, dtype, shape, causal):
    batch, Hq, Hk, L, S, E, Ev = shape
    check(backend, dtype, batch, Hq, Hk, L, S, E, Ev, is_causal=causal, what=f"{shape} causal={causal}")


@pytest.mark.parametrize("L,S", [(5, 9), (9, 5), (130, 40), (40, 130)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_causal_rectangular(backend, L, S):
    """Top-left alignment with L < S (keys past L never seen) and L > S (late rows see all)."""
    check(backend, torch.float32, (1,), 2, 2, L, S, 8, 8, is_causal=True, what=f"L={L} S={S}")


MASK_SHAPES = [  # broadcast to [B=2, H=3, L=5, S=7]
    (5, 7), (7,), (5, 1), (2, 1, 1, 7), (1, 3, 5, 7), (2, 3, 5, 7), (3, 1, 7), (1, 1, 1, 1), (2, 3, 1, 1),
]


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("mask_shape", MASK_SHAPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_mask_shapes(backend, mask_shape, kind):
    check(backend, torch.float32, (2,), 3, 3, 5, 7, 4, 4, mask_shape=mask_shape, mask_kind=kind,
          what=f"mask {kind} {mask_shape}")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_shape,transpose", [
    ((140, 250), False),        # contiguous rows: the fp32 forward transposes mask tiles
    ((140, 250), True),         # key stride != 1: its element-wise path
    ((2, 1, 1, 250), False),    # query stride 0 (a key padding mask)
    ((140, 1), False),          # key stride 0
], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_mask_across_tiles(backend, mask_shape, transpose, causal):
    """Masks over several query tiles, key blocks and a partial micro-tile (L = 140 = 128 + 12),
    through each way the fp32 forward reads them."""
    check(backend, torch.float32, (2,), 2, 2, 140, 250, 8, 8, mask_shape=mask_shape,
          mask_kind="additive", is_causal=causal, transpose_mask=transpose,
          what=f"mask {mask_shape} transposed={transpose} causal={causal}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_mask_dtypes(backend, dtype):
    check(backend, dtype, (2,), 3, 3, 5, 7, 4, 4, mask_shape=(2, 1, 5, 7), mask_kind="additive",
          what="additive mask")
    check(backend, dtype, (2,), 3, 3, 5, 7, 4, 4, mask_shape=(5, 7), mask_kind="bool", what="bool mask")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_mask_and_causal(backend):
    check(backend, torch.float32, (2,), 2, 2, 6, 9, 4, 4, mask_shape=(2, 1, 6, 9), is_causal=True,
          what="mask + causal")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_leading_batch_dims_and_scale(backend):
    check(backend, torch.float32, (2, 3), 4, 2, 6, 9, 5, 3, mask_shape=(3, 1, 1, 9), scale=0.3,
          what="batch (2, 3), GQA, scale")
    check(backend, torch.float32, (), 2, 2, 6, 9, 5, 3, what="no batch dims")
    # several batch dims whose mask strides cannot merge: [2, 1, ...] against batch (2, 3)
    check(backend, torch.float32, (2, 3), 2, 2, 4, 5, 4, 4, mask_shape=(2, 1, 2, 4, 5),
          mask_kind="additive", what="unmergeable mask batch dims")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_two_dim_inputs(backend):
    q, k, v = torch.randn(5, 4), torch.randn(7, 4), torch.randn(7, 3)
    with pyseqk.use_backend(backend):
        out = F.scaled_dot_product_attention(q, k, v)
    assert out.shape == (5, 3)
    assert max_err(out, TF.scaled_dot_product_attention(q, k, v)) < 1e-5


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_fully_masked_rows(backend, kind):
    """A row with nothing to attend: zeros and zero gradients, as torch's CPU kernel gives."""
    q, k, v = make_qkv((2,), 2, 2, 4, 6, 4, 4, torch.float32)
    mask = torch.rand(2, 2, 4, 6) > 0.2
    mask[0, 1, 2] = False
    mask[1, :, 0] = False
    if kind == "additive":
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))

    def ours(q, k, v):
        with pyseqk.use_backend(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    out, grads = run_with_grads(ours, [q, k, v])
    t_out, t_grads = run_with_grads(lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                    [q, k, v])
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert (out[0, 1, 2] == 0).all() and (out[1, :, 0] == 0).all()
    assert (grads[0][0, 1, 2] == 0).all() and (grads[0][1, :, 0] == 0).all()
    assert max_err(out, t_out) < 1e-5
    for g, t in zip(grads, t_grads):
        assert max_err(g, t) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_gradcheck(backend):
    q, k, v = [t.requires_grad_() for t in make_qkv((1,), 4, 2, 5, 6, 3, 2, torch.float64)]
    mask = torch.randn(1, 1, 5, 6, dtype=torch.float64)

    def fn(q, k, v):
        with pyseqk.use_backend(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.7, enable_gqa=True)

    assert torch.autograd.gradcheck(fn, (q, k, v))

    def causal(q, k, v):
        with pyseqk.use_backend(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    assert torch.autograd.gradcheck(causal, (q, k, v))


# ---------------------------------------------------------------------------------------------
# Dropout: a pure hash of (seed, batch*head, row, column), the same on every backend.

def _native_or_skip(backend):
    """The seed-level op of a backend (functional draws the seed itself)."""
    if backend == "reference":
        return None
    if backend == "triton":
        import pyseqk._triton_sdpa_ops  # noqa: F401
        return torch.ops.pyseqk.triton_sdpa
    return torch.ops.pyseqk.sdpa


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype,L,S,tol", [
    (torch.float64, 37, 150, 1e-12),
    # the fp32 CPU forward's own path: several query tiles and key blocks, a partial micro-tile
    (torch.float32, 140, 250, 1e-5),
], ids=str)
def test_sdpa_dropout_equals_reference_hash(backend, dtype, L, S, tol):
    op = _native_or_skip(backend)
    q, k, v = make_qkv((2,), 4, 2, L, S, 8, 6, dtype)
    mask = make_mask((L, S), "bool", None)
    q64, k64, v64 = q.double(), k.double(), v.double()
    for causal in (False, True):
        out, _ = op(q, k, v, mask.expand(2, 4, L, S), 0.3, causal, 0.4, 1234)
        ref = R.scaled_dot_product_attention(q64, k64, v64, mask, 0.3, causal, 0.4, enable_gqa=True,
                                             seed=1234)
        assert max_err(out, ref) < tol, causal
        ref_other = R.scaled_dot_product_attention(q64, k64, v64, mask, 0.3, causal, 0.4,
                                                   enable_gqa=True, seed=1235)
        assert max_err(out, ref_other) > 1e-3  # the seed matters


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_dropout_statistics(backend, p):
    """Uniform attention over ones: out * (1 - p) is the kept fraction of the row."""
    L, S = 64, 1000
    q = torch.zeros(1, 2, L, 4)
    k = torch.randn(1, 2, S, 4)
    v = torch.ones(1, 2, S, 1)
    torch.manual_seed(0)
    with pyseqk.use_backend(backend):
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
    kept = out * (1 - p)
    assert abs(kept.mean().item() - (1 - p)) < 0.01
    assert kept.std().item() < 3 * ((p * (1 - p) / S) ** 0.5)  # per row: binomial / S


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_dropout_reproducible(backend):
    q, k, v = make_qkv((2,), 2, 2, 9, 11, 4, 4, torch.float32)
    with pyseqk.use_backend(backend):
        torch.manual_seed(7)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=0.4)
        torch.manual_seed(7)
        b = F.scaled_dot_product_attention(q, k, v, dropout_p=0.4)
        c = F.scaled_dot_product_attention(q, k, v, dropout_p=0.4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_sdpa_dropout_gradcheck(backend):
    """With a fixed seed the forward is a deterministic function, and the fused backward (which
    recomputes the mask) must be its exact derivative."""
    op = _native_or_skip(backend)
    q, k, v = [t.requires_grad_() for t in make_qkv((1,), 2, 1, 5, 7, 3, 2, torch.float64)]
    for causal in (False, True):
        assert torch.autograd.gradcheck(lambda q, k, v: op(q, k, v, None, 0.35, causal, 0.6, 99)[0],
                                        (q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_dropout_grads_match_reference(backend):
    """Functional with dropout vs the reference with the seed functional drew."""
    q, k, v = make_qkv((2,), 2, 2, 20, 30, 8, 8, torch.float32)

    def ours(q, k, v):
        torch.manual_seed(3)
        with pyseqk.use_backend(backend):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.2, is_causal=True)

    torch.manual_seed(3)
    seed = int(torch.randint(0, 2 ** 32, ()).item())
    out, grads = run_with_grads(ours, [q, k, v])
    ref_out, ref_grads = run_with_grads(
        lambda q, k, v: R.scaled_dot_product_attention(q, k, v, None, 0.2, True, seed=seed),
        [q.double(), k.double(), v.double()])
    assert max_err(out, ref_out) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert max_err(g, r) < 1e-5


# ---------------------------------------------------------------------------------------------
# Registration.

def _op_args(mask=True, requires_grad=True):
    q, k, v = make_qkv((2,), 4, 2, 5, 6, 3, 2, torch.float32)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_()
    m = (torch.rand(5, 6) > 0.2).expand(2, 4, 5, 6) if mask else None
    return q, k, v, m


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("mask", [False, True])
def test_sdpa_opcheck(mask, dropout_p):
    q, k, v, m = _op_args(mask)
    torch.library.opcheck(torch.ops.pyseqk.sdpa, (q, k, v, m, dropout_p, not mask, 0.5, 5))


@pytest.mark.parametrize("mask", [False, True])
def test_sdpa_backward_opcheck(mask):
    q, k, v, m = _op_args(mask, requires_grad=False)
    out, lse = torch.ops.pyseqk.sdpa(q, k, v, m, 0.1, True, 0.5, 5)
    go = torch.randn_like(out)
    torch.library.opcheck(torch.ops.pyseqk.sdpa_backward, (go, q, k, v, out, lse, m, 0.1, True, 0.5, 5))


def test_sdpa_lse():
    q, k, v, m = _op_args(True, requires_grad=False)
    out, lse = torch.ops.pyseqk.sdpa(q, k, v, m, 0.0, False, 0.5, 0)
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.5
    expect = scores.masked_fill(~m, float("-inf")).logsumexp(-1)
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 5)
    assert max_err(lse, expect) < 1e-5


@pytest.mark.parametrize("mask", [False, True])
def test_sdpa_compile(mask):
    q, k, v = make_qkv((2,), 4, 2, 6, 9, 8, 8, torch.float32)
    m = torch.rand(6, 9) > 0.2 if mask else None

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=not mask, enable_gqa=True)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    qs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = compiled(*qs)
    out.sum().backward()
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out = fn(*ref)
    ref_out.sum().backward()
    assert max_err(out, ref_out) < 1e-6
    for a, b in zip(qs, ref):
        assert max_err(a.grad, b.grad) < 1e-6


# ---------------------------------------------------------------------------------------------
# Bad input: every backend raises, naming the argument.

def _bad_cases():
    q, k, v = make_qkv((2,), 4, 2, 5, 6, 3, 2, torch.float32)
    ok = dict(query=q, key=k, value=v)
    return [
        ("key seq != value seq", dict(ok, value=torch.randn(2, 2, 7, 2)), None, "value"),
        ("value heads != key heads", dict(ok, value=torch.randn(2, 1, 6, 2)), None, "value"),
        ("GQA without enable_gqa", ok, dict(enable_gqa=False), "enable_gqa"),
        ("GQA not a multiple", dict(ok, query=torch.randn(2, 3, 5, 3)), dict(enable_gqa=True), "multiple"),
        ("E mismatch", dict(ok, key=torch.randn(2, 2, 6, 4)), None, "key"),
        ("batch mismatch", dict(ok, key=torch.randn(3, 2, 6, 3)), None, "key"),
        ("dims mismatch", dict(ok, key=torch.randn(2, 6, 3)), None, "key"),
        ("dtype mismatch", dict(ok, key=k.double()), None, "key"),
        ("int query", dict(query=q.int(), key=k.int(), value=v.int()), None, "query"),
        ("1-D query", dict(ok, query=torch.randn(3)), None, "query"),
        ("E = 0", dict(ok, query=torch.randn(2, 4, 5, 0), key=torch.randn(2, 2, 6, 0)), None, "query"),
        ("mask not broadcastable", ok, dict(attn_mask=torch.ones(5, 5, dtype=torch.bool)), "attn_mask"),
        ("mask too many dims", ok, dict(attn_mask=torch.ones(1, 2, 4, 5, 6, dtype=torch.bool)), "attn_mask"),
        ("mask int dtype", ok, dict(attn_mask=torch.ones(5, 6, dtype=torch.int32)), "attn_mask"),
        ("mask other float dtype", ok, dict(attn_mask=torch.ones(5, 6, dtype=torch.float64)), "attn_mask"),
        ("dropout_p = 1", ok, dict(dropout_p=1.0), "dropout_p"),
        ("dropout_p < 0", ok, dict(dropout_p=-0.1), "dropout_p"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_bad_input(backend, case):
    _, tensors, kwargs, name = case
    kw = dict(enable_gqa=True)
    kw.update(kwargs or {})
    with pyseqk.use_backend(backend), pytest.raises((RuntimeError, TypeError, ValueError), match=name):
        F.scaled_dot_product_attention(tensors["query"], tensors["key"], tensors["value"], **kw)


OP_BAD = [  # the C++ entry's own checks (what the Triton/CUDA ops and direct callers get)
    ("query 3-D", lambda q, k, v, m: (q[0], k, v, m), "query"),
    ("value seq", lambda q, k, v, m: (q, k, v[:, :, :5], m), "value"),
    ("value heads", lambda q, k, v, m: (q, k, v[:, :1], m), "value"),
    ("key E", lambda q, k, v, m: (q, k[..., :2], v, m), "key"),
    ("GQA", lambda q, k, v, m: (q[:, :3], k, v, None), "multiple"),
    ("key dtype", lambda q, k, v, m: (q, k.double(), v, m), "key"),
    ("mask 2-D", lambda q, k, v, m: (q, k, v, m[0, 0]), "attn_mask"),
    ("mask shape", lambda q, k, v, m: (q, k, v, m[..., :5]), "attn_mask"),
    ("mask dtype", lambda q, k, v, m: (q, k, v, m.int()), "attn_mask"),
]


@pytest.mark.parametrize("case", OP_BAD, ids=lambda c: c[0])
def test_sdpa_op_bad_input(case):
    _, edit, name = case
    q, k, v, m = _op_args(True, requires_grad=False)
    with pytest.raises((RuntimeError, TypeError), match=name):
        torch.ops.pyseqk.sdpa(*edit(q, k, v, m), 0.0, False, 0.5, 0)
    with pytest.raises((RuntimeError, TypeError), match="dropout_p"):
        torch.ops.pyseqk.sdpa(q, k, v, m, 1.0, False, 0.5, 0)


def test_sdpa_backward_op_bad_input():
    q, k, v, m = _op_args(True, requires_grad=False)
    out, lse = torch.ops.pyseqk.sdpa(q, k, v, m, 0.0, False, 0.5, 0)
    with pytest.raises(RuntimeError, match="grad_out"):
        torch.ops.pyseqk.sdpa_backward(out[:, :, :4], q, k, v, out, lse, m, 0.0, False, 0.5, 0)
    with pytest.raises(RuntimeError, match="lse"):
        torch.ops.pyseqk.sdpa_backward(out, q, k, v, out, lse[:, :, :4], m, 0.0, False, 0.5, 0)
    with pytest.raises(TypeError, match="lse"):
        torch.ops.pyseqk.sdpa_backward(out, q, k, v, out, lse.double(), m, 0.0, False, 0.5, 0)


# ---------------------------------------------------------------------------------------------
# Memory: O(N) extra, never an L x S buffer.

MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    import pyseqk._sdpa_ops  # noqa
    torch.set_num_threads(1)
    L, E = int(sys.argv[1]), 16
    q, k, v = (torch.randn(1, 1, L, E) for _ in range(3))
    torch.ops.pyseqk.sdpa(q[:, :, :256], k[:, :, :256], v[:, :, :256], None, 0.0, True, 0.25, 0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out, lse = torch.ops.pyseqk.sdpa(q, k, v, None, 0.0, True, 0.25, 0)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024)
""")


def test_sdpa_memory_is_linear():
    """A causal forward at L = S = 16384 (an L x S float32 matrix would be 1 GiB) raises the
    process's peak RSS by about the output (1 MiB), not by anything L x S."""
    L = 16384
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(L)], capture_output=True,
                         text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    grown = int(res.stdout.strip().splitlines()[-1])
    assert grown < 32 * 2 ** 20, f"peak RSS grew by {grown / 2 ** 20:.1f} MiB"


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_strided_inputs(backend):
    """[B, L, H, E] storage viewed as [B, H, L, E] (the usual projection layout), a sliced key and
    a value with a non-unit last stride: read through their strides, same result."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 9, 4, 6, generator=g).transpose(1, 2)
    k = torch.randn(2, 11, 2, 8, generator=g).transpose(1, 2)[..., :6]
    v = torch.randn(2, 2, 5, 11, generator=g).transpose(-1, -2)
    mask = torch.randn(9, 11)
    with pyseqk.use_backend(backend):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    ref = R.scaled_dot_product_attention(q.double(), k.double(), v.double(), mask.double(),
                                         enable_gqa=True)
    assert max_err(out, ref) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_empty(backend):
    q, k, v = make_qkv((2,), 2, 2, 3, 4, 5, 6, torch.float32)
    with pyseqk.use_backend(backend):
        assert F.scaled_dot_product_attention(q[:, :, :0], k, v).shape == (2, 2, 0, 6)
        assert F.scaled_dot_product_attention(q[:0], k[:0], v[:0]).shape == (0, 2, 3, 6)
        empty_keys = F.scaled_dot_product_attention(q, k[:, :, :0], v[:, :, :0])
    assert empty_keys.shape == (2, 2, 3, 6) and (empty_keys == 0).all()  # nothing to attend


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_backward_deterministic_across_threads(causal):
    """The CPU backward picks its schedule by the thread count (per kv head with enough heads,
    split over key tiles and then query tiles otherwise); every gradient element is summed in
    the same order in both, so the results are bitwise equal."""
    q, k, v = make_qkv((1,), 4, 2, 300, 260, 16, 8, torch.float32)
    go = torch.randn(1, 4, 300, 8)
    args = (None, 0.2, causal, 0.3, 11)
    out, lse = torch.ops.pyseqk.sdpa(q, k, v, *args)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2, 4):  # B*Hk = 2: fused on 1 thread, split on 2 and 4
            torch.set_num_threads(n)
            grads.append(torch.ops.pyseqk.sdpa_backward(go, q, k, v, out, lse, *args))
    finally:
        torch.set_num_threads(threads)
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert torch.equal(a, b)
