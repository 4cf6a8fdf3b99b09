"""Bad input, table-driven over every op of _tables.OPS and every module of _tables.MODULES.

Each tensor argument in turn gets the wrong dtype (int64, complex64), the meta device while the
others are real, one dimension too many, and each of its sizes off by one: the call must raise an
error naming that argument (or torch's own word for it) - never crash, never return. Inputs that
are legal but unusual must give torch's result: non-contiguous and transposed tensors, NaN and
inf, an empty batch, very large pre-activations."""
import re

import pytest
import torch

import pyseqk

from _tables import BACKWARDS, MODULES, OPS, outputs
from conftest import cpu_backends

ERRORS = (RuntimeError, TypeError, ValueError, IndexError)


def base_args(op, dtype=torch.float32, bias=True, sizes=None):
    return op.make_args(sizes or op.default_sizes, dtype, "cpu", bias, torch.Generator().manual_seed(0))


def names_for(op, name):
    return (name,) + tuple(op.aliases.get(name, ()))


def assert_names(op, name, err):
    msg = str(err)
    assert any(re.search(rf"\b{re.escape(w)}\b", msg) for w in names_for(op, name)), (
        f"{op.name}: the error for a bad {name} does not name it: {msg!r}")


def mutations(op):
    """(id, argument index, function making the bad tensor from the good one), for the dims and
    dtypes each argument really has; op.no_mutate[name] lists mutations that are legal for it
    (e.g. an extra leading dim of a broadcastable mask)."""
    out = []
    for k, (name, t) in enumerate(zip(op.arg_names, base_args(op))):
        if not isinstance(t, torch.Tensor):
            continue
        wrong_dtype = torch.int64 if t.is_floating_point() else torch.float32
        cands = [
            (f"{name}-{str(wrong_dtype)[6:]}", lambda t, d=wrong_dtype: t.to(d)),
            (f"{name}-complex64", lambda t: t.to(torch.complex64)),
            (f"{name}-extra-dim", lambda t: t.unsqueeze(0)),
            (f"{name}-one-dim-less", lambda t: t.flatten()[: t.shape[-1]] if t.dim() > 1 else t[0]),
        ]
        for d in range(t.dim()):
            if t.shape[d] > 0:
                cands.append((f"{name}-size{d}-minus-1", lambda t, d=d: t.narrow(d, 0, t.shape[d] - 1)))
            cands.append((f"{name}-size{d}-plus-1", lambda t, d=d: torch.cat([t, t.narrow(d, 0, min(1, t.shape[d]))], d)))
        skip = op.no_mutate.get(name, ())
        out += [(mid, k, f) for mid, f in cands if mid.split("-", 1)[1] not in skip]
    return out


CASES = [(op, mid, k, f) for op in OPS for mid, k, f in mutations(op)]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("op,mid,k,mutate", CASES, ids=[f"{c[0].name}-{c[1]}" for c in CASES])
def test_bad_argument_is_named(op, mid, k, mutate, backend):
    args = base_args(op)
    args[k] = mutate(args[k])
    with pyseqk.use_backend(backend):
        with pytest.raises(ERRORS) as e:
            op.fn(*args)
    assert_names(op, op.arg_names[k], e.value)


def tensor_indices(op):
    return [k for k, t in enumerate(base_args(op)) if isinstance(t, torch.Tensor)]


# A mix needs two tensors: an op of one tensor (positional_encoding) just runs on meta.
TENSOR_ARGS = [(op, k) for op in OPS if len(tensor_indices(op)) > 1 for k in tensor_indices(op)]
TENSOR_IDS = [f"{op.name}-{op.arg_names[k]}" for op, k in TENSOR_ARGS]


@pytest.mark.parametrize("op,k", TENSOR_ARGS, ids=TENSOR_IDS)
def test_meta_mixed_with_cpu_is_named(op, k):
    """One tensor on the meta device among CPU ones: torch raises, so must pyseqk (the fake
    kernel that the dispatcher picks for such a mix must not return uninitialised tensors)."""
    args = base_args(op)
    args[k] = args[k].to("meta")
    with pytest.raises(RuntimeError) as e:
        op.fn(*args)
    # the input decides the device, so a meta input is named beside the first other argument
    assert_names(op, op.arg_names[k], e.value)
    assert "meta" in str(e.value)


@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_all_meta_gives_shapes(op):
    """All tensors on meta (shape inference, e.g. for init on the meta device) works like torch.
    Sequence lengths stay on the CPU, where they are documented to live."""
    args = [a.to("meta") if isinstance(a, torch.Tensor) and a.dtype != torch.int64 else a
            for a in base_args(op)]
    ours = outputs(op.fn(*args))
    theirs = outputs(op.torch_fn(*args))
    assert [o.shape for o in ours] == [t.shape for t in theirs]
    assert all(o.device.type == "meta" for o in ours)


def backward_sum(outs, args):
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    total = sum((o.double() * (i + 1)).sum() for i, o in enumerate(outs))
    if not total.requires_grad:  # no output depends on an input (an empty sequence)
        return [torch.zeros_like(a) for a in leaves]
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    return [torch.zeros_like(a) if g is None else g for a, g in zip(leaves, grads)]


