"""The drop-in modules on a CUDA device, every GPU backend, at sizes that fill more than one block:
pyseqk.nn modules against torch.nn's on the same weights (torch on the GPU in the same dtype, and
torch in float64 on the CPU as the oracle), outputs and every gradient, by the FlashAttention rule
(our error at most twice torch's own plus a small atol). Also torch.compile(fullgraph=True) on the
GPU and the functional SDPA with broadcast masks and leading batch dims.

All tests here are @pytest.mark.gpu: they skip without a GPU, and fail without one under
PYSEQK_REQUIRE_CUDA=1."""
import copy

import pytest
import torch
import torch.nn.functional as TF
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import pyseqk
from pyseqk import functional as F
from _util import assert_close_rule, max_err
from conftest import cuda_backends

pytestmark = pytest.mark.gpu
HALF = [torch.float32, torch.bfloat16, torch.float16]


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (tuple, list)):
        return [t for x in tree for t in _tensors(x)]
    return []


def run_module(m, make_args, dtype, device, seed=1):
    """Outputs (a flat list) and gradients (inputs first, then parameters in order) of
    sum(out * fixed random weights) for module m moved to (dtype, device)."""
    m = m.to(device=device, dtype=dtype)
    args, leaves = make_args(dtype, device)
    outs = [o for o in _tensors(m(*args)) if o.is_floating_point()]
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(device)).sum() for o in outs)
    params = [p for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, leaves + params, allow_unused=True)
    return [o.detach().cpu() for o in outs], [None if x is None else x.cpu() for x in grads]


def compare_modules(tmod, pmod, make_args, dtype, backend, what, chaotic=False):
    """chaotic: the problem amplifies rounding (a two-layer ReLU RNN in fp16: a rounded hidden
    value flips a ReLU, and torch's own gradient errors reach 100 ulp, differently per tensor
    and seed). Each gradient's base error is then torch's largest relative gradient error over
    the module times this tensor's scale, instead of torch's error on this one tensor."""
    with pyseqk.use_backend(backend):
        ours, ours_g = run_module(copy.deepcopy(pmod), make_args, dtype, "cuda")
    theirs, theirs_g = run_module(copy.deepcopy(tmod), make_args, dtype, "cuda")
    oracle, oracle_g = run_module(copy.deepcopy(tmod), make_args, torch.float64, "cpu")
    assert len(ours) == len(oracle) and len(ours_g) == len(oracle_g)
    for i, (a, t, r) in enumerate(zip(ours, theirs, oracle)):
        assert_close_rule(a, t, r, dtype, f"{what} {backend} {dtype} output {i}")
    rel = max((max_err(t, r) / r.abs().max().item() for t, r in zip(theirs_g, oracle_g)
               if r is not None and r.abs().max() > 0), default=0.0)
    for i, (a, t, r) in enumerate(zip(ours_g, theirs_g, oracle_g)):
        if chaotic and r is not None:
            t = r + rel * r.abs().max().item()  # a stand-in with exactly that error
        assert_close_rule(a, t, r, dtype, f"{what} {backend} {dtype} grad {i}")


def leaf_maker(*shapes, seed=0):
    def make(dtype, device):
        g = torch.Generator().manual_seed(seed)
        leaves = [torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
                  .requires_grad_() for s in shapes]
        return leaves, leaves
    return make


# ----------------------------------------------------------------------------- recurrent layers

