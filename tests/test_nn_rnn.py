"""pyseqk.nn.RNN/LSTM/GRU are drop-in for torch.nn's: constructor, parameters, initialisation,
state_dict, repr; outputs and gradients (input, hx, every parameter) equal to torch.nn's on the
same weights across modes, layers, directions, batch_first, bias, proj_size, unbatched input,
hx given or not and PackedSequence (sorted and unsorted); dropout; the same errors for bad
input; torch.compile(fullgraph=True)."""
import itertools
import re

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import pyseqk
from _util import assert_close_rule
from conftest import cpu_backends, cuda_backends

# mode -> (torch.nn class, pyseqk class, constructor kwargs)
MODES = {
    "lstm": (torch.nn.LSTM, pyseqk.nn.LSTM, {}),
    "lstm_proj": (torch.nn.LSTM, pyseqk.nn.LSTM, {"proj_size": 3}),
    "gru": (torch.nn.GRU, pyseqk.nn.GRU, {}),
    "rnn_tanh": (torch.nn.RNN, pyseqk.nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (torch.nn.RNN, pyseqk.nn.RNN, {"nonlinearity": "relu"}),
}
I, H, T, B = 4, 5, 6, 4
LENGTHS_SORTED = [6, 4, 2, 1]    # a full-length and a length-1 sequence
LENGTHS_UNSORTED = [2, 6, 1, 4]


def make_pair(mode, dtype=torch.float64, device="cpu", **kw):
    tcls, pcls, extra = MODES[mode]
    kw = {**extra, **kw}
    torch.manual_seed(0)
    t = tcls(I, H, dtype=dtype, **kw).to(device)
    torch.manual_seed(0)
    p = pcls(I, H, dtype=dtype, **kw).to(device)
    return t, p


def is_lstm(m):
    return isinstance(m, torch.nn.LSTM)


def make_inputs(m, kind, with_hx, dtype, seed=1, device="cpu"):
    """(input, hx) for module m: kind is batched, unbatched, packed_sorted or packed_unsorted.
    Leaf tensors that need gradients are returned in a list as well."""
    g = torch.Generator().manual_seed(seed)
    bf = m.batch_first
    D = 2 if m.bidirectional else 1
    hout = m.proj_size if getattr(m, "proj_size", 0) > 0 else m.hidden_size
    leaves = []

    def leaf(*shape):
        x = torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_()
        leaves.append(x)
        return x

    if kind == "unbatched":
        x = leaf(T, I)
        inp = x
    else:
        x = leaf(*((B, T, I) if bf else (T, B, I)))
        inp = x
        if kind.startswith("packed"):
            lengths = LENGTHS_SORTED if kind == "packed_sorted" else LENGTHS_UNSORTED
            inp = pack_padded_sequence(x, torch.tensor(lengths), batch_first=bf,
                                       enforce_sorted=kind == "packed_sorted")
    hx = None
    if with_hx:
        batch = () if kind == "unbatched" else (B,)
        h0 = leaf(m.num_layers * D, *batch, hout)
        hx = (h0, leaf(m.num_layers * D, *batch, m.hidden_size)) if is_lstm(m) else h0
    return inp, hx, leaves


def run(m, inp, hx):
    return m(inp, hx) if hx is not None else m(inp)


def flat_outputs(res):
    out, hidden = res
    out = out.data if isinstance(out, PackedSequence) else out
    return [out, *(hidden if isinstance(hidden, tuple) else (hidden,))]


def loss_of(outs, seed=2):
    """A weighted sum, so that every element's gradient differs (a plain sum hides errors)."""
    g = torch.Generator().manual_seed(seed)
    return sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype).to(o.device)).sum()
               for o in outs)


def forward_backward(m, inp, hx, leaves):
    res = run(m, inp, hx)
    outs = flat_outputs(res)
    grads = torch.autograd.grad(loss_of(outs), leaves + list(m.parameters()), allow_unused=True,
                               retain_graph=True)
    return res, [o.detach() for o in outs], grads


