"""The whole-sequence layer ops (lstm_layer with projection, gru_layer, rnn_layer) on every
backend against the float64 reference and against torch.nn: forward, every gradient, lengths
(sorted, unsorted, zeros), reverse, odd sizes; their registration (opcheck, gradcheck,
torch.compile) and their bad-input errors."""
import pytest
import torch

import pyseqk
from pyseqk import functional as F
from pyseqk import reference as R

from _util import assert_close_rule
from conftest import cpu_backends

KINDS = {  # name: (gates, projection)
    "lstm": (4, False),
    "lstm_proj": (4, True),
    "gru": (3, False),
    "rnn_tanh": (1, False),
    "rnn_relu": (1, False),
}

# id: (T, B, I, H, lengths, reverse, bias)
CONFIGS = {
    "plain": (5, 3, 4, 7, None, False, True),
    "reverse": (5, 3, 4, 7, None, True, True),
    "nobias": (4, 3, 4, 7, None, False, False),
    "sorted": (5, 3, 4, 7, [5, 3, 1], False, True),
    "sorted_rev": (5, 3, 4, 7, [5, 3, 1], True, True),
    "unsorted_zero": (5, 4, 4, 7, [2, 0, 5, 3], False, True),
    "unsorted_zero_rev": (5, 4, 4, 7, [2, 0, 5, 3], True, False),
    "full": (4, 3, 4, 7, [4, 4, 4], True, True),
    "T1B1": (1, 1, 1, 3, None, False, True),
    "B1": (6, 1, 3, 5, [4], True, True),
    "H97": (2, 2, 5, 97, [2, 1], False, True),
    "empty_batch": (3, 0, 4, 7, None, False, True),
    "T0": (0, 2, 4, 7, [0, 0], False, True),
    # fp32, B <= 2 and a step weight of 2^15+ elements: the forward runs in a thread team, hidden
    # units split between threads (csrc/cpu/fused_small.cpp on AVX-512 builds; lstm_proj, and
    # every kind elsewhere: time_loop of csrc/ops/layers.cpp, lstm_proj's split by columns).
    "team_B2": (3, 2, 8, 192, [3, 1], True, True),
    "team_B1": (4, 1, 8, 192, None, False, True),
    # 185 units: the second thread's 89 end in a 9-lane partial vector (masked loads and stores
    # in the GEMV), reversed. The team runs fp32 only: LOW_PRECISION_CONFIGS lists it.
    "team_H185": (3, 1, 8, 185, None, True, True),
    # fp32, 24 <= B <= 32 on an AVX-512 build: the fused whole-layer forward (LSTM without
    # projection, GRU, RNN: csrc/cpu/fused_layer.cpp, input projection inside the loop, the GEMM
    # of csrc/cpu/gemm.h); the LSTM with projection keeps the loop of csrc/ops/layers.cpp.
    # 37 units: the second thread owns a partial tile of 5; unsorted lengths with zeros,
    # reversed; then sorted lengths at B = 32.
    "team_B27": (4, 27, 6, 37, [(7 * b) % 5 for b in range(27)], True, True),
    "team_B32": (3, 32, 5, 40, sorted(((b % 3) + 1 for b in range(32)), reverse=True), False,
                 True),
    # The fused forward again: 70 units split 48 + 22, an odd input width, no bias; then unsorted
    # lengths with zeros, reversed, 30 rows; then a weight slice past the core's L2
    # (4 * 208 units * (400 + 400) fp32 per thread: 2.7 MB, dropped after the call).
    "fused_B24": (3, 24, 33, 70, None, False, False),
    "fused_B30": (4, 30, 16, 50, [(3 * b) % 5 for b in range(30)], True, True),
    "fused_wide": (2, 24, 400, 400, None, False, True),
    # Odd widths (45 units, 33 inputs): bfloat16 layers on a CPU with AVX512_BF16 and no tile
    # unit take the fused forward's bf16 pairs (csrc/cpu/gemm_bf16.h), the last pair of each
    # zero-padded.
    "fused_odd": (3, 28, 33, 45, [(3 * b) % 4 for b in range(28)], False, True),
    # On a CPU with the AMX tile unit, batches of 12-23 rows take it too (csrc/cpu/
    # fused_layer_tiles.cpp, one 16-row tile at B = 13): 70 units split 64 + 6, unsorted lengths
    # with zeros, reversed. Elsewhere the loop of csrc/ops/layers.cpp.
    "tiles_B13": (3, 13, 33, 70, [(3 * b) % 4 for b in range(13)], True, True),
    # fp32, B <= 2 on an AVX-512 build: csrc/cpu/fused_small.cpp (GEMVs in one team, the input
    # projection in chunks of 32 / B steps). 70 steps at B = 1: two whole chunks and a short one
    # of 6 steps (input parts a step at a time), a length of 53, reversed (17 padded steps
    # first); 100 units: a team of 64 + 36 for the LSTM, one thread for the GRU and RNN; an
    # input width of 21 (masked tails). 37 steps at B = 2: chunks of 16, 16 and 5, the second
    # row ending at 23 inside a chunk; 150 units: 80 + 70.
    "small_B1": (70, 1, 21, 100, [53], True, True),
    "small_B2": (37, 2, 19, 150, [37, 23], False, True),
}
# The Triton interpreter runs every op of every step in Python (~1 s per small layer call):
# the same cases, smaller.
TRITON_CONFIGS = {
    "plain": (3, 2, 3, 5, None, False, True),
    "reverse_nobias": (3, 2, 3, 5, None, True, False),
    "sorted": (3, 2, 3, 5, [3, 1], False, True),
    "unsorted_zero_rev": (3, 3, 3, 5, [2, 0, 3], True, True),
    "T1B1": (1, 1, 1, 3, None, False, True),
    "H97": (1, 1, 2, 97, None, True, True),
    "empty_batch": (2, 0, 3, 5, None, False, True),
    "T0": (0, 2, 3, 5, [0, 0], False, True),
}
# fused_B30 and tiles_B13: on a CPU with the AMX tile unit, bfloat16 layers take its bf16
# products there (csrc/cpu/fused_layer_tiles.cpp); fused_B30 and fused_odd: on one with
# AVX512_BF16 and no tile unit, the FMA forward's bf16 pairs (csrc/cpu/gemm_bf16.h).
LOW_PRECISION_CONFIGS = ["plain", "unsorted_zero_rev", "H97", "team_B2", "team_B1", "team_H185",
                         "fused_B30", "tiles_B13", "fused_odd"]
