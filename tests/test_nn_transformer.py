"""pyseqk.nn Transformer modules are drop-in for torch.nn's: same constructor, parameters,
initialisation and state_dict; same outputs and gradients in eval and in training with
dropout 0, across norm_first, activations (relu, gelu, a callable), batch_first, unbatched
input, masks (causal, padding, both); torch's fast paths are never taken; torch.compile."""
import pytest
import torch
import torch.nn.functional as TF

import pyseqk

D, NH, FF, B, S, T = 12, 2, 20, 3, 6, 5

LAYER_OPTS = {
    "post_relu": {},
    "pre_gelu": {"norm_first": True, "activation": "gelu"},
    "callable_bf": {"activation": lambda x: TF.silu(x), "batch_first": True},
    "gelu_fn_bf_nobias": {"activation": TF.gelu, "batch_first": True, "bias": False},
}


def make(kind, opts, pyseqk_side, dropout=0.0, layers=2):
    ns = pyseqk.nn if pyseqk_side else torch.nn
    torch.manual_seed(0)
    kw = dict(dropout=dropout, dim_feedforward=FF, **opts)
    if kind == "enc_layer":
        return ns.TransformerEncoderLayer(D, NH, **kw)
    if kind == "dec_layer":
        return ns.TransformerDecoderLayer(D, NH, **kw)
    if kind == "encoder":
        layer = ns.TransformerEncoderLayer(D, NH, **kw)
        return ns.TransformerEncoder(layer, layers, norm=torch.nn.LayerNorm(D),
                                     enable_nested_tensor=False)
    if kind == "decoder":
        return ns.TransformerDecoder(ns.TransformerDecoderLayer(D, NH, **kw), layers)
    if kind == "transformer":
        return ns.Transformer(D, NH, layers, layers, **kw)
    raise AssertionError(kind)


KINDS = ["enc_layer", "dec_layer", "encoder", "decoder", "transformer"]


def seq(n, bf, batched=True, requires_grad=True):
    shape = ((B, n, D) if bf else (n, B, D)) if batched else (n, D)
    return torch.randn(shape, requires_grad=requires_grad)


def kpm(n, batched=True):
    m = torch.zeros(B, n, dtype=torch.bool)
    m[1, n - 2:] = True
    m[2, n - 1:] = True
    return m if batched else m[1]


def causal(n):
    return torch.nn.Transformer.generate_square_subsequent_mask(n)


def call(kind, m, bf, batched, masked):
    """Run ``m`` on fresh inputs (same for both sides thanks to the seed); return the output and
    the inputs."""
    torch.manual_seed(1)
    src, tgt = seq(S, bf, batched), seq(T, bf, batched)
    kw = {}
    if kind in ("enc_layer", "encoder"):
        if masked:
            kw = {"src_key_padding_mask": kpm(S, batched)}
            kw["mask" if kind == "encoder" else "src_mask"] = causal(S) == float("-inf")
        return m(src, **kw), (src,)
    if kind in ("dec_layer", "decoder"):
        if masked:
            kw = {"tgt_mask": causal(T), "tgt_is_causal": True,
                  "memory_key_padding_mask": kpm(S, batched).float().masked_fill(kpm(S, batched), float("-inf")),
                  "tgt_key_padding_mask": torch.zeros(T if not batched else (B, T))}
        return m(tgt, src, **kw), (tgt, src)
    if masked:
        kw = {"src_key_padding_mask": kpm(S, batched), "memory_key_padding_mask": kpm(S, batched),
              "tgt_mask": causal(T) == float("-inf"), "src_mask": torch.zeros(S, S, dtype=torch.bool)}
    return m(src, tgt, **kw), (src, tgt)


def grads(out, inputs, m):
    ps = list(m.parameters())
    return torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(), list(inputs) + ps)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("opts", LAYER_OPTS.values(), ids=LAYER_OPTS.keys())