def ours_and_torch(op, backend, args, grads=True):
    def run(fn):
        a = [t.detach().clone().requires_grad_(grads) if is_float(t) else t for t in args]
        outs = outputs(fn(*a))
        return [o.detach() for o in outs], (backward_sum(outs, a) if grads else None)

    with pyseqk.use_backend(backend):
        ours = run(op.fn)
    return ours, run(op.torch_fn)


def is_float(t):
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def noncontiguous(t):
    """The same values, not contiguous: the last two dimensions stored transposed for matrices
    and batches of them, every other element of a twice-as-long buffer for vectors."""
    if t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    wide = torch.empty(t.shape[0] * 2, dtype=t.dtype)
    wide[::2] = t
    return wide[::2]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_noncontiguous_and_expanded_inputs(op, backend):
    for k in tensor_indices(op):
        name = op.arg_names[k]
        for how in ("noncontiguous", "expanded", "sliced"):
            args = base_args(op)
            t = args[k]
            if how == "noncontiguous":
                args[k] = noncontiguous(t)
            elif how == "expanded":  # stride 0: one row (or one value) repeated
                args[k] = t[:1].expand(t.shape)
            elif t.dim() >= 2:  # a column slice of a wider tensor (row stride > width)
                args[k] = torch.cat([t, t], -1)[..., : t.shape[-1]]
            else:  # one column of a matrix
                args[k] = torch.stack([t, t], 1)[:, 0]
            assert not args[k].is_contiguous() or t.numel() <= 1, (name, how)
            (o, og), (tt, tg) = ours_and_torch(op, backend, args)
            for a, b in zip(o, tt):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{name} {how}")
            for a, b in zip(og, tg):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"grad, {name} {how}")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_nan_and_inf_like_torch(op, backend):
    """NaN and +-inf in each floating-point argument propagate exactly where torch's do."""
    for k, t in enumerate(base_args(op)):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            continue
        args = base_args(op)
        t = args[k].clone()
        flat = t.view(-1)
        flat[0], flat[min(4, flat.numel() - 1)], flat[-1] = float("nan"), float("inf"), float("-inf")
        args[k] = t
        (o, _), (tt, _) = ours_and_torch(op, backend, args, grads=False)
        for a, b in zip(o, tt):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, equal_nan=True,
                                       msg=f"{op.arg_names[k]} with NaN/inf")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_empty_batch_like_torch(op, backend):
    sizes = dict(op.default_sizes, B=0)
    args = base_args(op, sizes=sizes)
    (o, og), (tt, tg) = ours_and_torch(op, backend, args)
    assert [a.shape for a in o] == [b.shape for b in tt]
    for a, b in zip(og, tg):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.shape == b.shape and torch.equal(a, b)  # all zero


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_huge_preactivations_saturate_like_torch(op, backend, dtype):
    """Pre-activations of +-1e4 (and, in float32, +-1e30): sigmoid/tanh saturate with no NaN or
    inf where torch has none, and the gradients stay finite."""
    for scale in (1e4,) + ((1e30,) if dtype == torch.float32 else ()):
        args = base_args(op, dtype=dtype)
        args[0] = (args[0].float() * scale).to(dtype)
        (o, og), (tt, tg) = ours_and_torch(op, backend, args)
        for a, b in zip(o, tt):
            assert torch.equal(a.isfinite(), b.isfinite()), f"scale {scale}"
            if op.saturates:
                torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=2e-2, equal_nan=True)
            else:  # relu, positional encoding pass 1e30 through: compare relatively
                rtol = max(2 * torch.finfo(dtype).eps, 1e-5)  # 2 ulp; fp32 GEMM sums: more
                torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=2e-2, equal_nan=True)
        for a, b in zip(og, tg):
            if a is not None:
                assert torch.equal(a.isfinite(), b.isfinite()), f"grad, scale {scale}"


# ---------------------------------------------------------------------------------------------
# Modules: the error type torch raises (so `except` clauses written for torch.nn keep working)
# and a message naming what was wrong.

def module_pair(case, **over):
    kw = {**case.kwargs, **over}
    torch.manual_seed(0)
    t = case.torch_cls(**kw)
    torch.manual_seed(0)
    return t, case.pyseqk_cls(**kw)


def _replace_hidden(hx, fn):
    return tuple(fn(h) for h in hx) if isinstance(hx, tuple) else fn(hx)