# Paths that only fp32 takes, run in fp32 besides fp64.
FP32_CONFIGS = ["team_B27", "team_B32", "fused_B24", "fused_B30", "fused_wide", "tiles_B13",
                "small_B1", "small_B2", "fused_odd"]
TRITON_LOW_PRECISION_CONFIGS = ["unsorted_zero_rev"]


def backend_configs(names=None, triton_names=None):
    """(backend, config) pairs: every config on the C++ and reference backends, the small ones
    on Triton."""
    pairs = []
    for backend in cpu_backends():
        table = TRITON_CONFIGS if backend == "triton" else CONFIGS
        keep = triton_names if backend == "triton" and triton_names is not None else names
        pairs += [(backend, c) for c in table if keep is None or c in keep]
    return pairs


def proj_size(H):
    return max(1, H // 2 + 1)  # odd, smaller than H


def make_args(kind, T, B, I, H, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    G, proj = KINDS[kind]
    P = proj_size(H) if proj else H

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    x, h0 = rnd(T, B, I), rnd(B, P, scale=0.5)
    w_ih, w_hh = rnd(G * H, I, scale=max(I, 1) ** -0.5), rnd(G * H, P, scale=max(P, 1) ** -0.5)
    b_ih, b_hh = (rnd(G * H, scale=0.1), rnd(G * H, scale=0.1)) if bias else (None, None)
    if kind.startswith("lstm"):
        w_hr = rnd(P, H, scale=H ** -0.5) if proj else None
        return [x, h0, rnd(B, H, scale=0.5), w_ih, w_hh, b_ih, b_hh, w_hr]
    return [x, h0, w_ih, w_hh, b_ih, b_hh]


def layer_fn(kind, module=F):
    if kind.startswith("lstm"):
        return lambda *a, lengths=None, reverse=False: module.lstm_layer(*a, lengths=lengths,
                                                                         reverse=reverse)
    if kind == "gru":
        return lambda *a, lengths=None, reverse=False: module.gru_layer(*a, lengths=lengths,
                                                                        reverse=reverse)
    nl = kind.split("_")[1]
    return lambda *a, lengths=None, reverse=False: module.rnn_layer(
        *a, nonlinearity=nl, lengths=lengths, reverse=reverse)


def run_with_grads(fn, args, seed=1, **kw):
    """Outputs and the gradients of every tensor argument (zeros where unused) for a fixed random
    gradient of every output."""
    args = [a.detach().clone().requires_grad_() if a is not None else None for a in args]
    outs = fn(*args, **kw)
    g = torch.Generator().manual_seed(seed)
    grads_out = [torch.randn(o.shape, generator=g).to(o) for o in outs]
    leaves = [a for a in args if a is not None]
    pairs = [(o, go) for o, go in zip(outs, grads_out) if o.requires_grad]  # the reference's
    # empty output (T = 0) has no graph
    grads = iter(torch.autograd.grad([p[0] for p in pairs], leaves, [p[1] for p in pairs],
                                     allow_unused=True, materialize_grads=True))
    return [o.detach() for o in outs], [next(grads) if a is not None else None for a in args]


def double(args):
    return [a.double() if a is not None else None for a in args]


def check(kind, backend, config, dtype):
    T, B, I, H, lengths, reverse, bias = (TRITON_CONFIGS if backend == "triton" else CONFIGS)[config]
    args = make_args(kind, T, B, I, H, dtype, bias)
    lens = torch.tensor(lengths, dtype=torch.int64) if lengths is not None else None
    fn = layer_fn(kind)
    with pyseqk.use_backend(backend):
        outs, grads = run_with_grads(fn, args, lengths=lens, reverse=reverse)
    ref_outs, ref_grads = run_with_grads(layer_fn(kind, R), double(args), lengths=lens,
                                         reverse=reverse)
    # PyTorch's own error in this dtype: the reference run in it (torch ops per step).
    t_outs, t_grads = run_with_grads(layer_fn(kind, R), args, lengths=lens, reverse=reverse)
    what = f"{kind}[{backend}, {config}, {dtype}]"
    for k, (o, t, r) in enumerate(zip(outs, t_outs, ref_outs)):
        assert o.dtype == dtype and o.shape == r.shape, f"{what} output {k}: {o.shape} {o.dtype}"
        assert_close_rule(o, t, r, dtype, f"{what} output {k}")
    for k, (gr, t, r) in enumerate(zip(grads, t_grads, ref_grads)):
        assert_close_rule(gr, t, r, dtype, f"{what} grad of argument {k}")
    if lens is not None and T > 0:
        out = outs[0]
        pad = torch.arange(T).unsqueeze(1) >= lens.unsqueeze(0)  # [T, B]
        assert (out[pad] == 0).all(), f"{what}: output not zero at padded steps"


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("backend,config", backend_configs(), ids=[f"{b}-{c}" for b, c in backend_configs()])
def test_layer_matches_reference_fp64(backend, config, kind):
    check(kind, backend, config, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("backend,config",
                         backend_configs(LOW_PRECISION_CONFIGS, TRITON_LOW_PRECISION_CONFIGS),
                         ids=[f"{b}-{c}" for b, c in backend_configs(
                             LOW_PRECISION_CONFIGS, TRITON_LOW_PRECISION_CONFIGS)])
def test_layer_matches_reference_low_precision(backend, config, kind, dtype):
    check(kind, backend, config, dtype)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("backend,config", backend_configs(FP32_CONFIGS, []),
                         ids=[f"{b}-{c}" for b, c in backend_configs(FP32_CONFIGS, [])])
def test_layer_matches_reference_fp32(backend, config, kind):
    check(kind, backend, config, torch.float32)


def fused_args(kind, bias, B=26, I=21, H=37, T=4):
    """fp32 arguments in the fused forward's shapes; bias: "both", "ih", "hh" or "none"."""
    args = make_args(kind, T, B, I, H, torch.float32, bias != "none", seed=3)
    ib = 5 if kind.startswith("lstm") else 4
    if bias == "ih":
        args[ib + 1] = None
    elif bias == "hh":
        args[ib] = None
    return args


@pytest.mark.parametrize("B", [26, 2])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("bias", ["both", "ih", "hh", "none"])
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_fused_layer_biases_and_threads(kind, bias, threads, B):
    """The fused forwards (B = 26: csrc/cpu/fused_layer.cpp; B = 2: csrc/cpu/fused_small.cpp,
    185 units, with three threads 64 + 64 + 57) fold the biases into their own per-row vector
    (the GRU keeps b_hn apart): each bias alone, with one thread (a team of one), two and three
    (more than the cores); forward and gradients (the workspace feeds the backward) against the
    float64 reference."""
    args = fused_args(kind, bias, B=B, H=37 if B == 26 else 185)
    lens = torch.tensor([(3 * b) % 5 for b in range(B)])
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with pyseqk.use_backend("cpu"):
            outs, grads = run_with_grads(layer_fn(kind), args, lengths=lens, reverse=True)
    finally:
        torch.set_num_threads(previous)
    ref_outs, ref_grads = run_with_grads(layer_fn(kind, R), double(args), lengths=lens,
                                         reverse=True)
    t_outs, t_grads = run_with_grads(layer_fn(kind, R), args, lengths=lens, reverse=True)
    what = f"{kind}[fused, B {B}, bias {bias}, {threads} threads]"
    for k, (o, t, r) in enumerate(zip(outs, t_outs, ref_outs)):
        assert_close_rule(o, t, r, torch.float32, f"{what} output {k}")
    for k, (gr, t, r) in enumerate(zip(grads, t_grads, ref_grads)):
        assert_close_rule(gr, t, r, torch.float32, f"{what} grad of argument {k}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("I,H", [(0, 5), (4, 0), (0, 0), (0, 40)])
@pytest.mark.parametrize("B", [1, 2, 26])
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_fused_layer_empty_widths(kind, B, I, H, dtype):
    """No input features or no hidden units, in the fused forwards' batch sizes (B = 1, 2: csrc/
    cpu/fused_small.cpp; 26: fused_layer.cpp): the reference's outputs (the bias alone drives the
    states when I = 0), no crash (H = 0 once divided by zero splitting the units)."""
    args = make_args(kind, 3, B, I, H, dtype, seed=4)
    with pyseqk.use_backend("cpu"), torch.no_grad():
        ours = layer_fn(kind)(*args)
    with pyseqk.use_backend("reference"), torch.no_grad():
        ref = layer_fn(kind)(*args)
    for k, (a, r) in enumerate(zip(ours, ref)):
        assert a.shape == r.shape, f"{kind} output {k}: {a.shape} against {r.shape}"
        torch.testing.assert_close(a.float(), r.float(), rtol=2e-2, atol=2e-2,
                                   msg=lambda m: f"{kind} B={B} I={I} H={H} output {k}: {m}")


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_fused_layer_non_contiguous(kind):
    """Strided operands in the fused forward's shapes (batch-first input seen as [T, B, I], a
    transposed weight's transpose, a strided bias) give the contiguous operands' results."""
    args = fused_args(kind, "both")
    ib = 5 if kind.startswith("lstm") else 4
    strided = list(args)
    strided[0] = args[0].transpose(0, 1).contiguous().transpose(0, 1)
    strided[ib - 1] = args[ib - 1].t().contiguous().t()  # w_hh
    strided[ib] = torch.stack([args[ib], args[ib]], 1)[:, 0]  # b_ih, stride 2
    assert not any(strided[k].is_contiguous() for k in (0, ib - 1, ib))
    with pyseqk.use_backend("cpu"), torch.no_grad():
        ours = layer_fn(kind)(*strided)
        theirs = layer_fn(kind)(*args)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def tile_unit():
    """Whether this CPU has the AMX tile unit that the fused forward runs its GEMMs on
    (csrc/cpu/amx.h; Linux grants the tile state on request)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return {"amx_tile", "amx_bf16", "avx512_bf16"} <= flags


@pytest.mark.parametrize("B", [14, 30])
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_fused_layer_tile_unit_and_fma(kind, B, monkeypatch):
    """The fused forward on the tile unit (csrc/cpu/fused_layer_tiles.cpp: six bf16 piece
    products a product, amx.h) and on FMAs (PYSEQK_CPU_AMX=0: csrc/cpu/fused_layer.cpp at
    B = 30, the split loop at 14): both within the fp32 rule of the float64 reference, forward and
    gradients, at 50 units (32 + 18: the second thread's a partial tile column block), an odd
    input width of 71 (a partial k-block) and unsorted lengths with zeros, reversed; one 16-row
    tile of the batch (B = 14) or two. On a CPU with the tile unit, the two differ (its path
    ran)."""
    args = fused_args(kind, "both", B=B, I=71, H=50, T=5)
    lens = torch.tensor([(3 * b) % 6 for b in range(B)])
    ref_outs, ref_grads = run_with_grads(layer_fn(kind, R), double(args), lengths=lens,
                                         reverse=True)
    t_outs, t_grads = run_with_grads(layer_fn(kind, R), args, lengths=lens, reverse=True)
    results = {}
    for amx in ("1", "0"):
        monkeypatch.setenv("PYSEQK_CPU_AMX", amx)
        with pyseqk.use_backend("cpu"):
            outs, grads = run_with_grads(layer_fn(kind), args, lengths=lens, reverse=True)
        what = f"{kind}[fused, PYSEQK_CPU_AMX={amx}]"
        for k, (o, t, r) in enumerate(zip(outs, t_outs, ref_outs)):
            assert_close_rule(o, t, r, torch.float32, f"{what} output {k}")
        for k, (gr, t, r) in enumerate(zip(grads, t_grads, ref_grads)):
            assert_close_rule(gr, t, r, torch.float32, f"{what} grad of argument {k}")
        results[amx] = outs[0]
    if tile_unit():
        assert not torch.equal(results["1"], results["0"]), "the tile unit's path did not run"


@pytest.mark.parametrize("B", [13, 26])
@pytest.mark.parametrize("where", ["x_inf", "x_nan", "x_huge", "w_inf", "h0_inf"])
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_fused_layer_nonfinite(kind, where, B, monkeypatch):
    """inf, NaN and values beyond bf16's range (3.4e38) do not split into bf16 pieces (an inf
    times pieces of opposite signs would give NaN where fp32 gives +-inf): the call runs again
    with FMAs (csrc/cpu/fused_layer.cpp, at B = 13 too), so the outputs equal the FMA path's
    (PYSEQK_CPU_AMX=0: the same kernel at B = 26, the split loop at 13) to fp32 rounding, bit for
    bit at B = 26, and their NaNs are the fp32 reference's."""
    args = fused_args(kind, "both", B=B)
    x, h0, w_ih = args[0], args[1], args[3 if kind == "lstm" else 2]
    if where == "x_inf":
        x[2, 3, 7] = float("inf")
    elif where == "x_nan":
        x[1, 0, 2] = float("nan")
    elif where == "x_huge":
        x[1, 5, 0] = 3.4e38
    elif where == "w_inf":
        w_ih[4, 1] = float("-inf")
    else:
        h0[5, 9] = float("inf")
    with pyseqk.use_backend("cpu"), torch.no_grad():
        ours = layer_fn(kind)(*args)
        monkeypatch.setenv("PYSEQK_CPU_AMX", "0")
        fma = layer_fn(kind)(*args)
        ref = layer_fn(kind, R)(*args)
    tol = 0 if B == 26 else 1e-5
    for k, (a, b, r) in enumerate(zip(ours, fma, ref)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True,
                                   msg=lambda m: f"{kind} {where} output {k}: {m}")
        assert torch.equal(a.isnan(), r.isnan()), f"{kind} {where} output {k}: NaNs differ"
    assert ours[0].isfinite().any(), f"{kind} {where}: no finite output at all"


WORKSPACE_CASES = [(b, k, c) for b in ["cpu"] + (["triton"] if "triton" in cpu_backends() else [])
                   for k in ["lstm", "lstm_proj", "gru", "rnn_tanh"]
                   for c in (["fused", "small"] if b == "cpu" else ["small"])]


@pytest.mark.parametrize("backend,kind,case", WORKSPACE_CASES,
                         ids=[f"{b}-{k}-{c}" for b, k, c in WORKSPACE_CASES])
def test_layer_workspace_false(backend, kind, case):
    """workspace=False (what functional passes when no gradient is wanted): the same outputs as
    workspace=True, the workspaces with no time steps (as the fake kernel says: opcheck), and a
    backward through it raises instead of differentiating with nothing."""
    prefix = "triton_" if backend == "triton" else ""
    if prefix:
        F._op("triton", "lstm_layer", "_triton_layer_ops")  # defines the triton ops
    if case == "fused":
        name, args = op_args(kind, T=4, B=26, I=21, H=37, lengths=[(3 * b) % 5 for b in range(26)])
        args = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                     for a in args)
    else:
        name, args = op_args(kind)
    op = getattr(torch.ops.pyseqk, prefix + name)
    with_ws = op(*args)
    without = op(*args, False)
    n_out = 3 if name == "lstm_layer" else 2
    for k in range(n_out):
        assert torch.equal(with_ws[k], without[k]), f"output {k} differs without the workspace"
    for k in range(n_out, len(without)):
        assert without[k].shape[0] == 0 and without[k].shape[1:] == with_ws[k].shape[1:], (
            f"workspace {k}: {tuple(without[k].shape)} for {tuple(with_ws[k].shape)}")
    torch.library.opcheck(op, args + (False,))
    grad_args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor)
                      and a.is_floating_point() else a for a in args)
    out = op(*grad_args, False)
    with pytest.raises(RuntimeError, match="workspace=False"):
        out[0].sum().backward()
    if backend == "cpu":  # the native backward op itself, handed the empty workspace
        bop = getattr(torch.ops.pyseqk, name + "_backward")
        a = args
        g = tuple(torch.ones_like(o) for o in without[:n_out])
        if name == "lstm_layer":
            bargs = g + (a[0], a[3], a[4], a[7], a[8], a[9]) + tuple(without[3:])
        elif name == "gru_layer":
            bargs = g + (a[0], a[2], a[3], a[6], a[7]) + tuple(without[2:])
        else:
            bargs = g + (a[0], a[2], a[3], a[6], a[7], a[8]) + tuple(without[2:])
        with pytest.raises(RuntimeError, match="time steps"):
            bop(*bargs)


def test_layer_no_grad_skips_workspace(monkeypatch):
    """functional passes workspace=False exactly when autograd will not record the call: under
    no_grad, and when no argument requires grad; a call that needs gradients still gets them."""
    args = make_args("lstm", 3, 2, 4, 5, torch.float32)
    seen = []
    real = torch.ops.pyseqk.lstm_layer

    def spy(*a):
        seen.append(a[-1])
        return real(*a)

    monkeypatch.setattr(F, "_op", lambda *a, **k: spy)
    with pyseqk.use_backend("cpu"):
        F.lstm_layer(*args)
        with torch.no_grad():
            F.lstm_layer(*[a.requires_grad_() if a is not None else None for a in args])
        out = F.lstm_layer(*args)
    assert seen == [False, False, True], seen
    out[0].sum().backward()
    assert args[0].grad is not None


# ---------------------------------------------------------------------------------------------
# Against torch.nn's own layers (the implementation users switch from), with a PackedSequence
# for lengths, in fp32 and bf16.

def torch_nn_layer(kind, args, lengths):
    G, proj = KINDS[kind]
    x = args[0]
    I, H = x.shape[2], args[3 if kind.startswith("lstm") else 2].shape[0] // G
    if kind.startswith("lstm"):
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = args
        m = torch.nn.LSTM(I, H, proj_size=w_hr.shape[0] if proj else 0)
        state = (h0.unsqueeze(0), c0.unsqueeze(0))
        params = [w_ih, w_hh, b_ih, b_hh] + ([w_hr] if proj else [])
    else:
        x, h0, w_ih, w_hh, b_ih, b_hh = args
        m = torch.nn.GRU(I, H) if kind == "gru" else torch.nn.RNN(I, H, nonlinearity=kind[4:])
        state = h0.unsqueeze(0)
        params = [w_ih, w_hh, b_ih, b_hh]
    m = m.to(x.dtype)
    for name, p in zip(m._flat_weights_names, params):
        setattr(m, name, torch.nn.Parameter(p))
    if lengths is not None:
        x = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    out, st = m(x, state)
    if lengths is not None:
        out = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=args[0].shape[0])[0]
    if kind.startswith("lstm"):
        return out, st[0][0], st[1][0]
    return out, st[0]


