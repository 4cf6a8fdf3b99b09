"""pyseqk.nn.RNNCell/LSTMCell/GRUCell are drop-in for torch.nn's: constructor, parameters,
initialisation, state_dict, unbatched input, hx=None, errors, outputs and gradients."""
import pytest
import torch

import pyseqk
from conftest import cpu_backends

PAIRS = [
    (torch.nn.RNNCell, pyseqk.nn.RNNCell, {"nonlinearity": "tanh"}),
    (torch.nn.RNNCell, pyseqk.nn.RNNCell, {"nonlinearity": "relu"}),
    (torch.nn.LSTMCell, pyseqk.nn.LSTMCell, {}),
    (torch.nn.GRUCell, pyseqk.nn.GRUCell, {}),
]
IDS = ["rnn_tanh", "rnn_relu", "lstm", "gru"]


def pair(tcls, pcls, kw, bias=True, dtype=torch.float32):
    torch.manual_seed(0)
    t = tcls(7, 11, bias=bias, dtype=dtype, **kw)
    torch.manual_seed(0)
    p = pcls(7, 11, bias=bias, dtype=dtype, **kw)
    return t, p


@pytest.mark.parametrize("tcls,pcls,kw", PAIRS, ids=IDS)
@pytest.mark.parametrize("bias", [True, False])
def test_same_parameters_and_init(tcls, pcls, kw, bias):
    t, p = pair(tcls, pcls, kw, bias)
    assert isinstance(p, tcls)
    assert [n for n, _ in t.named_parameters()] == [n for n, _ in p.named_parameters()]
    for (n, a), (_, b) in zip(t.state_dict().items(), p.state_dict().items()):
        assert torch.equal(a, b), n
    assert repr(t) == repr(p)
    p.load_state_dict(t.state_dict())  # and torch.nn loads pyseqk's
    t.load_state_dict(p.state_dict())


def call(m, x, h):
    return m(x, h) if h is not None or not isinstance(m, torch.nn.LSTMCell) else m(x)


@pytest.mark.parametrize("tcls,pcls,kw", PAIRS, ids=IDS)
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("with_hx", [True, False])
@pytest.mark.parametrize("backend", cpu_backends())
def test_outputs_and_grads_match_torch(tcls, pcls, kw, batched, with_hx, backend):
    t, p = pair(tcls, pcls, kw, dtype=torch.float64)
    x = torch.randn(*((3,) if batched else ()), 7, dtype=torch.float64)
    hshape = (3, 11) if batched else (11,)
    if with_hx:
        hx = torch.randn(hshape, dtype=torch.float64)
        hx = (hx, torch.randn(hshape, dtype=torch.float64)) if tcls is torch.nn.LSTMCell else hx
    else:
        hx = None
    with pyseqk.use_backend(backend):
        out_p = p(x, hx) if hx is not None else p(x)
    out_t = t(x, hx) if hx is not None else t(x)
    out_p = out_p if isinstance(out_p, tuple) else (out_p,)
    out_t = out_t if isinstance(out_t, tuple) else (out_t,)
    for a, b in zip(out_p, out_t):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)
    sum(o.sum() * (k + 1) for k, o in enumerate(out_p)).backward()
    sum(o.sum() * (k + 1) for k, o in enumerate(out_t)).backward()
    for (n, a), (_, b) in zip(p.named_parameters(), t.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=n)


@pytest.mark.parametrize("tcls,pcls,kw", PAIRS, ids=IDS)
def test_same_errors_as_torch(tcls, pcls, kw):
    t, p = pair(tcls, pcls, kw)
    lstm = tcls is torch.nn.LSTMCell
    bad = [
        (torch.randn(2, 3, 7), None),                      # 3-D input
        (torch.randn(3, 6), None),                         # wrong input_size
        (torch.randn(3, 7), torch.randn(4, 11)),           # batch mismatch
        (torch.randn(3, 7), torch.randn(3, 10)),           # wrong hidden size
        (torch.randn(3, 7), torch.randn(1, 3, 11)),        # 3-D hidden
    ]
    for x, h in bad:
        if lstm and h is not None:
            h = (h, h)
        with pytest.raises(Exception) as et:
            t(x, h) if h is not None else t(x)
        with pytest.raises(type(et.value)) as ep:
            p(x, h) if h is not None else p(x)
        # torch's message (or, for shape checks done in its C++ core, the same words)
        assert str(et.value).split(":")[0].split(" ")[0] in str(ep.value), (str(et.value), str(ep.value))


def test_unknown_nonlinearity_rejected_like_torch():
    for cls in (torch.nn.RNNCell, pyseqk.nn.RNNCell):  # torch checks it in forward, not __init__
        m = cls(3, 4, nonlinearity="gelu")
        with pytest.raises(RuntimeError, match="Unknown nonlinearity: gelu"):
            m(torch.randn(2, 3))


@pytest.mark.parametrize("tcls,pcls,kw", PAIRS, ids=IDS)
def test_module_torch_compile_fullgraph(tcls, pcls, kw):
    _, p = pair(tcls, pcls, kw)
    x = torch.randn(5, 3, 7)

    def loop(xs):
        h = None
        for t in range(xs.shape[0]):
            h = p(xs[t], h) if h is not None else p(xs[t])
        return (h[0] if isinstance(h, tuple) else h).sum()

    eager = loop(x)
    compiled = torch.compile(loop, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("tcls,pcls,kw", PAIRS, ids=IDS)
def test_module_torch_compile_fullgraph_backward(tcls, pcls, kw):
    """Forward and backward through AOTAutograd: the native cells' autograd is C++
    (csrc/ops/autograd.cpp), traced like any ATen op's."""
    _, p = pair(tcls, pcls, kw)
    x = torch.randn(4, 3, 7, requires_grad=True)

    def loop(xs):
        h = None
        for t in range(xs.shape[0]):
            h = p(xs[t], h) if h is not None else p(xs[t])
        return (h[0] if isinstance(h, tuple) else h).sum()

    def grads(f):
        x.grad = None
        p.zero_grad()
        f(x).backward()
        return [x.grad] + [q.grad for q in p.parameters()]

    eager = grads(loop)
    compiled = grads(torch.compile(loop, fullgraph=True, backend="aot_eager"))
    assert all(g is not None for g in compiled)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("tcls,pcls,kw", PAIRS, ids=IDS)
def test_parametrized_and_functional_call_weights(tcls, pcls, kw):
    """forward reads the weights the way nn.Module does: a parametrized weight
    (torch.nn.utils.parametrize) and torch.func.functional_call's substitutes are what it uses."""
    from torch.nn.utils import parametrize

    t, p = pair(tcls, pcls, kw)
    x = torch.randn(3, 7)
    h = torch.randn(3, 11)
    state = (h, torch.randn(3, 11)) if tcls is torch.nn.LSTMCell else h

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    subs = {n: q * 0.5 for n, q in t.named_parameters()}
    want = first(torch.func.functional_call(t, subs, (x, state)))
    got = first(torch.func.functional_call(p, subs, (x, state)))
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, first(p(x, state)))  # the substitutes were used

    class Half(torch.nn.Module):
        def forward(self, w):
            return w * 0.5

    for m in (t, p):
        parametrize.register_parametrization(m, "weight_hh", Half())
    torch.testing.assert_close(first(p(x, state)), first(t(x, state)))
