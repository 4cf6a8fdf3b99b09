"""The positional-encoding op (sinusoid + add + dropout in one pass) on every backend against the
float64 reference: forward and gradient, odd sizes and layouts, dropout statistics and
reproducibility, identical masks across backends, opcheck, gradcheck, torch.compile, bad input;
and the pyseqk.nn.PositionalEncoding module (tutorial parity and state_dict compatibility)."""
import math

import pytest
import torch

import pyseqk
from pyseqk import functional as F
from pyseqk import reference as R

from _util import assert_close_rule
from conftest import cpu_backends, cuda_backends

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# (shape, batch_first): [T, B, D], [B, T, D], [T, D]; odd sizes 1, 3, 97.
LAYOUTS = [((5, 3, 97), False), ((3, 7, 97), True), ((6, 1), False), ((1, 2, 3), False),
           ((9, 4, 8), True)]
P, SEED = 0.25, 1234


def tutorial_pe(T, D, dtype):
    """The PyTorch tutorial's table (float32, even D only there; here any D), cast to dtype as a
    tutorial module in that dtype holds it: PyTorch's own way of doing this op."""
    position = torch.arange(T, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, D, 2, dtype=torch.float32) * (-math.log(10000.0) / D))
    pe = torch.zeros(T, D)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term[: D // 2])
    return pe.to(dtype)


def torch_own(x, p, seed, batch_first):
    T = x.shape[1] if (x.dim() == 3 and batch_first) else x.shape[0]
    pe = tutorial_pe(T, x.shape[-1], x.dtype)
    if x.dim() == 3:
        pe = pe.unsqueeze(0) if batch_first else pe.unsqueeze(1)
    out = x + pe
    if p > 0:
        keep = R.positional_encoding_keep_mask(seed, x.numel(), p).view(x.shape)
        out = out * keep.to(x.dtype) * (1.0 / (1.0 - p))
    return out


def run_with_grad(fn, x, seed=1):
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    out.backward(g)
    return out.detach(), x.grad


@pytest.mark.parametrize("p", [0.0, P])
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", cpu_backends())
def test_matches_reference(backend, dtype, layout, p):
    shape, bf = layout
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    with pyseqk.use_backend(backend):
        out, grad = run_with_grad(lambda x: F.positional_encoding(x, p, True, bf, seed=SEED), x)
    ref, ref_grad = run_with_grad(lambda x: R.positional_encoding(x, p, SEED, bf), x.double())
    own, own_grad = run_with_grad(lambda x: torch_own(x, p, SEED, bf), x)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close_rule(out, own, ref, dtype, f"{backend} forward")
    assert_close_rule(grad, own_grad, ref_grad, dtype, f"{backend} grad")
    # The same elements are dropped as in the reference, exactly (seen in the gradient: a kept
    # output can round to 0 in low precision, a kept gradient of a random grad_output cannot).
    assert torch.equal(grad == 0, ref_grad == 0)


@pytest.mark.parametrize("backend", cpu_backends())
def test_long_sequence_accuracy(backend):
    """Large angles (t up to 4999): the kernels' range reduction keeps fp32 within the rule."""
    x = torch.zeros(5000, 1, 33)
    with pyseqk.use_backend(backend):
        out = F.positional_encoding(x)
    assert_close_rule(out, torch_own(x, 0.0, 0, False), R.positional_encoding(x.double()),
                      torch.float32, backend)


@pytest.mark.parametrize("backend", cpu_backends())
def test_dropout_statistics_and_reproducibility(backend):
    x = torch.ones(64, 8, 65)
    with pyseqk.use_backend(backend):
        torch.manual_seed(7)
        a = F.positional_encoding(x, 0.3)
        torch.manual_seed(7)
        b = F.positional_encoding(x, 0.3)
        c = F.positional_encoding(x, 0.3)
        off = F.positional_encoding(x, 0.3, training=False)
    assert torch.equal(a, b)  # torch.manual_seed reproduces the draw
    assert not torch.equal(a, c)  # and a new draw drops other elements
    dropped = (a == 0).double().mean().item()
    assert abs(dropped - 0.3) < 0.01, dropped  # N = 33k: 4 standard deviations is 0.01
    keep = a != 0
    torch.testing.assert_close(a[keep], (off / 0.7)[keep])  # kept values are scaled by 1/(1-p)
    torch.testing.assert_close(off, R.positional_encoding(x))  # eval: no dropout
    # Masks of neighbouring seeds are independent: about p^2 of the elements are in both.
    m1 = R.positional_encoding_keep_mask(1, 100000, 0.5)
    m2 = R.positional_encoding_keep_mask(2, 100000, 0.5)
    assert abs((m1 & m2).double().mean().item() - 0.25) < 0.01


@pytest.mark.parametrize("backend", cpu_backends())
def test_dropout_all_and_nothing(backend):
    x = torch.randn(4, 2, 5, requires_grad=True)
    with pyseqk.use_backend(backend):
        out = F.positional_encoding(x, 1.0, seed=3)
        out.sum().backward()
        assert torch.equal(out, torch.zeros_like(out)) and torch.equal(x.grad, torch.zeros_like(x))
        torch.testing.assert_close(F.positional_encoding(x, 0.0), R.positional_encoding(x))


def test_keep_mask_hash_matches_the_spec():
    """posenc.h's hash written out in Python integers, at indices past 2**32 too (the tensors
    there are too big to test through the kernels)."""
    def fmix(h):
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & 0xFFFFFFFF
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & 0xFFFFFFFF
        return h ^ (h >> 16)

    def keep(seed, idx, p):
        a = fmix(seed ^ (((idx >> 32) * 0x9E3779B9) & 0xFFFFFFFF))
        r = fmix(a ^ (((idx & 0xFFFFFFFF) * 0x85EBCA77) & 0xFFFFFFFF))
        return (r >> 8) >= int(p * 2 ** 24)

    mask = R.positional_encoding_keep_mask(99, 64, 0.5)
    assert [keep(99, i, 0.5) for i in range(64)] == mask.tolist()
    big = [keep(99, (1 << 32) + i, 0.5) for i in range(64)]
    assert big != mask.tolist()  # the high word of the index changes the mask


def _op_args(backend):
    x = torch.randn(5, 2, 7, dtype=torch.float64, requires_grad=True)
    if backend == "triton":
        F._op("triton", "positional_encoding", "_triton_posenc_ops")
        return torch.ops.pyseqk.triton_positional_encoding, torch.ops.pyseqk.triton_positional_encoding_backward, x
    return torch.ops.pyseqk.positional_encoding, torch.ops.pyseqk.positional_encoding_backward, x


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "reference"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_opcheck(backend, batch_first):
    fwd, bwd, x = _op_args(backend)
    for p in (0.0, 0.5):
        torch.library.opcheck(fwd, (x, p, 11, batch_first))
        torch.library.opcheck(bwd, (torch.randn(5, 2, 7, dtype=torch.float64), p, 11))


@pytest.mark.parametrize("backend", cpu_backends())
def test_gradcheck(backend):
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    with pyseqk.use_backend(backend):
        assert torch.autograd.gradcheck(lambda x: F.positional_encoding(x, 0.4, seed=9), (x,))
        assert torch.autograd.gradcheck(lambda x: F.positional_encoding(x, 0.0, batch_first=True), (x,))


@pytest.mark.parametrize("backend", cpu_backends())
def test_compile_fullgraph(backend):
    x = torch.randn(6, 2, 9, requires_grad=True)

    def f(x):
        return F.positional_encoding(x, 0.2, seed=5) * 2

    with pyseqk.use_backend(backend):
        out = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
        ref = f(x)
        torch.testing.assert_close(out, ref)
        (g,) = torch.autograd.grad(out.sum(), x)
        (g_ref,) = torch.autograd.grad(ref.sum(), x)
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("backend", cpu_backends())
def test_non_contiguous_input(backend):
    x = torch.randn(3, 5, 8).transpose(0, 1)  # [5, 3, 8], not contiguous
    with pyseqk.use_backend(backend):
        out = F.positional_encoding(x, P, seed=2)
    torch.testing.assert_close(out, R.positional_encoding(x, P, 2))


@pytest.mark.parametrize("shape", [(0, 2, 4), (3, 0, 4), (3, 2, 0), (0, 5)], ids=str)
@pytest.mark.parametrize("backend", cpu_backends())
def test_empty_input(backend, shape):
    x = torch.randn(shape, requires_grad=True)
    with pyseqk.use_backend(backend):
        out = F.positional_encoding(x, P, seed=1)
        out.sum().backward()
    assert out.shape == x.shape and x.grad.shape == x.shape


BAD = [
    (lambda: torch.zeros(3, 2, 4, dtype=torch.int64), {}, TypeError, "float32"),
    (lambda: torch.zeros(2, 3, 2, 4), {}, RuntimeError, "3-D"),
    (lambda: torch.zeros(4), {}, RuntimeError, "got shape"),
    (lambda: torch.zeros(3, 2, 4), {"dropout_p": 1.5}, ValueError, "dropout_p"),
    (lambda: torch.zeros(3, 2, 4), {"dropout_p": -0.1}, ValueError, "dropout_p"),
]


@pytest.mark.parametrize("make,kw,exc,msg", BAD)
@pytest.mark.parametrize("backend", cpu_backends())
def test_bad_input(backend, make, kw, exc, msg):
    with pyseqk.use_backend(backend), pytest.raises(exc, match=msg):
        F.positional_encoding(make(), **kw)


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "reference"])
def test_bad_input_to_the_op_itself(backend):
    fwd, bwd, _ = _op_args(backend)
    with pytest.raises(RuntimeError, match="3-D"):
        fwd(torch.zeros(2, 2, 2, 2), 0.0, 0, False)
    if backend == "cpu":
        with pytest.raises(RuntimeError, match="dropout_p"):
            fwd(torch.zeros(2, 2, 2), 2.0, 0, False)
        with pytest.raises(TypeError, match="float32"):
            bwd(torch.zeros(2, 2, dtype=torch.int32), 0.5, 0)


