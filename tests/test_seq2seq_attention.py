"""seq2seq attention (Luong dot/general, Bahdanau additive): every backend against the float64
reference, forward and gradients, masks (a fully masked row included), decoder steps (Tq = 1),
odd sizes; registration (opcheck, gradcheck, torch.compile); the modules against plain-PyTorch
versions (the Bahdanau one is the translation tutorial's); bad input."""
import pytest
import torch

import pyseqk
from pyseqk import functional as F
from pyseqk import reference as R

from _util import assert_close_rule
from conftest import cpu_backends, cuda_backends

KINDS = ("luong", "bahdanau")
# (B, Tq, Tk, D, Hv): odd sizes, decoder steps (Tq = 1), a single key (Tk = 1).
SHAPES = [(2, 5, 7, 9, 11), (3, 1, 97, 3, 5), (2, 3, 1, 4, 3), (1, 97, 3, 3, 1), (1, 1, 1, 1, 1)]


def make_args(kind, B, Tq, Tk, D, Hv, dtype, mask="some", device="cpu", seed=0):
    """[q, k, (v,) values, key_padding_mask]; mask "some" pads a random tail of each sequence and
    pads batch 1 entirely (a fully masked row) when B > 1; "none" gives None."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q, k, values = rnd(B, Tq, D), rnd(B, Tk, D), rnd(B, Tk, Hv)
    m = None
    if mask == "some":
        lengths = torch.randint(1, Tk + 1, (B,), generator=g)
        m = torch.arange(Tk).unsqueeze(0) >= lengths.unsqueeze(1)
        if B > 1:
            m[1] = True
        m = m.to(device)
    if kind == "luong":
        return [q, k, values, m]
    return [q, k, rnd(D), values, m]


def fn_of(kind):
    return {"luong": F.luong_attention, "bahdanau": F.bahdanau_attention}[kind]


def ref_of(kind):
    return {"luong": R.luong_attention, "bahdanau": R.bahdanau_attention}[kind]


def run_with_grads(fn, args, grads_out=None, seed=1):
    """Outputs and the gradients of every floating argument for fixed output gradients."""
    args = [a.detach().clone().requires_grad_() if a is not None and a.is_floating_point() else a
            for a in args]
    outs = fn(*args)
    if grads_out is None:
        g = torch.Generator().manual_seed(seed)
        grads_out = [torch.randn(o.shape, generator=g) for o in outs]
    torch.autograd.backward(outs, [go.to(o) for go, o in zip(grads_out, outs)])
    grads = [a.grad if a is not None and a.is_floating_point() else None for a in args]
    return [o.detach() for o in outs], grads


def check_against_reference(kind, backend, shape, dtype, mask="some", device="cpu", backward=True):
    args = make_args(kind, *shape, dtype, mask, device)
    up = [a.double() if a is not None and a.is_floating_point() else a for a in args]
    if not backward:
        with pyseqk.use_backend(backend):
            outs = fn_of(kind)(*args)
        for k, (o, t, r) in enumerate(zip(outs, ref_of(kind)(*args), ref_of(kind)(*up))):
            assert o.dtype == dtype and o.shape == r.shape
            assert_close_rule(o, t, r, dtype, f"{kind}[{backend}] output {k}")
        return
    with pyseqk.use_backend(backend):
        outs, grads = run_with_grads(fn_of(kind), args)
    ref_outs, ref_grads = run_with_grads(ref_of(kind), up)
    t_outs, t_grads = run_with_grads(ref_of(kind), args)  # plain PyTorch in the same dtype
    for k, (o, t, r) in enumerate(zip(outs, t_outs, ref_outs)):
        assert o.dtype == dtype and o.shape == r.shape
        assert_close_rule(o, t, r, dtype, f"{kind}[{backend}] output {k}")
    for k, (gr, t, r) in enumerate(zip(grads, t_grads, ref_grads)):
        assert_close_rule(gr, t, r, dtype, f"{kind}[{backend}] grad of argument {k}")


@pytest.mark.parametrize("mask", ["some", "none"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", cpu_backends())
def test_matches_reference_cpu(backend, kind, dtype, shape, mask):
    check_against_reference(kind, backend, shape, dtype, mask)


@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", cpu_backends())
def test_half_forward_cpu(backend, kind, dtype, shape):
    check_against_reference(kind, backend, shape, dtype, "some", backward=False)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", cpu_backends())
def test_fully_masked_rows_are_zero(backend, kind):
    """Batch 1 has every key masked: zero weights, zero context, zero (finite) gradients; the
    other batches are unaffected by it."""
    args = make_args(kind, 3, 4, 6, 5, 7, torch.float32, "some")
    with pyseqk.use_backend(backend):
        (context, weights), grads = run_with_grads(fn_of(kind), args)
    assert torch.equal(weights[1], torch.zeros_like(weights[1]))
    assert torch.equal(context[1], torch.zeros_like(context[1]))
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
    assert torch.equal(grads[0][1], torch.zeros_like(grads[0][1]))  # query / wq of batch 1
    assert torch.equal(grads[1][1], torch.zeros_like(grads[1][1]))  # keys / uk of batch 1
    m = args[-1]
    assert torch.equal(weights.masked_fill(~m.unsqueeze(1), 0), torch.zeros_like(weights))
    sums = weights.sum(-1)
    torch.testing.assert_close(sums[[0, 2]], torch.ones_like(sums[[0, 2]]))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", cpu_backends())
def test_empty_sizes(backend, kind):
    for shape in [(0, 3, 4, 5, 6), (2, 0, 4, 5, 6), (2, 3, 0, 5, 6), (2, 3, 4, 5, 0)]:
        args = make_args(kind, *shape, torch.float32, mask="none")
        with pyseqk.use_backend(backend):
            context, weights = fn_of(kind)(*args)
        B, Tq, Tk, _, Hv = shape
        assert context.shape == (B, Tq, Hv) and weights.shape == (B, Tq, Tk)
        if Tk == 0:  # no key at all: like a fully masked row
            assert torch.equal(context, torch.zeros_like(context))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", cpu_backends())
def test_gradcheck(backend, kind):
    args = make_args(kind, 3, 2, 5, 4, 3, torch.float64, "some")
    for a in args[:-1]:
        a.requires_grad_()
    with pyseqk.use_backend(backend):
        # fast_mode under the Triton interpreter: a few random directions instead of one forward
        # per input element (each is dozens of interpreted programs)
        assert torch.autograd.gradcheck(fn_of(kind), args, fast_mode=backend == "triton")


def _ops_prefix(prefix):
    if prefix and "triton" not in cpu_backends():
        pytest.skip("triton runs CPU tensors only under TRITON_INTERPRET=1")
    if prefix:
        import pyseqk._triton_seq2seq_ops  # noqa: F401


@pytest.mark.parametrize("mask", ["some", "none"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prefix", ["", "triton_"])
def test_opcheck(prefix, kind, mask):
    _ops_prefix(prefix)
    args = make_args(kind, 3, 2, 5, 4, 3, torch.float32, mask)
    for a in args[:-1]:
        a.requires_grad_()
    torch.library.opcheck(getattr(torch.ops.pyseqk, f"{prefix}{kind}_attention"), args)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prefix", ["", "triton_"])
def test_backward_opcheck(prefix, kind):
    _ops_prefix(prefix)
    args = make_args(kind, 3, 2, 5, 4, 3, torch.float32, "some")
    context, weights = getattr(torch.ops.pyseqk, f"{prefix}{kind}_attention")(*args)
    op = getattr(torch.ops.pyseqk, f"{prefix}{kind}_attention_backward")
    gc, gw = torch.randn_like(context), torch.randn_like(weights)
    for g in [(gc, gw), (gc, None), (None, gw)]:
        torch.library.opcheck(op, (*g, *args[:-1], weights))


@pytest.mark.parametrize("kind", KINDS)
def test_torch_compile_fullgraph(kind):
    args = make_args(kind, 3, 2, 5, 4, 3, torch.float32, "some")
    fn = fn_of(kind)

    def step(*a):
        context, weights = fn(*a)
        return context * 2 + weights.sum(-1, keepdim=True)

    eager = step(*args)
    compiled = torch.compile(step, fullgraph=True, backend="eager")(*args)
    torch.testing.assert_close(compiled, eager)
    # and through autograd, as in training
    leaf = [a.detach().clone().requires_grad_() if a is not None and a.is_floating_point() else a
            for a in args]
    torch.compile(step, fullgraph=True, backend="aot_eager")(*leaf).sum().backward()
    _, grads = run_with_grads(step, args, grads_out=[torch.ones(eager.shape)])
    torch.testing.assert_close(leaf[0].grad, grads[0])


# ---------------------------------------------------------------------------------------------
# Modules

class TutorialBahdanauAttention(torch.nn.Module):
    """PyTorch's seq2seq translation tutorial's BahdanauAttention, verbatim."""

    def __init__(self, hidden_size):
        super().__init__()
        self.Wa = torch.nn.Linear(hidden_size, hidden_size)
        self.Ua = torch.nn.Linear(hidden_size, hidden_size)
        self.Va = torch.nn.Linear(hidden_size, 1)

    def forward(self, query, keys):
        scores = self.Va(torch.tanh(self.Wa(query) + self.Ua(keys)))
        scores = scores.squeeze(2).unsqueeze(1)
        weights = torch.nn.functional.softmax(scores, dim=-1)
        context = torch.bmm(weights, keys)
        return context, weights


def _module_grads(module, inputs, g):
    module.zero_grad(set_to_none=True)
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    outs = module(*inputs)
    torch.autograd.backward(outs, [gg.to(o) for gg, o in zip(g, outs)])
    grads = {n: p.grad for n, p in module.named_parameters()}
    return [o.detach() for o in outs], [x.grad for x in inputs], grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", cpu_backends())
def test_bahdanau_module_is_the_tutorials(backend, dtype):
    """Same parameters and state_dict as the tutorial's module; its decoder-step call (query
    [B, 1, H]) gives the same outputs and gradients, Va.bias aside (it cancels)."""
    torch.manual_seed(0)
    H, B, Tk = 9, 3, 7
    ours = pyseqk.nn.BahdanauAttention(H).to(dtype)
    theirs = TutorialBahdanauAttention(H).to(dtype)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    oracle = TutorialBahdanauAttention(H).double()
    oracle.load_state_dict(theirs.state_dict())
    query, keys = torch.randn(B, 1, H, dtype=dtype), torch.randn(B, Tk, H, dtype=dtype)
    g = [torch.randn(B, 1, H, dtype=torch.float64), torch.randn(B, 1, Tk, dtype=torch.float64)]
    with pyseqk.use_backend(backend):
        o, gi, gp = _module_grads(ours, [query, keys], g)
    t_o, t_gi, t_gp = _module_grads(theirs, [query, keys], g)
    r_o, r_gi, r_gp = _module_grads(oracle, [query.double(), keys.double()], g)
    for k in range(2):
        assert_close_rule(o[k], t_o[k], r_o[k], dtype, f"output {k}")
        assert_close_rule(gi[k], t_gi[k], r_gi[k], dtype, f"input grad {k}")
    for name in ("Wa.weight", "Wa.bias", "Ua.weight", "Ua.bias", "Va.weight"):
        assert_close_rule(gp[name], t_gp[name], r_gp[name], dtype, f"grad of {name}")
    assert gp["Va.bias"] is None and r_gp["Va.bias"].abs().max() < 1e-12


@pytest.mark.parametrize("backend", cpu_backends())
def test_bahdanau_module_sequence_and_mask(backend):
    torch.manual_seed(1)
    H, B, Tq, Tk = 6, 3, 4, 5
    m = pyseqk.nn.BahdanauAttention(H).double()
    query, keys = torch.randn(B, Tq, H, dtype=torch.float64), torch.randn(B, Tk, H, dtype=torch.float64)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [True] * 5])
    with pyseqk.use_backend(backend):
        context, weights = m(query, keys, key_padding_mask=mask)
    wq, uk = m.Wa(query), m.Ua(keys)
    rc, rw = R.bahdanau_attention(wq, uk, m.Va.weight.reshape(-1), keys, mask)
    torch.testing.assert_close(context, rc)
    torch.testing.assert_close(weights, rw)
    with pyseqk.use_backend(backend):
        assert torch.autograd.gradcheck(lambda q, k: m(q, k, mask),
                                        [query.requires_grad_(), keys.requires_grad_()],
                                        fast_mode=backend == "triton")


def test_bahdanau_module_projected_keys():
    """Keys projected once (project_keys) give the same outputs and gradients as projecting them
    at every call."""
    torch.manual_seed(3)
    m = pyseqk.nn.BahdanauAttention(5).double()
    keys = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
    queries = [torch.randn(2, 1, 5, dtype=torch.float64) for _ in range(3)]
    uk = m.project_keys(keys)
    cached = sum(m(q, keys, projected_keys=uk)[0].sum() for q in queries)
    g_cached = torch.autograd.grad(cached, [keys, m.Ua.weight])
    plain = sum(m(q, keys)[0].sum() for q in queries)
    g_plain = torch.autograd.grad(plain, [keys, m.Ua.weight])
    torch.testing.assert_close(cached, plain)
    for a, b in zip(g_cached, g_plain):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("score", ["dot", "general"])
@pytest.mark.parametrize("backend", cpu_backends())
def test_luong_module(backend, score):
    torch.manual_seed(2)
    H, B, Tq, Tk, Hv = 7, 2, 3, 5, 4
    m = pyseqk.nn.LuongAttention(H, score=score).double()
    assert (m.weight is None) == (score == "dot")
    assert [n for n, _ in m.named_parameters()] == ([] if score == "dot" else ["weight"])
    q, k = torch.randn(B, Tq, H, dtype=torch.float64), torch.randn(B, Tk, H, dtype=torch.float64)
    v = torch.randn(B, Tk, Hv, dtype=torch.float64)
    mask = torch.tensor([[False] * 4 + [True], [False] * 5])
    for values in (None, v):
        qq = q if score == "dot" else q @ m.weight
        scores = (qq @ k.transpose(1, 2)).masked_fill(mask.unsqueeze(1), float("-inf"))
        rw = scores.softmax(-1)
        rc = rw @ (k if values is None else values)
        with pyseqk.use_backend(backend):
            context, weights = m(q, k, values, key_padding_mask=mask)
        torch.testing.assert_close(context, rc)
        torch.testing.assert_close(weights, rw)
    if score == "general":
        with pyseqk.use_backend(backend):
            assert torch.autograd.gradcheck(lambda w, q: F.luong_attention(q, k, v, mask, w),
                                            [m.weight.detach().clone().requires_grad_(),
                                             q.clone().requires_grad_()],
                                            fast_mode=backend == "triton")


def test_luong_module_bad_score():
    with pytest.raises(ValueError, match="score must be 'dot' or 'general'"):
        pyseqk.nn.LuongAttention(4, score="concat")


def test_convert_leaves_attention_modules_alone():
    model = torch.nn.Sequential(pyseqk.nn.BahdanauAttention(4), pyseqk.nn.LuongAttention(4))
    pyseqk.convert(model)
    assert type(model[0]) is pyseqk.nn.BahdanauAttention and type(model[1]) is pyseqk.nn.LuongAttention


# ---------------------------------------------------------------------------------------------
# Bad input: every backend raises, naming the argument; none crashes.

@pytest.mark.parametrize("backend", cpu_backends())
def test_bad_input(backend):
    q, k, v, values, m = make_args("bahdanau", 3, 2, 5, 4, 6, torch.float32)
    luong = [
        ((q.long(), k, values, m), TypeError, "query must be float32"),
        ((q, k.double(), values, m), TypeError, "keys has dtype torch.float64"),
        ((q[0], k, values, m), RuntimeError, r"query must be 3-D \[batch, query_len, features\]"),
        ((q, k[:, :, :3], values, m), RuntimeError, r"keys must have shape \[3, key_len, 4\]"),
        ((q, k[:2], values, m), RuntimeError, r"keys must have shape \[3, key_len, 4\]"),
        ((q, k, values[:, :4], m), RuntimeError, r"values must have shape \[3, 5, value_size\]"),
        ((q, k, values, m.float()), TypeError, "key_padding_mask must be a bool tensor"),
        ((q, k, values, m[:, :4]), RuntimeError, r"key_padding_mask must have shape \[3, 5\]"),
    ]
    bahdanau = [
        ((q, k, v[:3], values, m), RuntimeError, r"v must have shape \[4\]"),
        ((q, k, v.double(), values, m), TypeError, "v has dtype torch.float64"),
        ((q, k.double(), v, values, m), TypeError, "uk has dtype torch.float64"),
        ((q.int(), k, v, values, m), TypeError, "wq must be float32"),
    ]
    with pyseqk.use_backend(backend):
        for args, exc, msg in luong:
            with pytest.raises(exc, match=msg):
                F.luong_attention(*args)
        for args, exc, msg in bahdanau:
            with pytest.raises(exc, match=msg):
                F.bahdanau_attention(*args)
        with pytest.raises(RuntimeError, match=r"weight must have shape \[4, 4\]"):
            F.luong_attention(q, k, values, m, torch.randn(4, 3))


# ---------------------------------------------------------------------------------------------
# GPU: run wherever a GPU exists (PYSEQK_REQUIRE_CUDA=1 makes a skip a failure).

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", cuda_backends())
def test_matches_reference_cuda(backend, kind, dtype):
    for shape in SHAPES + [(16, 64, 256, 256, 256), (16, 1, 300, 128, 128)]:
        for mask in ("some", "none"):
            check_against_reference(kind, backend, shape, dtype, mask, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", cuda_backends())
def test_half_forward_cuda(backend, kind, dtype):
    for shape in SHAPES + [(16, 64, 256, 256, 256)]:
        check_against_reference(kind, backend, shape, dtype, "some", "cuda", backward=False)