RNN_MODES = {
    "lstm": (torch.nn.LSTM, pyseqk.nn.LSTM, {}),
    "lstm_proj": (torch.nn.LSTM, pyseqk.nn.LSTM, {"proj_size": 48}),
    "gru": (torch.nn.GRU, pyseqk.nn.GRU, {}),
    "rnn_tanh": (torch.nn.RNN, pyseqk.nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (torch.nn.RNN, pyseqk.nn.RNN, {"nonlinearity": "relu"}),
}


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("mode", list(RNN_MODES))
@pytest.mark.parametrize("backend", cuda_backends())
def test_rnn_modules_match_torch_cuda(backend, mode, dtype):
    """Two layers, bidirectional, batch_first, T=37 B=19 I=40 H=96: odd sizes past one tile."""
    tcls, pcls, extra = RNN_MODES[mode]
    kw = dict(num_layers=2, bidirectional=True, batch_first=True, **extra)
    torch.manual_seed(0)
    t = tcls(40, 96, **kw)
    torch.manual_seed(0)
    p = pcls(40, 96, **kw)
    compare_modules(t, p, leaf_maker((19, 37, 40)), dtype, backend, mode,
                    chaotic=mode == "rnn_relu" and dtype == torch.float16)


@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("backend", cuda_backends())
def test_rnn_packed_unsorted_cuda(backend, mode):
    """PackedSequence with unsorted lengths on the GPU: outputs, final states, gradients."""
    tcls, pcls, extra = RNN_MODES[mode]
    torch.manual_seed(0)
    t = tcls(24, 64, num_layers=2, **extra)
    torch.manual_seed(0)
    p = pcls(24, 64, num_layers=2, **extra)
    lengths = torch.tensor([5, 33, 1, 17, 33, 8])

    class Packed(torch.nn.Module):
        def __init__(self, rnn):
            super().__init__()
            self.rnn = rnn

        def forward(self, x):
            out, h = self.rnn(pack_padded_sequence(x, lengths, enforce_sorted=False))
            return pad_packed_sequence(out)[0], h

    compare_modules(Packed(t), Packed(p), leaf_maker((33, 6, 24)), torch.float32, backend, mode)


# ----------------------------------------------------------------------------- attention modules

class MHA(torch.nn.Module):
    """Self-attention with a key padding mask and a causal float mask, need_weights=False."""

    def __init__(self, cls, E, H):
        super().__init__()
        torch.manual_seed(0)
        self.m = cls(E, H, batch_first=True)

    def forward(self, x):
        B, L, _ = x.shape
        kpm = torch.zeros(B, L, dtype=x.dtype, device=x.device)
        kpm[0, L // 2:] = float("-inf")
        causal = torch.nn.Transformer.generate_square_subsequent_mask(L, device=x.device,
                                                                      dtype=x.dtype)
        return self.m(x, x, x, key_padding_mask=kpm, attn_mask=causal, need_weights=False)[0]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("backend", cuda_backends())
def test_multihead_attention_matches_torch_cuda(backend, dtype):
    t = MHA(torch.nn.MultiheadAttention, 128, 4)
    p = MHA(pyseqk.nn.MultiheadAttention, 128, 4)
    compare_modules(t, p, leaf_maker((3, 200, 128)), dtype, backend, "mha")


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", cuda_backends())
def test_transformer_matches_torch_cuda(backend, dtype, norm_first):
    """A whole nn.Transformer (2+2 layers, d=64, 4 heads), causal target mask, dropout off."""
    kw = dict(d_model=64, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
              dim_feedforward=128, dropout=0.0, batch_first=True, norm_first=norm_first)
    torch.manual_seed(0)
    t = torch.nn.Transformer(**kw)
    torch.manual_seed(0)
    p = pyseqk.nn.Transformer(**kw)

    class Seq(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, src, tgt):
            mask = torch.nn.Transformer.generate_square_subsequent_mask(
                tgt.shape[1], device=tgt.device, dtype=tgt.dtype)
            return self.m(src, tgt, tgt_mask=mask, tgt_is_causal=True)

    compare_modules(Seq(t), Seq(p), leaf_maker((2, 70, 64), (2, 45, 64)), dtype, backend,
                    "transformer")


# ----------------------------------------------------------------------------- functional SDPA

@pytest.mark.parametrize("mask_kind", ["bool_heads", "float_rows", "none_causal"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("backend", cuda_backends())
def test_functional_sdpa_leading_dims_and_masks_cuda(backend, dtype, mask_kind):
    """Two leading batch dims, a mask broadcast over some of them, L != S, head dim 72."""
    shape_q, shape_kv = (2, 3, 4, 150, 72), (2, 3, 4, 260, 72)
    g = torch.Generator().manual_seed(3)
    if mask_kind == "bool_heads":
        mask = torch.rand(1, 3, 4, 1, 260, generator=g) > 0.3
        mask[..., 0] = True
    elif mask_kind == "float_rows":
        mask = torch.randn(150, 260, generator=g)
    else:
        mask = None
    causal = mask is None

    def make(dtype, device):
        leaves, _ = leaf_maker(shape_q, shape_kv, shape_kv, seed=4)(dtype, device)
        m = None if mask is None else mask.to(device=device,
                                              dtype=mask.dtype if mask.dtype == torch.bool else dtype)
        return leaves + [m], leaves

    class Ours(torch.nn.Module):
        def forward(self, q, k, v, m):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal)

    class Theirs(torch.nn.Module):
        def forward(self, q, k, v, m):
            return TF.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal)

    compare_modules(Theirs(), Ours(), make, dtype, backend, f"sdpa {mask_kind}")


# ----------------------------------------------------------------------------- torch.compile

@pytest.mark.parametrize("backend", cuda_backends())
def test_compile_fullgraph_cuda(backend):
    """torch.compile(fullgraph=True) of an LSTM + MultiheadAttention model on the GPU gives the
    eager outputs and gradients."""

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = pyseqk.nn.LSTM(32, 64, batch_first=True)
            self.attn = pyseqk.nn.MultiheadAttention(64, 4, batch_first=True)

        def forward(self, x):
            h = self.rnn(x)[0]
            return self.attn(h, h, h, need_weights=False, is_causal=True,
                             attn_mask=torch.nn.Transformer.generate_square_subsequent_mask(
                                 h.shape[1], device=h.device))[0]

    torch.manual_seed(0)
    m = Model().cuda()
    x = torch.randn(4, 50, 32, device="cuda", requires_grad=True)
    with pyseqk.use_backend(backend):
        eager = m(x)
        ge = torch.autograd.grad(eager.square().sum(), [x] + list(m.parameters()))
        torch._dynamo.reset()
        compiled = torch.compile(m, fullgraph=True)
        out = compiled(x)
        gc = torch.autograd.grad(out.square().sum(), [x] + list(m.parameters()))
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