def compare(mode, kind, with_hx, dtype=torch.float64, backend=None, device="cpu", **kw):
    t, p = make_pair(mode, dtype, device, **kw)
    inp, hx, leaves = make_inputs(t, kind, with_hx, dtype, device=device)
    res_t, outs_t, grads_t = forward_backward(t, inp, hx, leaves)
    if backend is None:
        res_p, outs_p, grads_p = forward_backward(p, inp, hx, leaves)
    else:
        with pyseqk.use_backend(backend):
            res_p, outs_p, grads_p = forward_backward(p, inp, hx, leaves)
    # the same layout: PackedSequence bookkeeping, shapes, strides of batch_first output
    if isinstance(res_t[0], PackedSequence):
        assert isinstance(res_p[0], PackedSequence)
        assert torch.equal(res_p[0].batch_sizes, res_t[0].batch_sizes)
        for a, b in ((res_p[0].sorted_indices, res_t[0].sorted_indices),
                     (res_p[0].unsorted_indices, res_t[0].unsorted_indices)):
            assert (a is None and b is None) or torch.equal(a, b)
    names = ["output", "h_n", "c_n"] + [f"grad leaf {i}" for i in range(len(leaves))] + \
        [f"grad {n}" for n, _ in t.named_parameters()]
    if dtype == torch.float64:
        for name, a, b in zip(names, outs_p + list(grads_p), outs_t + list(grads_t)):
            assert (a is None) == (b is None), name
            if a is not None:
                assert a.shape == b.shape, name
                torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9, msg=name)
        return
    # lower precision: the project's rule against torch.nn in float64 on the same weights
    t64, _ = make_pair(mode, torch.float64, device, **kw)
    t64.load_state_dict(t.state_dict())
    inp64, hx64, leaves64 = make_inputs(t64, kind, with_hx, torch.float64, device=device)
    _, outs_o, grads_o = forward_backward(t64, inp64, hx64, leaves64)
    for name, a, b, o in zip(names, outs_p + list(grads_p), outs_t + list(grads_t),
                             outs_o + list(grads_o)):
        assert_close_rule(a, b, o, dtype, name)


# ---------------------------------------------------------------------------------------------
# Construction: everything but forward is torch.nn's.

CONSTRUCT = [
    ("lstm", {}), ("lstm", {"num_layers": 2, "bidirectional": True, "bias": False}),
    ("lstm_proj", {"num_layers": 2, "bidirectional": True}), ("gru", {"num_layers": 3}),
    ("gru", {"bidirectional": True, "batch_first": True, "dropout": 0.25, "num_layers": 2}),
    ("rnn_tanh", {"bias": False}), ("rnn_relu", {"num_layers": 2, "bidirectional": True}),
]


@pytest.mark.parametrize("mode,kw", CONSTRUCT)
def test_same_parameters_init_state_dict_repr(mode, kw):
    t, p = make_pair(mode, torch.float32, **kw)
    assert isinstance(p, type(t)) and type(p).__name__ == type(t).__name__
    assert [n for n, _ in t.named_parameters()] == [n for n, _ in p.named_parameters()]
    assert list(t.state_dict()) == list(p.state_dict())
    for (n, a), b in zip(t.state_dict().items(), p.state_dict().values()):
        assert torch.equal(a, b), n  # same seed, same initialisation
    assert repr(t) == repr(p)
    assert [[w.shape for w in ws] for ws in t.all_weights] == \
        [[w.shape for w in ws] for ws in p.all_weights]
    p.flatten_parameters()
    p.load_state_dict(t.state_dict())  # and torch.nn loads pyseqk's
    t.load_state_dict(p.state_dict())


@pytest.mark.parametrize("tcls,pcls", [(torch.nn.RNN, pyseqk.nn.RNN), (torch.nn.GRU, pyseqk.nn.GRU),
                                       (torch.nn.LSTM, pyseqk.nn.LSTM)])