def torch_nn_cases():
    """The C++ backend in fp32 and bf16, with and without lengths; Triton (interpreted, slow) in
    bf16 with unsorted lengths. The reference is checked against torch.nn in fp64 below."""
    cases = [("cpu", d, l) for d in (torch.float32, torch.bfloat16) for l in (None, [5, 2, 4])]
    if "triton" in cpu_backends():
        cases.append(("triton", torch.bfloat16, [5, 2, 4]))
    return cases


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("backend,dtype,lengths", torch_nn_cases(),
                         ids=[f"{b}-{str(d)[6:]}-{'unsorted' if l else 'full'}"
                              for b, d, l in torch_nn_cases()])
def test_layer_matches_torch_nn(backend, dtype, lengths, kind):
    T, B, I, H = (5, 3, 3, 5) if backend == "triton" else (5, 3, 6, 9)
    args = make_args(kind, T, B, I, H, dtype)
    lens = torch.tensor(lengths) if lengths is not None else None
    with pyseqk.use_backend(backend):
        outs, grads = run_with_grads(layer_fn(kind), args, lengths=lens)
    ref_outs, ref_grads = run_with_grads(layer_fn(kind, R), double(args), lengths=lens)

    def nn_fn(*a, lengths=None):
        return torch_nn_layer(kind, a, lengths)

    t_outs, t_grads = run_with_grads(nn_fn, args, lengths=lens)
    for k, (o, t, r) in enumerate(zip(outs, t_outs, ref_outs)):
        assert_close_rule(o, t, r, dtype, f"{kind}[{backend}] vs torch.nn output {k}")
    for k, (gr, t, r) in enumerate(zip(grads, t_grads, ref_grads)):
        assert_close_rule(gr, t, r, dtype, f"{kind}[{backend}] vs torch.nn grad of argument {k}")


