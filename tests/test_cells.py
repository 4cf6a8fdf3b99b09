"""The cell ops (rnn_tanh/rnn_relu/lstm/gru) on every backend against the float64 reference,
their registration (opcheck, gradcheck, torch.compile) and their bad-input errors."""
import pytest
import torch

import pyseqk
from pyseqk import functional as F
from pyseqk import reference as R

from _util import assert_close_rule
from conftest import cpu_backends, cuda_backends

CELLS = {  # name: (gates, torch's own implementation)
    "lstm_cell": (4, lambda x, h, c, *w: torch._VF.lstm_cell(x, (h, c), *w)),
    "gru_cell": (3, torch._VF.gru_cell),
    "rnn_tanh_cell": (1, torch._VF.rnn_tanh_cell),
    "rnn_relu_cell": (1, torch._VF.rnn_relu_cell),
}
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# (B, I, H). CPU gate sums: B <= 4 small_batch_gates, fp32 12 <= B <= 48 the transposed GEMM
# (odd B and H: partial transpose tiles), else ATen's GEMM.
# (27, 19, 37) and (25, 11, 289): the fused fp32 step of csrc/cpu/gemm.h (24 <= B <= 32 on AVX-512;
# partial tiles and row blocks, padded batch lanes; the second one split over two threads).
SHAPES = [(1, 1, 1), (3, 5, 97), (4, 16, 32), (7, 13, 40), (17, 9, 33), (27, 19, 37), (25, 11, 289)]


def make_args(name, B, I, H, dtype, device="cpu", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = CELLS[name][0]

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    x, h = rnd(B, I), rnd(B, H, scale=0.5)
    w_ih, w_hh = rnd(G * H, I, scale=I ** -0.5), rnd(G * H, H, scale=H ** -0.5)
    b_ih, b_hh = (rnd(G * H, scale=0.1), rnd(G * H, scale=0.1)) if bias else (None, None)
    if name == "lstm_cell":
        return [x, h, rnd(B, H, scale=0.5), w_ih, w_hh, b_ih, b_hh]
    return [x, h, w_ih, w_hh, b_ih, b_hh]


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def run_with_grads(fn, args, seed=1):
    """Outputs and the gradients of every tensor argument for a fixed random output gradient."""
    args = [a.detach().clone().requires_grad_() if a is not None else None for a in args]
    outs = as_tuple(fn(*args))
    g = torch.Generator().manual_seed(seed)
    grads_out = [torch.randn(o.shape, generator=g).to(o) for o in outs]
    torch.autograd.backward(outs, grads_out)
    return [o.detach() for o in outs], [a.grad if a is not None else None for a in args]


def check_against_reference(name, backend, B, I, H, dtype, device, bias=True):
    args = make_args(name, B, I, H, dtype, device, bias)
    with pyseqk.use_backend(backend):
        outs, grads = run_with_grads(getattr(F, name), args)
    ref_outs, ref_grads = run_with_grads(getattr(R, name), [a.double() if a is not None else None for a in args])
    t_outs, t_grads = run_with_grads(CELLS[name][1], args)
    for k, (o, t, r) in enumerate(zip(outs, t_outs, ref_outs)):
        assert o.dtype == dtype and o.shape == r.shape
        assert_close_rule(o, t, r, dtype, f"{name}[{backend}] output {k}")
    for k, (gr, t, r) in enumerate(zip(grads, t_grads, ref_grads)):
        assert_close_rule(gr, t, r, dtype, f"{name}[{backend}] grad of argument {k}")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CELLS))
@pytest.mark.parametrize("backend", cpu_backends())
def test_cell_matches_reference_cpu(backend, name, dtype, shape):
    check_against_reference(name, backend, *shape, dtype, "cpu")


@pytest.mark.parametrize("name", list(CELLS))
@pytest.mark.parametrize("backend", cpu_backends())
def test_cell_without_bias(backend, name):
    check_against_reference(name, backend, 3, 4, 9, torch.float32, "cpu", bias=False)


@pytest.mark.parametrize("name", list(CELLS))
@pytest.mark.parametrize("backend", cpu_backends())
def test_cell_empty_batch(backend, name):
    args = make_args(name, 0, 3, 5, torch.float32)
    with pyseqk.use_backend(backend):
        outs = as_tuple(getattr(F, name)(*args))
    assert all(o.shape == (0, 5) for o in outs)