def test_same_constructor_errors(tcls, pcls):
    bad = [dict(input_size=0), dict(hidden_size=-1), dict(num_layers=0), dict(dropout=1.5),
           dict(bias="yes"), dict(proj_size=5)]
    if tcls is torch.nn.RNN:
        bad.append(dict(nonlinearity="gelu"))
    for kw in bad:
        args = {"input_size": 3, "hidden_size": 5, **kw}
        with pytest.raises(Exception) as et:
            tcls(**args)
        with pytest.raises(type(et.value), match=re.escape(str(et.value))):
            pcls(**args)


# ---------------------------------------------------------------------------------------------
# Outputs and gradients against torch.nn, float64 (tight) over the whole grid: every mode x
# layers x directions x input kind x hx; batch_first and bias alternate so both values meet every
# other combination.

GRID = []
for n, (mode, layers, bidir, kind, with_hx) in enumerate(itertools.product(
        MODES, (1, 2), (False, True),
        ("batched", "unbatched", "packed_sorted", "packed_unsorted"), (False, True))):
    batch_first, bias = n % 2 == 0, (n // 2) % 2 == 0
    GRID.append(pytest.param(
        mode, kind, with_hx,
        dict(num_layers=layers, bidirectional=bidir, batch_first=batch_first, bias=bias),
        id=f"{mode}-L{layers}-{'bi' if bidir else 'uni'}-{kind}-{'hx' if with_hx else 'nohx'}-"
           f"{'bf' if batch_first else 'tm'}-{'bias' if bias else 'nobias'}"))


@pytest.mark.parametrize("mode,kind,with_hx,kw", GRID)
def test_matches_torch_float64(mode, kind, with_hx, kw):
    compare(mode, kind, with_hx, torch.float64, **kw)


FP32 = [
    ("lstm", "batched", True, dict(num_layers=2, bidirectional=True, batch_first=True)),
    ("lstm_proj", "packed_unsorted", True, dict(num_layers=2, bidirectional=True)),
    ("lstm_proj", "unbatched", False, dict(bias=False)),
    ("gru", "packed_sorted", False, dict(num_layers=2, batch_first=True)),
    ("gru", "batched", True, dict(bidirectional=True)),
    ("rnn_tanh", "packed_unsorted", True, dict(num_layers=2, bidirectional=True, bias=False)),
    ("rnn_relu", "batched", False, dict(num_layers=2, batch_first=True)),
]


@pytest.mark.parametrize("mode,kind,with_hx,kw", FP32)
def test_matches_torch_float32(mode, kind, with_hx, kw):
    compare(mode, kind, with_hx, torch.float32, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode,kind,with_hx,kw", [
    ("lstm_proj", "packed_unsorted", True, dict(num_layers=2, bidirectional=True)),
    ("gru", "batched", True, dict(batch_first=True)),
    ("rnn_relu", "unbatched", False, {}),
])
def test_matches_torch_low_precision(mode, kind, with_hx, kw, dtype):
    compare(mode, kind, with_hx, dtype, **kw)


@pytest.mark.parametrize("mode,fn", [("lstm_proj", "lstm_layer"), ("gru", "gru_layer"),
                                     ("rnn_relu", "rnn_layer")])
@pytest.mark.parametrize("kind", ["batched", "packed_unsorted"])
def test_one_layer_op_call_per_layer_and_direction(monkeypatch, mode, fn, kind):
    """The time loop is inside the layer op: the module calls it once per layer and direction
    with the whole time-major sequence, lengths as an int64 tensor for packed input."""
    calls = []
    original = getattr(pyseqk.functional, fn)

    def spy(input, *args, **kwargs):
        calls.append((input.shape, input.is_contiguous(), args[-2], args[-1]))
        return original(input, *args, **kwargs)

    monkeypatch.setattr(pyseqk.functional, fn, spy)
    t, p = make_pair(mode, torch.float64, num_layers=2, bidirectional=True, batch_first=True)
    inp, hx, _ = make_inputs(t, kind, True, torch.float64)
    run(p, inp, hx)
    hout = 2 * (p.proj_size or H)
    assert [(c[0], c[3]) for c in calls] == [((T, B, I), False), ((T, B, I), True),
                                             ((T, B, hout), False), ((T, B, hout), True)]
    assert all(c[1] for c in calls)
    for c in calls:
        lengths = c[2]
        if kind == "batched":
            assert lengths is None
        else:
            assert lengths.dtype == torch.int64
            assert sorted(lengths.tolist(), reverse=True) == lengths.tolist()  # sorted order
            assert sorted(lengths.tolist()) == sorted(LENGTHS_UNSORTED)