def test_reference_agrees_with_torch_nn_fp64():
    """The oracle itself: the reference equals torch.nn's layers (with a PackedSequence)."""
    for kind in KINDS:
        args = make_args(kind, 5, 3, 4, 6, torch.float64)
        lens = torch.tensor([3, 5, 1])
        ours = layer_fn(kind, R)(*args, lengths=lens)
        theirs = torch_nn_layer(kind, args, lens)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Registration: gradcheck, opcheck, torch.compile.

GRADCHECK_CASES = [("cpu", "lstm_proj", [3, 1, 2], True), ("cpu", "lstm", None, False),
                   ("cpu", "gru", [2, 3, 0], True), ("cpu", "rnn_tanh", [1, 3, 2], False),
                   ("cpu", "rnn_relu", None, True)]
if "triton" in cpu_backends():
    # Numerical Jacobians take two interpreted launches per input element: one tiny case. The
    # Triton gradients of every layer are checked against the reference's autograd above.
    GRADCHECK_CASES.append(("triton", "rnn_tanh", [2, 1], True))


@pytest.mark.parametrize("backend,kind,lengths,reverse", GRADCHECK_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in GRADCHECK_CASES])
def test_layer_gradcheck(backend, kind, lengths, reverse):
    T, B, I, H = (2, 2, 1, 2) if backend == "triton" else (3, 3, 3, 4)
    args = [a.requires_grad_() if a is not None else None
            for a in make_args(kind, T, B, I, H, torch.float64)]
    lens = torch.tensor(lengths) if lengths is not None else None
    fn = layer_fn(kind)
    with pyseqk.use_backend(backend):
        assert torch.autograd.gradcheck(lambda *a: fn(*a, lengths=lens, reverse=reverse), args)


