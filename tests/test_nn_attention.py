"""pyseqk.nn.MultiheadAttention is drop-in for torch.nn.MultiheadAttention: constructor,
parameters, initialisation, state_dict; outputs, attention weights and gradients (inputs and
parameters) across the constructor options (bias, add_bias_kv, add_zero_attn, kdim/vdim,
batch_first) and the forward options (batched/unbatched, bool/float attn_mask [L, S] and
[B*H, L, S], key_padding_mask, both merged, is_causal, need_weights, average_attn_weights);
dropout; the errors torch raises for bad input."""
import warnings

import pytest
import torch

import pyseqk
from conftest import cpu_backends

E, H, L, S, B = 12, 3, 5, 7, 2

CONFIGS = {
    "plain": {},
    "no_bias": {"bias": False},
    "bias_kv": {"add_bias_kv": True},
    "zero_attn": {"add_zero_attn": True},
    "bias_kv_zero_attn": {"add_bias_kv": True, "add_zero_attn": True},
    "kdim_vdim": {"kdim": 5, "vdim": 4},
    "batch_first": {"batch_first": True},
    "batch_first_kdim": {"batch_first": True, "kdim": 6, "vdim": 6},
}


def pair(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    t = torch.nn.MultiheadAttention(E, H, dtype=dtype, **kw)
    torch.manual_seed(0)
    p = pyseqk.nn.MultiheadAttention(E, H, dtype=dtype, **kw)
    return t, p


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_same_parameters_init_and_state_dict(cfg):
    t, p = pair(**cfg)
    assert isinstance(p, torch.nn.MultiheadAttention)
    assert [n for n, _ in t.named_parameters()] == [n for n, _ in p.named_parameters()]
    assert list(t.state_dict()) == list(p.state_dict())
    for (n, a), (_, b) in zip(t.state_dict().items(), p.state_dict().items()):
        assert torch.equal(a, b), n
    assert repr(t) == repr(p)
    p.load_state_dict(t.state_dict())
    t.load_state_dict(p.state_dict())


def inputs(cfg, batched, same_qkv, dtype=torch.float32):
    """query/key/value in the module's layout, with requires_grad."""
    kd, vd = cfg.get("kdim", E), cfg.get("vdim", E)
    bf = cfg.get("batch_first", False) and batched

    def make(T, D):
        shape = ((B, T, D) if bf else (T, B, D)) if batched else (T, D)
        return torch.randn(shape, dtype=dtype, requires_grad=True)

    if same_qkv and kd == E and vd == E:
        x = make(L, E)
        return x, x, x
    return make(L, E), make(S, kd), make(S, vd)


def masks(kind, batched, Sq, Sk, dtype=torch.float32):
    """(attn_mask, key_padding_mask) for a mask kind; Sq/Sk are the query/key lengths."""
    g = torch.Generator().manual_seed(1)
    nb = B if batched else 1
    if kind == "none":
        return None, None
    if kind == "bool2d":
        m = torch.rand(Sq, Sk, generator=g) < 0.3
        m[:, 0] = False  # every query keeps a key
        return m, None
    if kind == "float2d":
        return torch.randn(Sq, Sk, generator=g, dtype=dtype), None
    if kind == "bool3d":
        m = torch.rand(nb * H, Sq, Sk, generator=g) < 0.3
        m[..., 0] = False
        return m, None
    if kind == "float3d":
        return torch.randn(nb * H, Sq, Sk, generator=g, dtype=dtype), None
    kpm = torch.zeros(nb, Sk, dtype=torch.bool)
    kpm[-1, Sk - 2:] = True
    kpm = kpm if batched else kpm[0]
    if kind == "kpm_bool":
        return None, kpm
    if kind == "kpm_float":
        return None, torch.zeros(kpm.shape, dtype=dtype).masked_fill(kpm, float("-inf"))
    if kind == "both_bool":
        return torch.ones(Sq, Sk, dtype=torch.bool).triu(1), kpm
    if kind == "both_float3d":
        am = torch.randn(nb * H, Sq, Sk, generator=g, dtype=dtype)
        return am, torch.zeros(kpm.shape, dtype=dtype).masked_fill(kpm, float("-inf"))
    if kind == "causal":
        return torch.nn.Transformer.generate_square_subsequent_mask(Sq, dtype=dtype), None
    raise AssertionError(kind)


def run(m, q, k, v, **kw):
    out, w = m(q, k, v, **kw)
    loss = out.square().sum() + (0 if w is None else (w * torch.linspace(0, 1, w.shape[-1])).sum())
    params = [p for p in m.parameters()]
    grads = torch.autograd.grad(loss, [t for t in {id(x): x for x in (q, k, v)}.values()] + params,
                                allow_unused=True)
    return out, w, grads


def check(t, p, q, k, v, atol=1e-5, rtol=1e-4, **kw):
    out_t, w_t, g_t = run(t, q, k, v, **kw)
    out_p, w_p, g_p = run(p, q, k, v, **kw)
    torch.testing.assert_close(out_p, out_t, atol=atol, rtol=rtol)
    assert (w_t is None) == (w_p is None)
    if w_t is not None:
        torch.testing.assert_close(w_p, w_t, atol=atol, rtol=rtol)
    for a, b in zip(g_p, g_t):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("need_weights,average", [(True, True), (True, False), (False, True)])
def test_matches_torch_across_constructor_options(cfg, batched, need_weights, average):
    t, p = pair(**cfg)
    q, k, v = inputs(cfg, batched, same_qkv=False)
    am, kpm = masks("both_bool", batched, L, S)
    if batched and not need_weights:
        am = None  # also cover the kpm-only mask merge
    check(t, p, q, k, v, need_weights=need_weights, average_attn_weights=average,
          attn_mask=am, key_padding_mask=kpm)


MASK_KINDS = ["none", "bool2d", "float2d", "bool3d", "float3d", "kpm_bool", "kpm_float",
              "both_bool", "both_float3d"]


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_masks_match_torch(kind, batched, need_weights):
    cfg = {"add_zero_attn": True} if kind.startswith("both") else {}
    t, p = pair(**cfg)
    q, k, v = inputs(cfg, batched, same_qkv=True)
    am, kpm = masks(kind, batched, L, L)
    check(t, p, q, k, v, need_weights=need_weights, attn_mask=am, key_padding_mask=kpm)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("with_kpm", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_is_causal_hint_matches_torch(need_weights, with_kpm, batch_first):
    t, p = pair(batch_first=batch_first)
    q, k, v = inputs({"batch_first": batch_first}, True, same_qkv=True)
    am, kpm = masks("kpm_bool" if with_kpm else "causal", True, L, L)
    if with_kpm:
        am = torch.ones(L, L, dtype=torch.bool).triu(1)
    check(t, p, q, k, v, need_weights=need_weights, attn_mask=am, key_padding_mask=kpm,
          is_causal=True)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kind", ["none", "bool3d", "both_float3d", "causal"])
def test_backends_need_weights_false(backend, kind):
    """The path that goes through pyseqk.functional.scaled_dot_product_attention, per backend."""
    cfg = {"batch_first": True, "add_zero_attn": kind == "both_float3d"}
    t, p = pair(**cfg)
    q, k, v = inputs(cfg, True, same_qkv=True)
    am, kpm = masks(kind, True, L, L)
    with pyseqk.use_backend(backend):
        check(t, p, q, k, v, need_weights=False, attn_mask=am, key_padding_mask=kpm,
              is_causal=kind == "causal")


def test_float64_exact_enough():
    t, p = pair(dtype=torch.float64, add_bias_kv=True)
    q, k, v = inputs({}, True, same_qkv=False, dtype=torch.float64)
    am, kpm = masks("both_float3d", True, L, S, dtype=torch.float64)
    check(t, p, q, k, v, atol=1e-12, rtol=1e-10, need_weights=False, attn_mask=am,
          key_padding_mask=kpm)


def test_dropout_weights_path_is_torchs():
    """need_weights=True draws dropout from torch's RNG exactly as torch does."""
    t, p = pair(dropout=0.5)
    q, k, v = inputs({}, True, same_qkv=True)
    torch.manual_seed(3)
    out_t, w_t = t(q, k, v)
    torch.manual_seed(3)
    out_p, w_p = p(q, k, v)
    torch.testing.assert_close(out_p, out_t)
    torch.testing.assert_close(w_p, w_t)


def test_dropout_fused_path():
    """need_weights=False drops inside SDPA: in training the output changes (and stays finite,
    with gradients), in eval dropout is off and the output is torch's."""
    t, p = pair(dropout=0.5)
    q, k, v = inputs({}, True, same_qkv=True)
    p.eval()
    t.eval()
    ref = t(q, k, v, need_weights=False)[0]
    torch.testing.assert_close(p(q, k, v, need_weights=False)[0], ref, atol=1e-5, rtol=1e-4)
    p.train()
    out = p(q, k, v, need_weights=False)[0]
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() > 1e-3
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_forward_never_takes_torch_fast_path(monkeypatch):
    """Eval, batched, batch_first, self-attention, no grad: exactly when torch.nn's module would
    call torch._native_multi_head_attention; pyseqk must route through its own SDPA instead."""
    t, p = pair(batch_first=True)
    t.eval()
    p.eval()
    x = torch.randn(B, L, E)
    calls = []
    real = pyseqk.functional.scaled_dot_product_attention
    monkeypatch.setattr(pyseqk.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))

    def boom(*a, **k):
        raise AssertionError("torch fast path taken")

    with torch.no_grad():
        ref = t(x, x, x, need_weights=False)[0]
        monkeypatch.setattr(torch, "_native_multi_head_attention", boom)
        out = p(x, x, x, need_weights=False)[0]
    assert calls, "pyseqk SDPA was not called"
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_compile_fullgraph():
    _, p = pair(batch_first=True)
    x = torch.randn(B, L, E, requires_grad=True)
    am = masks("causal", True, L, L)[0]
    f = torch.compile(lambda x: p(x, x, x, need_weights=False, attn_mask=am, is_causal=True)[0],
                      fullgraph=True, backend="aot_eager")
    out = f(x)
    ref = p(x, x, x, need_weights=False, attn_mask=am, is_causal=True)[0]
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert x.grad is not None


def outcome(fn):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
    except Exception as e:  # noqa: BLE001  (the type and message are what is compared)
        return type(e), str(e)
    return None


BAD = {
    "query_4d": lambda: (torch.randn(1, L, B, E), None, None),
    "key_2d_for_3d_query": lambda: (torch.randn(L, B, E), torch.randn(S, E), None),
    "kpm_3d": lambda: (torch.randn(L, B, E), None, {"key_padding_mask": torch.zeros(B, 1, L, dtype=torch.bool)}),
    "kpm_wrong_batch": lambda: (torch.randn(L, B, E), None, {"key_padding_mask": torch.zeros(B + 1, L, dtype=torch.bool)}),
    "kpm_wrong_len": lambda: (torch.randn(L, B, E), None, {"key_padding_mask": torch.zeros(B, L + 1, dtype=torch.bool)}),
    "mask_2d_shape": lambda: (torch.randn(L, B, E), None, {"attn_mask": torch.zeros(L, L + 1)}),
    "mask_3d_shape": lambda: (torch.randn(L, B, E), None, {"attn_mask": torch.zeros(H, L, L)}),
    "mask_4d": lambda: (torch.randn(L, B, E), None, {"attn_mask": torch.zeros(1, 1, L, L)}),
    "mask_int": lambda: (torch.randn(L, B, E), None, {"attn_mask": torch.zeros(L, L, dtype=torch.int64)}),
    "unbatched_mask_3d_shape": lambda: (torch.randn(L, E), None, {"attn_mask": torch.zeros(2 * H, L, L)}),
    "embed_dim": lambda: (torch.randn(L, B, E + 1), None, None),
    "causal_without_mask": lambda: (torch.randn(L, B, E), None, {"is_causal": True}),
    "kv_shape_mismatch": lambda: (torch.randn(L, B, E), torch.randn(S, B, E), {"value": torch.randn(S + 1, B, E)}),
}


@pytest.mark.parametrize("name", BAD.keys())
@pytest.mark.parametrize("need_weights", [True, False])
def test_bad_input_raises_like_torch(name, need_weights):
    t, p = pair()
    q, k, kw = BAD[name]()
    kw = dict(kw or {})
    k = q if k is None else k
    v = kw.pop("value", k)
    kw["need_weights"] = need_weights
    expected = outcome(lambda: t(q, k, v, **kw))
    assert expected is not None, f"torch accepts {name}"
    assert outcome(lambda: p(q, k, v, **kw)) == expected


def test_mixed_mask_types_warn_like_torch():
    t, p = pair()
    x = torch.randn(L, B, E)
    am, kpm = masks("both_bool", True, L, L)
    for m in (t, p):
        with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
            m(x, x, x, attn_mask=am.float(), key_padding_mask=kpm)


def test_convert_swaps_and_keeps_state():
    model = torch.nn.Sequential(torch.nn.MultiheadAttention(E, H))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    pyseqk.convert(model)
    assert type(model[0]) is pyseqk.nn.MultiheadAttention
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k])