# Every backend that runs here, on representative configurations (fp32: the accuracy rule;
# fp64: tight). They run pyseqk.functional's layer ops, whichever implementation is behind them.
BACKEND_CASES = [
    ("lstm_proj", "packed_unsorted", True, dict(num_layers=2, bidirectional=True)),
    ("lstm", "unbatched", False, dict(batch_first=True)),
    ("gru", "batched", True, dict(num_layers=2, bidirectional=True, batch_first=True)),
    ("rnn_tanh", "packed_sorted", False, dict(bidirectional=True)),
    ("rnn_relu", "batched", True, dict(num_layers=2, bias=False)),
]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mode,kind,with_hx,kw", BACKEND_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_every_backend(backend, mode, kind, with_hx, kw, dtype):
    compare(mode, kind, with_hx, dtype, backend=backend, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", cuda_backends())
@pytest.mark.parametrize("mode,kind,with_hx,kw", BACKEND_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_cuda(backend, mode, kind, with_hx, kw, dtype):
    compare(mode, kind, with_hx, dtype, backend=backend, device="cuda", **kw)


def test_output_layout_like_torch():
    """batch_first output is a transposed view, like torch.nn's (no extra copy), unbatched
    results drop the batch dimension."""
    for kw in (dict(batch_first=True), dict(batch_first=False)):
        t, p = make_pair("gru", torch.float32, num_layers=2, bidirectional=True, **kw)
        x = torch.randn(B, T, I) if kw["batch_first"] else torch.randn(T, B, I)
        (ot, ht), (op, hp) = t(x), p(x)
        assert op.shape == ot.shape and hp.shape == ht.shape
        assert op.is_contiguous() == ot.is_contiguous()
    t, p = make_pair("lstm_proj", torch.float32, num_layers=2)
    ot, (ht, ct) = t(torch.randn(T, I))
    op, (hp, cp) = p(torch.randn(T, I))
    assert (op.shape, hp.shape, cp.shape) == (ot.shape, ht.shape, ct.shape)


def test_weights_replaced_or_functional_call():
    """The current parameters are used: after assigning a new Parameter, and under
    torch.func.functional_call (gradients reach the substituted tensors)."""
    t, p = make_pair("lstm", torch.float64, num_layers=2)
    new = torch.nn.Parameter(torch.randn_like(p.weight_hh_l1))
    p.weight_hh_l1 = new
    t.weight_hh_l1 = torch.nn.Parameter(new.detach().clone())
    x = torch.randn(T, B, I, dtype=torch.float64)
    torch.testing.assert_close(p(x)[0], t(x)[0])
    params = {n: torch.randn_like(w).requires_grad_() for n, w in p.named_parameters()}
    out_p = torch.func.functional_call(p, params, (x,))[0]
    out_t = torch.func.functional_call(t, params, (x,))[0]
    torch.testing.assert_close(out_p, out_t)
    gp = torch.autograd.grad(out_p.sum(), list(params.values()))
    gt = torch.autograd.grad(out_t.sum(), list(params.values()))
    for a, b in zip(gp, gt):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# Dropout between layers.

@pytest.mark.parametrize("mode", ["lstm_proj", "gru", "rnn_tanh"])
def test_dropout_eval_is_identity_like_torch(mode):
    t, p = make_pair(mode, torch.float64, num_layers=3, dropout=0.5, bidirectional=True)
    t.eval(), p.eval()
    for kind in ("batched", "packed_unsorted"):
        inp, hx, leaves = make_inputs(t, kind, True, torch.float64)
        for a, b in zip(flat_outputs(run(p, inp, hx)), flat_outputs(run(t, inp, hx))):
            torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("mode,kw", [("lstm_proj", dict(bidirectional=True, batch_first=True)),
                                     ("gru", {}), ("rnn_relu", dict(bidirectional=True))])
def test_dropout_train_same_rng_draws_as_torch(mode, kw):
    """Padded input: torch.nn calls at::dropout on each time-major layer output but the last;
    pyseqk calls F.dropout (the same op) on the same shapes, so under one seed the masks, the
    outputs and the gradients are the same."""
    t, p = make_pair(mode, torch.float64, num_layers=3, dropout=0.4, **kw)
    inp, hx, leaves = make_inputs(t, "batched", True, torch.float64)
    torch.manual_seed(7)
    _, outs_t, grads_t = forward_backward(t, inp, hx, leaves)
    torch.manual_seed(7)
    _, outs_p, grads_p = forward_backward(p, inp, hx, leaves)
    torch.manual_seed(8)
    other = flat_outputs(run(p, inp, hx))[0]
    assert not torch.allclose(other, outs_p[0])  # dropout is really on
    for a, b in zip(outs_p + list(grads_p), outs_t + list(grads_t)):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)


def test_dropout_train_packed_statistics():
    """PackedSequence: torch.nn drops elements of the packed data, pyseqk of the padded
    time-major tensor (the same distribution per valid element, different RNG draws). Compare
    the mean output over many draws, elementwise, within 5 standard errors, and check that
    dropout=1 gives torch's output exactly (the second layer sees zeros)."""
    t, p = make_pair("gru", torch.float64, num_layers=2, dropout=0.5)
    inp, hx, _ = make_inputs(t, "packed_unsorted", True, torch.float64)
    with torch.no_grad():
        draws_t = torch.stack([run(t, inp, hx)[0].data for _ in range(300)])
        draws_p = torch.stack([run(p, inp, hx)[0].data for _ in range(300)])
        assert draws_p.shape == draws_t.shape
        se = (draws_t.var(0) / 300 + draws_p.var(0) / 300).sqrt()
        assert se.min() > 0  # dropout does something on every element
        assert ((draws_t.mean(0) - draws_p.mean(0)).abs() <= 5 * se + 1e-12).all()
        assert (draws_p.std(0) / draws_t.std(0)).sub(1).abs().mean() < 0.1
        t.dropout = p.dropout = 1.0
        torch.testing.assert_close(run(p, inp, hx)[0].data, run(t, inp, hx)[0].data)


# ---------------------------------------------------------------------------------------------
# Bad input: torch's own exception type and message.

def bad_inputs(t):
    """(input, hx) pairs torch.nn rejects. hx is a 3-D tensor (or pair of them for LSTM)."""
    lstm = is_lstm(t)
    D = 2 if t.bidirectional else 1
    hout = t.proj_size if getattr(t, "proj_size", 0) > 0 else H

    def hx(*shape, cshape=None):
        h = torch.randn(*shape)
        return (h, torch.randn(*(cshape or shape[:-1] + (H,)))) if lstm else h

    L = t.num_layers * D
    cases = [
        (torch.randn(T, B, I, 1), None),                    # 4-D input
        (torch.randn(I), None),                             # 1-D input
        (torch.randn(T, B, I + 1), None),                   # wrong input_size
        (torch.randn(T, I + 1), None),                      # wrong input_size, unbatched
        (torch.randn(T, B, I), hx(B, hout)),                # 2-D hx for batched input
        (torch.randn(T, I), hx(L, 1, hout)),                # 3-D hx for unbatched input
        (torch.randn(T, B, I), hx(L, B + 1, hout)),         # hx batch
        (torch.randn(T, B, I), hx(L, B, hout + 1)),         # hx hidden size
        (torch.randn(T, B, I), hx(L + 1, B, hout)),         # hx layers
        (torch.randn(T, I), hx(L, hout + 1)),               # unbatched hx hidden size
        (torch.randn(T, B, I, dtype=torch.float64), None),  # input dtype != weight dtype
    ]
    if lstm:
        cases.append((torch.randn(T, B, I), hx(L, B, hout, cshape=(L, B, H + 1))))  # c size
    return cases


@pytest.mark.parametrize("mode", list(MODES))
def test_same_errors_as_torch(mode):
    t, p = make_pair(mode, torch.float32, num_layers=2, bidirectional=True)
    for k, (x, h) in enumerate(bad_inputs(t)):
        with pytest.raises(Exception) as et:
            run(t, x, h)
        with pytest.raises(type(et.value), match=re.escape(str(et.value))):
            run(p, x, h)


@pytest.mark.parametrize("mode", ["gru", "rnn_tanh"])
def test_same_errors_as_torch_packed(mode):
    t, p = make_pair(mode, torch.float32, num_layers=2)
    x = pack_padded_sequence(torch.randn(T, B, I), torch.tensor(LENGTHS_SORTED))
    for h in (torch.randn(2, B + 1, H), torch.randn(2, B, H + 1), torch.randn(3, B, H)):
        with pytest.raises(Exception) as et:
            t(x, h)
        with pytest.raises(type(et.value), match=re.escape(str(et.value))):
            p(x, h)


def test_lstm_packed_wrong_hx_is_a_clear_error():
    """torch.nn.LSTM leaves these to its C++ core, which gives an unrelated message or crashes
    (so it is not called here); pyseqk checks them with torch's own messages for padded input."""
    _, p = make_pair("lstm", torch.float32, num_layers=2)
    x = pack_padded_sequence(torch.randn(T, B, I), torch.tensor(LENGTHS_SORTED))
    good = torch.randn(2, B, H)
    for h, msg in (
            ((torch.randn(2, B + 1, H), good), "Expected hidden[0] size (2, 4, 5), got [2, 5, 5]"),
            ((good, torch.randn(2, B, H - 1)), "Expected hidden[1] size (2, 4, 5), got [2, 4, 4]"),
            ((torch.randn(3, B, H), good), "Expected hidden[0] size (2, 4, 5), got [3, 4, 5]")):
        with pytest.raises(RuntimeError, match=re.escape(msg)):
            p(x, h)


# ---------------------------------------------------------------------------------------------
# torch.compile

def fwd_bwd_compiled(m, inp, hx, leaves, **compile_kw):
    def f(inp, hx):
        return flat_outputs(run(m, inp, hx))

    outs = torch.compile(f, fullgraph=True, **compile_kw)(inp, hx)
    grads = torch.autograd.grad(loss_of(outs), leaves + list(m.parameters()), allow_unused=True,
                               retain_graph=True)
    return [o.detach() for o in outs], grads


@pytest.mark.parametrize("mode,kind,with_hx,kw", [
    ("lstm_proj", "batched", True, dict(num_layers=2, bidirectional=True, batch_first=True)),
    ("gru", "unbatched", False, dict(num_layers=2)),
    ("rnn_relu", "batched", False, dict(bidirectional=True, dropout=0.0)),
])
def test_torch_compile_fullgraph(mode, kind, with_hx, kw):
    torch._dynamo.reset()
    t, p = make_pair(mode, torch.float64, **kw)
    inp, hx, leaves = make_inputs(t, kind, with_hx, torch.float64)
    _, outs_e, grads_e = forward_backward(p, inp, hx, leaves)
    outs_c, grads_c = fwd_bwd_compiled(p, inp, hx, leaves, backend="eager")
    for a, b in zip(outs_c + list(grads_c), outs_e + list(grads_e)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_torch_compile_fullgraph_inside_a_model_and_converted():
    """The usual shape of things: a model holding the RNN, converted from torch.nn, compiled."""
    torch._dynamo.reset()

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.LSTM(I, H, num_layers=2, batch_first=True)
            self.head = torch.nn.Linear(H, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    m = pyseqk.convert(Model())
    x = torch.randn(B, T, I)
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(compiled, eager)


def test_torch_nn_rnns_keep_torchs_compile_behaviour():
    """pyseqk exempts only its own classes from dynamo's RNN graph break."""
    torch._dynamo.reset()
    pyseqk.nn.GRU(I, H)  # installs the exemption
    t = torch.nn.GRU(I, H)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="RNN, GRU, or LSTM"):
        torch.compile(lambda x: t(x)[0], fullgraph=True, backend="eager")(torch.randn(T, B, I))


@pytest.mark.slow
def test_torch_compile_inductor():
    torch._dynamo.reset()
    t, p = make_pair("rnn_tanh", torch.float32)
    inp, hx, leaves = make_inputs(t, "batched", True, torch.float32)
    _, outs_e, grads_e = forward_backward(p, inp, hx, leaves)
    outs_c, grads_c = fwd_bwd_compiled(p, inp, hx, leaves)
    for a, b in zip(outs_c + list(grads_c), outs_e + list(grads_e)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["packed_sorted", "packed_unsorted"])
@pytest.mark.parametrize("with_hx", [False, True])
def test_packed_sequence_torch_compile_fullgraph(kind, with_hx):
    """PackedSequence: batch_sizes stays a tensor (no .tolist()); an unsorted one has a static
    batch size (sorted_indices), a sorted one a data-dependent one (batch_sizes[0])."""
    torch._dynamo.reset()
    t, p = make_pair("lstm_proj", torch.float64, bidirectional=True, num_layers=2)
    inp, hx, leaves = make_inputs(t, kind, with_hx, torch.float64)
    _, outs_t, grads_t = forward_backward(t, inp, hx, leaves)
    outs_c, grads_c = fwd_bwd_compiled(p, inp, hx, leaves, backend="eager")
    for a, b in zip(outs_c + list(grads_c), outs_t + list(grads_t)):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_tanh"])
def test_fused_batch_modules_match_torch_nn(mode):
    """fp32 batches of 24-32 rows take the CPU's fused whole-layer forward (csrc/cpu/
    fused_layer.cpp): the modules, two bidirectional batch-first layers on an unsorted packed
    sequence, give torch.nn's outputs and gradients (against a float64 torch.nn run, the 2x rule)
    and, under no_grad (no workspace written), the same outputs bit for bit."""
    tcls, pcls, extra = MODES[mode]
    Bf, Tf, If, Hf = 28, 7, 19, 37
    kw = dict(num_layers=2, bidirectional=True, batch_first=True, **extra)
    torch.manual_seed(0)
    ref = tcls(If, Hf, dtype=torch.float64, **kw)
    t = tcls(If, Hf, **kw)
    p = pcls(If, Hf, **kw)
    t.load_state_dict(ref.state_dict())
    p.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(Bf, Tf, If, generator=g)
    lengths = torch.tensor([1 + (5 * b) % Tf for b in range(Bf)])

    def outputs_and_grads(m, dtype):
        xi = x.to(dtype).requires_grad_()
        out, hidden = m(pack_padded_sequence(xi, lengths, batch_first=True, enforce_sorted=False))
        outs = [out.data, *(hidden if isinstance(hidden, tuple) else (hidden,))]
        grads = torch.autograd.grad(loss_of(outs), [xi] + list(m.parameters()))
        return [o.detach() for o in outs], grads

    with pyseqk.use_backend("cpu"):
        outs_p, grads_p = outputs_and_grads(p, torch.float32)
        with torch.no_grad():
            out, hidden = p(pack_padded_sequence(x, lengths, batch_first=True,
                                                 enforce_sorted=False))
    outs_t, grads_t = outputs_and_grads(t, torch.float32)
    outs_r, grads_r = outputs_and_grads(ref, torch.float64)
    for k, (o, ot, orf) in enumerate(zip(outs_p, outs_t, outs_r)):
        assert_close_rule(o, ot, orf, torch.float32, f"{mode} output {k}")
    for k, (gp, gt, gr) in enumerate(zip(grads_p, grads_t, grads_r)):
        assert_close_rule(gp, gt, gr, torch.float32, f"{mode} gradient {k}")
    no_grad_outs = [out.data, *(hidden if isinstance(hidden, tuple) else (hidden,))]
    for k, (a, b) in enumerate(zip(no_grad_outs, outs_p)):
        assert torch.equal(a, b), f"{mode} output {k} differs under no_grad"