class TutorialPositionalEncoding(torch.nn.Module):
    """pytorch.org's word_language_model / transformer tutorial module."""

    def __init__(self, d_model, dropout=0.1, max_len=5000):
        super().__init__()
        self.dropout = torch.nn.Dropout(p=dropout)
        position = torch.arange(max_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, 1, d_model)
        pe[:, 0, 0::2] = torch.sin(position * div_term)
        pe[:, 0, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe)

    def forward(self, x):
        return self.dropout(x + self.pe[: x.size(0)])


def test_module_matches_tutorial_and_loads_its_state_dict():
    tut = TutorialPositionalEncoding(16, max_len=50).eval()
    ours = pyseqk.nn.PositionalEncoding(16, max_len=50).eval()
    assert list(ours.state_dict()) == []
    ours.load_state_dict(tut.state_dict())  # strict: the tutorial's pe buffer is accepted
    x = torch.randn(20, 3, 16)
    torch.testing.assert_close(ours(x), tut(x), atol=2e-6, rtol=0)
    bf = pyseqk.nn.PositionalEncoding(16, max_len=50, batch_first=True).eval()
    torch.testing.assert_close(bf(x.transpose(0, 1)), tut(x).transpose(0, 1), atol=2e-6, rtol=0)
    torch.testing.assert_close(ours(x[:, 0]), tut(x)[:, 0], atol=2e-6, rtol=0)  # unbatched