def op_args(kind, T=3, B=3, I=3, H=4, lengths=(3, 1, 2), reverse=True):
    args = make_args(kind, T, B, I, H, torch.float64)
    lens = torch.tensor(lengths)
    if kind.startswith("lstm"):
        return "lstm_layer", tuple(args) + (lens, reverse)
    if kind == "gru":
        return "gru_layer", tuple(args) + (lens, reverse)
    return "rnn_layer", tuple(args) + (kind == "rnn_relu", lens, reverse)


def native_prefixes():
    return [""] + (["triton_"] if "triton" in cpu_backends() else [])


@pytest.mark.parametrize("kind", ["lstm_proj", "gru", "rnn_relu"])
@pytest.mark.parametrize("prefix", native_prefixes())
def test_layer_opcheck(prefix, kind):
    if prefix == "triton_":
        F._op("triton", "lstm_layer", "_triton_layer_ops")  # defines the triton ops
    name, args = op_args(kind)
    op = getattr(torch.ops.pyseqk, prefix + name)
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)
    torch.library.opcheck(op, args)
    out = op(*args)
    # the backward op, with the forward's saved values
    ws = out[3:] if name == "lstm_layer" else out[2:]
    g = tuple(torch.randn_like(o) for o in out[:3 if name == "lstm_layer" else 2])
    a = [x.detach() if isinstance(x, torch.Tensor) else x for x in args]
    bop = getattr(torch.ops.pyseqk, prefix + name + "_backward")
    if name == "lstm_layer":
        bargs = g + (a[0], a[3], a[4], a[7], a[8], a[9]) + tuple(w.detach() for w in ws)
    elif name == "gru_layer":
        bargs = g + (a[0], a[2], a[3], a[6], a[7]) + tuple(w.detach() for w in ws)
    else:
        bargs = g + (a[0], a[2], a[3], a[6], a[7], a[8]) + tuple(w.detach() for w in ws)
    torch.library.opcheck(bop, bargs)