@pytest.mark.parametrize("name", list(CELLS))
@pytest.mark.parametrize("backend", cpu_backends())
def test_cell_gradcheck(backend, name):
    args = [a.requires_grad_() for a in make_args(name, 2, 3, 4, torch.float64)]
    with pyseqk.use_backend(backend):
        assert torch.autograd.gradcheck(getattr(F, name), args)


@pytest.mark.parametrize("name", list(CELLS))
@pytest.mark.parametrize("prefix", ["", "triton_"])
def test_cell_opcheck(prefix, name):
    if prefix and "triton" not in cpu_backends():
        pytest.skip("triton runs CPU tensors only under TRITON_INTERPRET=1")
    if prefix:
        import pyseqk._triton_ops  # noqa: F401
    op = getattr(torch.ops.pyseqk, prefix + name)
    args = make_args(name, 3, 4, 5, torch.float32)
    for a in args:
        a.requires_grad_()
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", list(CELLS))
def test_cell_backward_opcheck(name):
    """The backward ops are real ops too: opcheck them with the forward's saved values."""
    args = make_args(name, 3, 4, 5, torch.float32)
    op = getattr(torch.ops.pyseqk, name)
    out = op(*args)
    g = torch.randn(3, 5)
    if name == "lstm_cell":
        x, h, c, w_ih, w_hh = args[:5]
        bargs = (g, g.clone(), x, h, c, out[1], w_ih, w_hh, out[2])
        torch.library.opcheck(torch.ops.pyseqk.lstm_cell_backward, bargs)
    elif name == "gru_cell":
        x, h, w_ih, w_hh = args[:4]
        torch.library.opcheck(torch.ops.pyseqk.gru_cell_backward, (g, x, h, w_ih, w_hh, out[1]))
    else:
        x, h, w_ih, w_hh = args[:4]
        torch.library.opcheck(torch.ops.pyseqk.rnn_cell_backward,
                              (g, x, h, out, w_ih, w_hh, name == "rnn_relu_cell"))


@pytest.mark.parametrize("name", list(CELLS))
def test_cell_torch_compile_fullgraph(name):
    args = make_args(name, 3, 4, 5, torch.float32)
    fn = getattr(F, name)

    def two_steps(*a):
        out = as_tuple(fn(*a))
        return out[0] * 2 + 1

    eager = two_steps(*args)
    compiled = torch.compile(two_steps, fullgraph=True, backend="eager")(*args)
    torch.testing.assert_close(compiled, eager)


# ---------------------------------------------------------------------------------------------
# Bad input: every backend raises, naming the argument; none crashes.

@pytest.mark.parametrize("backend", cpu_backends())
def test_cell_bad_input(backend):
    x, h, c, w_ih, w_hh, b_ih, b_hh = make_args("lstm_cell", 3, 4, 5, torch.float32)
    cases = [
        ((x.long(), h, c, w_ih, w_hh, b_ih, b_hh), TypeError, "input must be float32"),
        ((x, h.double(), c, w_ih, w_hh, b_ih, b_hh), TypeError, "hx has dtype torch.float64"),
        ((x[:, :3], h, c, w_ih, w_hh, b_ih, b_hh), RuntimeError, "input has inconsistent input_size"),
        ((x[:2], h, c, w_ih, w_hh, b_ih, b_hh), RuntimeError, "Input batch size 2 doesn't match hidden0"),
        ((x, h[:, :4], c, w_ih, w_hh, b_ih, b_hh), RuntimeError, "hidden0 has inconsistent hidden_size"),
        ((x, h, c[:, :4], w_ih, w_hh, b_ih, b_hh), RuntimeError, "cx must have the shape of hx"),
        ((x, h, c, w_ih[:-1], w_hh, b_ih, b_hh), RuntimeError, "w_ih must have 20 rows"),
        ((x, h, c, w_ih, w_hh, b_ih[:-1], b_hh), RuntimeError, r"b_ih must have shape \[20\]"),
        ((x[0], h, c, w_ih, w_hh, b_ih, b_hh), RuntimeError, "input must be 2-D"),
    ]
    with pyseqk.use_backend(backend):
        for args, exc, msg in cases:
            with pytest.raises(exc, match=msg):
                F.lstm_cell(*args)


# ---------------------------------------------------------------------------------------------
# GPU: compiled here, run wherever a GPU exists (PYSEQK_REQUIRE_CUDA=1 makes a skip a failure).

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CELLS))
@pytest.mark.parametrize("backend", cuda_backends())
def test_cell_matches_reference_cuda(backend, name, dtype):
    for shape in SHAPES + [(64, 256, 512)]:
        check_against_reference(name, backend, *shape, dtype, "cuda")