def test_module_dropout_and_errors():
    m = pyseqk.nn.PositionalEncoding(5, dropout=0.5, max_len=8)
    assert "d_model=5" in repr(m) and m.dropout.p == 0.5
    x = torch.ones(8, 50, 5)
    out = m(x)
    assert 0.4 < (out == 0).double().mean().item() < 0.6
    m.eval()
    torch.testing.assert_close(m(x), R.positional_encoding(x))
    with pytest.raises(ValueError, match="d_model=5"):
        m(torch.ones(3, 2, 4))
    with pytest.raises(ValueError, match="max_len=8"):
        m(torch.ones(9, 2, 5))
    with pytest.raises(ValueError, match="shape"):
        m(torch.ones(5))
    with pytest.raises(ValueError, match="positive"):
        pyseqk.nn.PositionalEncoding(0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("backend", cuda_backends())
def test_matches_reference_cuda(backend, dtype, layout):
    shape, bf = layout
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    with pyseqk.use_backend(backend):
        out, grad = run_with_grad(lambda x: F.positional_encoding(x, P, True, bf, seed=SEED), x.cuda())
    ref, ref_grad = run_with_grad(lambda x: R.positional_encoding(x, P, SEED, bf), x.double())
    own, own_grad = run_with_grad(lambda x: torch_own(x, P, SEED, bf), x)
    assert_close_rule(out.cpu(), own, ref, dtype, f"{backend} forward")
    assert_close_rule(grad.cpu(), own_grad, ref_grad, dtype, f"{backend} grad")
    assert torch.equal(grad.cpu() == 0, ref_grad == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", cuda_backends())
def test_long_sequence_accuracy_cuda(backend):
    x = torch.zeros(5000, 1, 33)
    with pyseqk.use_backend(backend):
        out = F.positional_encoding(x.cuda()).cpu()
    assert_close_rule(out, torch_own(x, 0.0, 0, False), R.positional_encoding(x.double()),
                      torch.float32, backend)


def test_aot_report_lists_the_posenc_kernels():
    """The kernels are in aot.all_kernels() for every dtype, and the script's __main__ block is
    the module's last statement, so `python -m pyseqk.kernels.aot` (run by test_build) sees
    sections appended to the list, this one included."""
    import ast
    import inspect

    from pyseqk.kernels import aot

    names = {name for name, *_ in aot.all_kernels()}
    for dt in aot.DTYPES:
        assert {f"posenc_fwd[{dt}]", f"posenc_bwd[{dt}]"} <= names
    last = ast.parse(inspect.getsource(aot)).body[-1]
    assert isinstance(last, ast.If) and "__main__" in ast.unparse(last.test)