def test_layer_compile_fullgraph():
    args = [a.requires_grad_() if a is not None else None
            for a in make_args("lstm_proj", 4, 3, 5, 6, torch.float32)]
    lens = torch.tensor([4, 2, 3])

    def f(*a):
        out, h, c = F.lstm_layer(*a, lengths=lens, reverse=True)
        return out.sum() + h.sum() * 2 + c.sum() * 3

    with pyseqk.use_backend("cpu"):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        y = compiled(*args)
        gc = torch.autograd.grad(y, [a for a in args if a is not None])
        y2 = f(*args)
        ge = torch.autograd.grad(y2, [a for a in args if a is not None])
    torch.testing.assert_close(y, y2)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


def test_cpu_layer_carries_no_state_between_calls():
    """The forward reuses no buffer across calls: two calls with different data give the results
    of independent calls (guards against a cached workspace)."""
    a1 = make_args("gru", 4, 2, 3, 5, torch.float32, seed=1)
    a2 = make_args("gru", 4, 2, 3, 5, torch.float32, seed=2)
    with pyseqk.use_backend("cpu"):
        o1 = F.gru_layer(*a1)[0].clone()
        F.gru_layer(*a2)
        o1b = F.gru_layer(*a1)[0]
    assert torch.equal(o1, o1b)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument.