MODULE_BAD = [  # id, function of (module, x, hx) -> forward args
    ("input-3d", lambda m, x, hx: (x.unsqueeze(0), hx)),
    ("input-0d", lambda m, x, hx: (x[0, 0], hx)),
    ("input-size", lambda m, x, hx: (x[:, :-1], hx)),
    ("input-int", lambda m, x, hx: (x.long(), hx)),
    ("input-complex", lambda m, x, hx: (x.to(torch.complex64), hx)),
    ("input-float64", lambda m, x, hx: (x.double(), hx)),
    ("hx-batch", lambda m, x, hx: (x, _replace_hidden(hx, lambda h: h[:-1]))),
    ("hx-size", lambda m, x, hx: (x, _replace_hidden(hx, lambda h: h[:, :-1]))),
    ("hx-3d", lambda m, x, hx: (x, _replace_hidden(hx, lambda h: h.unsqueeze(0)))),
    ("hx-dtype", lambda m, x, hx: (x, _replace_hidden(hx, lambda h: h.double()))),
    ("hx-meta", lambda m, x, hx: (x, _replace_hidden(hx, lambda h: h.to("meta")))),
    ("input-meta", lambda m, x, hx: (x.to("meta"), hx)),
]


DTYPE_CASES = {"input-int", "input-complex", "input-float64", "hx-dtype"}


def _has_second_input(case):
    t, _ = module_pair(case)
    return len(case.make_input(t, 3)) > 1


# "hx" is a module's second forward argument: the state of a recurrent module, the key of an
# attention module (whose value then follows unchanged). Modules of one input get the input cases.
MODULE_BAD_CASES = [(case, bad_id, bad) for case in MODULES for bad_id, bad in MODULE_BAD
                    if not bad_id.startswith("hx-") or _has_second_input(case)]


@pytest.mark.parametrize("case,bad_id,bad", MODULE_BAD_CASES,
                         ids=[f"{c.id}-{b}" for c, b, _ in MODULE_BAD_CASES])
def test_module_bad_input_like_torch(case, bad_id, bad):
    t, p = module_pair(case)
    x, *rest = case.make_input(t, 3)
    args = bad(t, x, rest[0] if rest else None)
    args = (*args, *rest[1:]) if rest else args[:1]
    try:
        expected = t(*args)
    except Exception as e:  # noqa: BLE001 - torch's type is what pyseqk must match
        # A known difference: a wrong dtype is a TypeError in pyseqk (TORCH_CHECK_TYPE), where
        # torch.nn's cells fail inside a GEMM with a RuntimeError.
        allowed = (type(e), TypeError) if bad_id in DTYPE_CASES else type(e)
        with pytest.raises(allowed) as ep:
            p(*args)
        assert "pyseqk" in str(ep.value) or str(e).split(" ")[0] in str(ep.value) or len(str(ep.value)) > 20, (
            f"unhelpful error: {ep.value!r} (torch: {e!r})")
        return
    # torch accepts it: pyseqk must give the same values, or raise where torch's are wrong. A
    # mix of meta and CPU tensors is never a right answer (torch's bias-free RNNCell returns a
    # meta or an uninitialised CPU tensor for it).
    tensors = [a for a in args if isinstance(a, torch.Tensor)] + list(p.parameters())
    tensors += [h for a in args if isinstance(a, tuple) for h in a]
    if len({t.device for t in tensors}) > 1:
        with pytest.raises(RuntimeError, match="meta"):
            p(*args)
        return
    ours = p(*args)
    for a, b in zip(outputs(ours), outputs(expected)):
        assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
        if a.device.type != "meta":
            torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# The backward ops, called directly: every tensor they index is checked (a wrong shape used to
# read and write past buffers), and non-contiguous saved tensors give the same gradients.

BACKWARD_CASES = [(op, k) for op in OPS if op.name in BACKWARDS
                  for k, a in enumerate(BACKWARDS[op.name](base_args(op))[1]) if isinstance(a, torch.Tensor)]


def backward_call(op, prefix, k=None, mutate=None):
    import pyseqk._triton_ops  # noqa: F401  (defines the triton_ twins)

    name, args, names = BACKWARDS[op.name](base_args(op))
    if k is not None:
        args[k] = mutate(args[k])
    return getattr(torch.ops.pyseqk, prefix + name), args, names


@pytest.mark.parametrize("prefix", ["", "triton_"] if "triton" in cpu_backends() else [""])
@pytest.mark.parametrize("how", ["size0", "size1", "dtype"])
@pytest.mark.parametrize("op,k", BACKWARD_CASES, ids=[f"{c[0].name}-{c[1]}" for c in BACKWARD_CASES])
def test_backward_op_checks_its_arguments(op, k, how, prefix):
    mutate = {"size0": lambda t: t.narrow(0, 0, t.shape[0] - 1),
              "size1": lambda t: t.narrow(-1, 0, t.shape[-1] - 1),
              "dtype": lambda t: t.double()}[how]
    fn, args, names = backward_call(op, prefix, k, mutate)
    with pytest.raises(ERRORS) as e:
        fn(*args)
    assert_names(op, names[k], e.value)


@pytest.mark.parametrize("prefix", ["", "triton_"] if "triton" in cpu_backends() else [""])
@pytest.mark.parametrize("op", [op for op in OPS if op.name in BACKWARDS], ids=lambda op: op.name)
def test_backward_op_noncontiguous(op, prefix):
    fn, args, names = backward_call(op, prefix)
    expected = fn(*args)
    for k, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.dim() == 2:
            bad = list(args)
            bad[k] = noncontiguous(a)
            for x, y in zip(fn(*bad), expected):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=f"{names[k]} non-contiguous")