def test_same_parameters_init_state_dict(kind, opts):
    t, p = make(kind, opts, False), make(kind, opts, True)
    assert isinstance(p, type(t))
    assert list(t.state_dict()) == list(p.state_dict())
    for (n, a), (_, b) in zip(t.state_dict().items(), p.state_dict().items()):
        assert torch.equal(a, b), n
    p.load_state_dict(t.state_dict())
    t.load_state_dict(p.state_dict())
    attn = [m for m in p.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert attn and all(type(m) is pyseqk.nn.MultiheadAttention for m in attn)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("opts", LAYER_OPTS.values(), ids=LAYER_OPTS.keys())
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_matches_torch(kind, opts, masked, mode):
    t, p = make(kind, opts, False), make(kind, opts, True)
    getattr(t, mode)()
    getattr(p, mode)()
    bf = opts.get("batch_first", False)
    out_t, in_t = call(kind, t, bf, True, masked)
    out_p, in_p = call(kind, p, bf, True, masked)
    torch.testing.assert_close(out_p, out_t, atol=1e-5, rtol=1e-4)
    for a, b in zip(grads(out_p, in_p, p), grads(out_t, in_t, t)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_unbatched_matches_torch(kind):
    t, p = make(kind, {}, False), make(kind, {}, True)
    out_t, _ = call(kind, t, False, False, True)
    out_p, _ = call(kind, p, False, False, True)
    torch.testing.assert_close(out_p, out_t, atol=1e-5, rtol=1e-4)


def _forbid_fast_paths(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a torch fast path was taken")

    for name in ("_transformer_encoder_layer_fwd", "_native_multi_head_attention",
                 "_nested_tensor_from_mask"):
        monkeypatch.setattr(torch, name, boom)


@pytest.mark.parametrize("with_kpm", [False, True])
def test_no_torch_fast_path_in_inference(monkeypatch, with_kpm):
    """Eval, no grad, batch_first, relu, even heads: torch.nn takes its fused encoder path (and
    nested tensors with a padding mask); pyseqk must not, and must agree with it wherever torch's
    answer is defined (torch's nested path zeroes padded positions)."""
    opts = {"batch_first": True}
    t, p = make("encoder", opts, False), make("encoder", opts, True)
    t.use_nested_tensor = p.use_nested_tensor = True
    t.eval()
    p.eval()
    x = torch.randn(B, S, D)
    mask = kpm(S) if with_kpm else None
    calls = []
    real = pyseqk.functional.scaled_dot_product_attention
    monkeypatch.setattr(pyseqk.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        ref = t(x, src_key_padding_mask=mask)
        _forbid_fast_paths(monkeypatch)
        out = p(x, src_key_padding_mask=mask)
    assert len(calls) == 2  # one per layer
    keep = ~mask.unsqueeze(-1) if with_kpm else torch.ones(1, dtype=torch.bool)
    torch.testing.assert_close(out * keep, ref * keep, atol=1e-5, rtol=1e-4)


def test_padded_positions_match_torch_without_fast_path():
    t, p = make("encoder", {"batch_first": True}, False), make("encoder", {"batch_first": True}, True)
    t.eval()
    p.eval()
    x = torch.randn(B, S, D)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        ref = t(x, src_key_padding_mask=kpm(S))
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    torch.testing.assert_close(p(x, src_key_padding_mask=kpm(S)), ref, atol=1e-5, rtol=1e-4)


def test_dropout_training_runs_and_differs_from_eval():
    p = make("transformer", {"batch_first": True}, True, dropout=0.3)
    src, tgt = torch.randn(B, S, D), torch.randn(B, T, D)
    p.eval()
    ref = p(src, tgt)
    p.train()
    out = p(src, tgt, tgt_mask=causal(T), tgt_is_causal=True)
    assert torch.isfinite(out).all() and (out - ref).abs().max() > 1e-3
    out.sum().backward()
    assert all(q.grad is not None for q in p.parameters())


def test_transformer_custom_encoder_is_left_alone():
    custom = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(D, NH, FF), 1)
    p = pyseqk.nn.Transformer(D, NH, 1, 1, FF, custom_encoder=custom)
    assert p.encoder is custom and type(custom) is torch.nn.TransformerEncoder
    assert type(p.decoder) is pyseqk.nn.TransformerDecoder


def test_encoder_leaves_callers_layer_alone():
    layer = torch.nn.TransformerEncoderLayer(D, NH, FF)
    enc = pyseqk.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    assert type(layer) is torch.nn.TransformerEncoderLayer
    assert type(layer.self_attn) is torch.nn.MultiheadAttention
    assert all(type(m) is pyseqk.nn.TransformerEncoderLayer for m in enc.layers)


def test_convert_swaps_a_torch_transformer():
    torch.manual_seed(0)
    t = torch.nn.Transformer(D, NH, 1, 1, FF, dropout=0.0)
    src, tgt = torch.randn(S, B, D), torch.randn(T, B, D)
    ref = t(src, tgt, tgt_mask=causal(T))
    m = pyseqk.convert(t)
    assert m is t and type(t) is pyseqk.nn.Transformer
    swapped = {type(x) for x in t.modules()}
    assert {pyseqk.nn.TransformerEncoder, pyseqk.nn.TransformerDecoder,
            pyseqk.nn.TransformerEncoderLayer, pyseqk.nn.TransformerDecoderLayer,
            pyseqk.nn.MultiheadAttention} <= swapped
    assert not swapped & {torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer}
    torch.testing.assert_close(t(src, tgt, tgt_mask=causal(T)), ref, atol=1e-5, rtol=1e-4)


def test_compile_encoder_layer_forward_backward():
    p = make("enc_layer", {"batch_first": True, "norm_first": True}, True)
    x = torch.randn(B, S, D, requires_grad=True)
    mask = causal(S)

    def f(x):
        return p(x, src_mask=mask, is_causal=True)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, f(x))
    (g_c,) = torch.autograd.grad(out.sum(), x)
    (g_e,) = torch.autograd.grad(f(x).sum(), x)
    torch.testing.assert_close(g_c, g_e)


def test_bad_input_raises_like_torch():
    t, p = make("transformer", {}, False), make("transformer", {}, True)
    cases = [
        (torch.randn(S, B, D), torch.randn(T, B + 1, D), {}),
        (torch.randn(S, B, D + 1), torch.randn(T, B, D + 1), {}),
        (torch.randn(S, B, D), torch.randn(T, B, D), {"src_mask": torch.zeros(S, S + 1)}),
        (torch.randn(S, B, D), torch.randn(T, B, D), {"tgt_key_padding_mask": torch.zeros(B, T + 1, dtype=torch.bool)}),
        (torch.randn(S, B, D), torch.randn(T, B, D), {"memory_mask": torch.zeros(T, S, dtype=torch.int32)}),
    ]
    for src, tgt, kw in cases:
        errs = []
        for m in (t, p):
            with pytest.raises(Exception) as e:
                m(src, tgt, **kw)
            errs.append((e.type, str(e.value)))
        assert errs[0] == errs[1]