def bad_cases():
    def lstm(mut):
        a = make_args("lstm_proj", 4, 3, 5, 6, torch.float32)
        kw = {"lengths": None}
        mut(a, kw)
        return lambda: F.lstm_layer(*a, **kw)

    def setl(v):
        return lambda a, kw: kw.__setitem__("lengths", v)

    def seta(i, v):
        return lambda a, kw: a.__setitem__(i, v(a[i]))

    return {
        "lengths shape": (lstm(setl(torch.tensor([1, 2]))), RuntimeError, "lengths must have shape"),
        "lengths 2-D": (lstm(setl(torch.ones(3, 1, dtype=torch.int64))), RuntimeError,
                        "lengths must have shape"),
        "lengths too long": (lstm(setl(torch.tensor([1, 5, 2]))), RuntimeError,
                             r"lengths values must be in \[0, T\]"),
        "lengths negative": (lstm(setl(torch.tensor([1, -1, 2]))), RuntimeError,
                             r"lengths values must be in \[0, T\]"),
        "lengths dtype": (lstm(setl(torch.tensor([1.0, 2.0, 3.0]))), TypeError,
                          "lengths must be int64"),
        "h0 shape": (lstm(seta(1, lambda t: t[:, :-1])), RuntimeError, "h0 must have shape"),
        "c0 shape": (lstm(seta(2, lambda t: t[:2])), RuntimeError, "c0 must have shape"),
        "w_hr shape": (lstm(seta(7, lambda t: t[:, :-1])), RuntimeError, "w_hr must have shape"),
        "w_hh shape": (lstm(seta(4, lambda t: t[:, :-1])), RuntimeError, "w_hh must have shape"),
        "input 2-D": (lstm(seta(0, lambda t: t[0])), RuntimeError, "input must be 3-D"),
        "input size": (lstm(seta(0, lambda t: t[..., :-1])), RuntimeError, "input_size"),
        "bias shape": (lstm(seta(5, lambda t: t[:-1])), RuntimeError, "b_ih must have shape"),
        "dtype": (lstm(seta(3, lambda t: t.double())), TypeError, "w_ih has dtype"),
        "int input": (lstm(seta(0, lambda t: t.long())), TypeError, "input must be float"),
    }


BAD = bad_cases()


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("backend", cpu_backends())
def test_layer_bad_input(backend, case):
    make, exc, msg = BAD[case]
    with pyseqk.use_backend(backend):
        with pytest.raises(exc, match=msg):
            make()()


@pytest.mark.parametrize("backend", cpu_backends())
def test_bad_nonlinearity(backend):
    a = make_args("rnn_tanh", 2, 2, 3, 4, torch.float32)
    with pyseqk.use_backend(backend), pytest.raises(ValueError, match="nonlinearity"):
        F.rnn_layer(*a, nonlinearity="sigmoid")


@pytest.mark.parametrize("backend", cpu_backends())
def test_gru_bad_h0(backend):
    a = make_args("gru", 2, 2, 3, 4, torch.float32)
    a[1] = a[1][:1]
    with pyseqk.use_backend(backend), pytest.raises(RuntimeError, match="h0 must have shape"):
        F.gru_layer(*a)


ONE_OUTPUT = [("lstm_proj", 0), ("lstm_proj", 1), ("lstm_proj", 2), ("gru", 0), ("gru", 1)]


@pytest.mark.parametrize("kind,which", ONE_OUTPUT, ids=[f"{k}-{w}" for k, w in ONE_OUTPUT])
@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "reference"])
def test_layer_gradient_of_one_output(backend, kind, which):
    """Only one output used: the backward ops get None for the others (no output gradient,
    no h_n/c_n gradient) and must treat them as zero."""
    args = make_args(kind, 3, 3, 2, 4, torch.float64)
    lens = torch.tensor([3, 0, 2])

    def grads(fn):
        a = [t.clone().requires_grad_() if t is not None else None for t in args]
        out = fn(*a, lengths=lens, reverse=True)
        out[which].pow(2).sum().backward()
        return [t.grad if t.grad is not None else torch.zeros_like(t) for t in a if t is not None]

    with pyseqk.use_backend(backend):
        ours = grads(layer_fn(kind))
    for k, (o, r) in enumerate(zip(ours, grads(layer_fn(kind, R)))):
        torch.testing.assert_close(o, r, atol=1e-12, rtol=1e-10, msg=f"grad of argument {k}")
