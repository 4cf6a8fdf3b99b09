"""The ops and modules the reliability tests (properties, bad input, threads and determinism,
serialization, distributed, sanitizers) run over. Adding an op or a module to those checks is one
entry here: OPS for functions of pyseqk.functional, MODULES for drop-in pyseqk.nn modules, MODELS
for small models built from pyseqk layers (DDP/FSDP, torch.export, save/load).

Listed: the cells, the sequence layers, scaled dot-product attention, Luong/Bahdanau attention and
positional encoding (OPS); LSTM/GRU/RNN, MultiheadAttention, TransformerEncoderLayer (MODULES:
modules without a torch.nn twin, PositionalEncoding, Luong/BahdanauAttention, cannot be compared
with one and are covered through their ops and the attention model). To add one:
  - OPS: an OpCase with the functional entry, PyTorch's own implementation of the same thing
    (same dtype: the accuracy rule's baseline), the reference, the size ranges property tests
    draw from, and a make_args(sizes, dtype, device, bias, gen) factory. arg_names name each
    positional argument as the op's error messages do; aliases add torch's own words for one.
    Arguments may be flags (is_causal, reverse), masks and int64 lengths (kept on the CPU, where
    torch keeps them); "sizes" of range (0, 1) act as switches (a mask or lengths in some draws).
    no_mutate lists mutations that are legal for an argument (a broadcastable mask gaining a
    dim, a free sequence length), big_sizes the sizes at which the thread tests' kernels fork.
  - MODULES: (torch class, pyseqk class, constructor kwargs, input factory); the factory's second
    forward argument, if any (a state, or an attention's key), gets the "hx" bad-input cases.
  - MODELS: a factory of a small torch.nn.Module built on pyseqk layers and its input factory.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

import pyseqk
from pyseqk import functional as F
from pyseqk import reference as R


# ---------------------------------------------------------------------------------------------
# Ops


@dataclasses.dataclass(frozen=True)
class OpCase:
    name: str
    fn: Callable                      # pyseqk.functional entry
    torch_fn: Callable                # PyTorch's own implementation, same arguments
    reference: Callable               # pyseqk.reference, run in float64 as the oracle
    dims: dict                        # size name -> (min, max) for property tests
    make_args: Callable               # (sizes, dtype, device, bias, gen) -> list of arguments
    arg_names: tuple                  # name of each positional argument, as errors spell it
    optional: tuple = ()              # arguments that may be None (bias)
    aliases: dict = dataclasses.field(default_factory=dict)  # arg -> other words errors use
    triton_max: int = 4096            # the interpreter is slow: largest B*H (or similar) to run
    work: Callable = lambda s: 1      # sizes -> a number compared with triton_max
    default_sizes: dict = dataclasses.field(default_factory=dict)  # for bad-input and thread tests
    no_mutate: dict = dataclasses.field(default_factory=dict)  # arg -> legal "bad" inputs (see test_bad_input)
    big_sizes: dict = dataclasses.field(default_factory=lambda: dict(_BIG_CELL))  # threads: forks parallel_for
    saturates: bool = True            # huge first inputs saturate (tanh/sigmoid/softmax), not pass through


# Large enough that a cell call's pointwise kernel forks (at::parallel_for grain: 256 lane groups).
_BIG_CELL = {"B": 64, "I": 48, "H": 72}


def _randn(gen, shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device,
                                                                                dtype=dtype)


def _cell_args(gates, with_c):
    def make(s, dtype, device="cpu", bias=True, gen=None):
        gen = gen if gen is not None else torch.Generator().manual_seed(0)
        B, I, H = s["B"], s["I"], s["H"]
        r = lambda *shape, scale=1.0: _randn(gen, shape, dtype, device, scale)  # noqa: E731
        x, h = r(B, I), r(B, H, scale=0.5)
        c = [r(B, H, scale=0.5)] if with_c else []
        w_ih = r(gates * H, I, scale=max(I, 1) ** -0.5)
        w_hh = r(gates * H, H, scale=max(H, 1) ** -0.5)
        b = [r(gates * H, scale=0.1), r(gates * H, scale=0.1)] if bias else [None, None]
        return [x, h, *c, w_ih, w_hh, *b]

    return make


def _torch_lstm_cell(x, h, c, *w):
    return torch._VF.lstm_cell(x, (h, c), *w)


_CELL_DIMS = {"B": (0, 6), "I": (0, 24), "H": (0, 40)}
_CELL_SIZES = {"B": 3, "I": 5, "H": 7}
_CELL_ALIASES = {"hx": ("hidden0",), "input": ("Input",)}  # torch's words, which pyseqk keeps
_cell_work = lambda s: max(s["B"], 1) * s["H"]  # noqa: E731

OPS = [
    OpCase("lstm_cell", F.lstm_cell, _torch_lstm_cell, R.lstm_cell, _CELL_DIMS, _cell_args(4, True),
           ("input", "hx", "cx", "w_ih", "w_hh", "b_ih", "b_hh"), ("b_ih", "b_hh"), _CELL_ALIASES,
           work=_cell_work, default_sizes=_CELL_SIZES),
    OpCase("gru_cell", F.gru_cell, torch._VF.gru_cell, R.gru_cell, _CELL_DIMS, _cell_args(3, False),
           ("input", "hx", "w_ih", "w_hh", "b_ih", "b_hh"), ("b_ih", "b_hh"), _CELL_ALIASES,
           work=_cell_work, default_sizes=_CELL_SIZES),
    OpCase("rnn_tanh_cell", F.rnn_tanh_cell, torch._VF.rnn_tanh_cell, R.rnn_tanh_cell, _CELL_DIMS,
           _cell_args(1, False), ("input", "hx", "w_ih", "w_hh", "b_ih", "b_hh"), ("b_ih", "b_hh"),
           _CELL_ALIASES, work=_cell_work, default_sizes=_CELL_SIZES),
    OpCase("rnn_relu_cell", F.rnn_relu_cell, torch._VF.rnn_relu_cell, R.rnn_relu_cell, _CELL_DIMS,
           _cell_args(1, False), ("input", "hx", "w_ih", "w_hh", "b_ih", "b_hh"), ("b_ih", "b_hh"),
           _CELL_ALIASES, work=_cell_work, default_sizes=_CELL_SIZES, saturates=False),

]


# Sequence layers. Sizes T, B, I, H; two 0/1 "sizes" pick a lengths tensor (CPU int64, values in
# [0, T], as torch's pack_padded_sequence takes them) and the direction. Arguments are those of
# the functional entry in its order, w_hr left out (the LSTM modules cover projections).

def _layer_args(gates, with_c):
    cell = _cell_args(gates, with_c)

    def make(s, dtype, device="cpu", bias=True, gen=None):
        gen = gen if gen is not None else torch.Generator().manual_seed(0)
        T, B = s["T"], s["B"]
        x = _randn(gen, (T, B, s["I"]), dtype, device)
        _, *rest = cell(s, dtype, device, bias, gen)  # h0 [, c0], weights, biases
        lengths = torch.randint(0, T + 1, (B,), generator=gen) if s.get("lengths") else None
        return [x, *rest, lengths, bool(s.get("reverse"))]

    return make


def _torch_layer(cell, n_states):
    """The layer as PyTorch's own cells unrolled in Python, a finished sequence keeping its state
    (what torch.nn's layers compute for a PackedSequence, without packing's lengths > 0 limit)."""
    def run(x, *args):
        states, (w_ih, w_hh, b_ih, b_hh, lengths, reverse) = list(args[:n_states]), args[n_states:]
        T = x.shape[0]
        outs = [None] * T
        for t in (range(T - 1, -1, -1) if reverse else range(T)):
            new = cell(x[t], states if n_states > 1 else states[0], w_ih, w_hh, b_ih, b_hh)
            new = list(new) if n_states > 1 else [new]
            if lengths is not None:
                valid = (t < lengths.to(x.device)).unsqueeze(1)
                new = [torch.where(valid, n, s) for n, s in zip(new, states)]
                outs[t] = torch.where(valid, new[0], torch.zeros_like(new[0]))
            else:
                outs[t] = new[0]
            states = new
        out = torch.stack(outs) if T else x.new_empty(0, x.shape[1], states[0].shape[1])
        return (out, *states)

    return run


def _torch_lstm_cell2(x, hc, *w):
    return torch._VF.lstm_cell(x, tuple(hc), *w)


def _layer_fn(fn, pre=(), post=()):
    """fn(input, states..., weights..., lengths, reverse) with the keyword-only extras in place."""
    def call(*a):
        *head, lengths, reverse = a
        return fn(*head, *pre, lengths=lengths, reverse=reverse, **dict(post))

    return call


_LAYER_DIMS = {"T": (0, 5), "B": (0, 4), "I": (0, 9), "H": (0, 12), "lengths": (0, 1),
               "reverse": (0, 1)}
_LAYER_SIZES = {"T": 3, "B": 3, "I": 5, "H": 6, "lengths": 1, "reverse": 0}  # T: the interpreter runs each step
_LAYER_BIG = {"T": 3, "B": 64, "I": 48, "H": 72, "lengths": 1, "reverse": 1}
_LAYER_ALIASES = {"h0": ("hx",), "c0": ("hx", "cx")}
_layer_work = lambda s: max(s["B"], 1) * s["H"] * max(s["T"], 1)  # noqa: E731


def _layer_case(name, fn, ref, torch_cell, n_states, gates, arg_names, no_mutate=None):
    with_c = n_states == 2
    return OpCase(name, _layer_fn(fn, pre=(None,) if with_c else ()),  # w_hr=None
                  _torch_layer(torch_cell, n_states),
                  _layer_fn(ref, pre=(None,) if with_c else ()),
                  _LAYER_DIMS, _layer_args(gates, with_c),
                  arg_names + ("lengths", "reverse"), ("b_ih", "b_hh", "lengths"), _LAYER_ALIASES,
                  triton_max=256, work=_layer_work, default_sizes=_LAYER_SIZES,
                  big_sizes=_LAYER_BIG,
                  # legal: any number of steps T (lengths need only be <= T)
                  no_mutate={"input": ("size0-minus-1", "size0-plus-1"), **(no_mutate or {})})


OPS += [
    _layer_case("lstm_layer", F.lstm_layer, R.lstm_layer, _torch_lstm_cell2, 2, 4,
                ("input", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh")),
    _layer_case("gru_layer", F.gru_layer, R.gru_layer, torch._VF.gru_cell, 1, 3,
                ("input", "h0", "w_ih", "w_hh", "b_ih", "b_hh")),
    # one gate: hidden_size is read from w_ih's rows, so a w_ih of other rows is a consistent
    # layer of another size, and the mismatch is reported on w_hh
    _layer_case("rnn_layer", F.rnn_layer, R.rnn_layer, torch._VF.rnn_tanh_cell, 1, 1,
                ("input", "h0", "w_ih", "w_hh", "b_ih", "b_hh"),
                {"w_ih": ("size0-minus-1", "size0-plus-1")}),
]


# Scaled dot-product attention: q [B, H, L, E], k [B, H, S, E], v [B, H, S, Ev]; "mask" draws a
# bool [L, S] mask (broadcast over batch and heads; key 0 always attended, so no row is empty:
# torch's kernels differ there) and "causal" is_causal (torch allows one of the two at a time).

def _sdpa_args(s, dtype, device="cpu", bias=True, gen=None):
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    B, H, L, S, E, Ev = s["B"], s["H"], s["L"], s["S"], s["E"], s["Ev"]
    q = _randn(gen, (B, H, L, E), dtype, device)
    k = _randn(gen, (B, H, S, E), dtype, device)
    v = _randn(gen, (B, H, S, Ev), dtype, device)
    mask = None
    if s.get("mask"):
        mask = torch.rand(L, S, generator=gen) < 0.7
        mask[:, 0] = True
        mask = mask.to(device)
    return [q, k, v, mask, bool(s.get("causal")) and mask is None]


_SDPA_DIMS = {"B": (0, 3), "H": (1, 3), "L": (0, 9), "S": (1, 9), "E": (1, 12), "Ev": (1, 12),
              "mask": (0, 1), "causal": (0, 1)}
_SDPA_SIZES = {"B": 2, "H": 3, "L": 5, "S": 6, "E": 4, "Ev": 7, "mask": 1, "causal": 0}
_SDPA_BIG = {"B": 4, "H": 4, "L": 64, "S": 80, "E": 16, "Ev": 16, "mask": 1, "causal": 0}


def _sdpa_fn(sdpa):
    return lambda q, k, v, mask, causal: sdpa(q, k, v, attn_mask=mask, is_causal=causal)


def _sdpa_ref(q, k, v, mask, causal):
    return R.scaled_dot_product_attention(q, k, v, mask, 0.0, causal)


# Luong / Bahdanau: [B, Tq, *] queries against [B, Tk, *] keys; "mask" draws a key_padding_mask
# (True = padding, key 0 never padded: torch's softmax would give NaN rows, pyseqk zeros).

def _padding(s, gen, device):
    if not s.get("mask"):
        return None
    pad = torch.rand(s["B"], s["Tk"], generator=gen) < 0.4
    pad[:, 0] = False
    return pad.to(device)


def _luong_args(s, dtype, device="cpu", bias=True, gen=None):
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    B, Tq, Tk, H, Hv = s["B"], s["Tq"], s["Tk"], s["H"], s["Hv"]
    r = lambda *shape: _randn(gen, shape, dtype, device, max(H, 1) ** -0.25)  # noqa: E731
    return [r(B, Tq, H), r(B, Tk, H), r(B, Tk, Hv), _padding(s, gen, device)]


def _bahdanau_args(s, dtype, device="cpu", bias=True, gen=None):
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    B, Tq, Tk, H, Hv = s["B"], s["Tq"], s["Tk"], s["H"], s["Hv"]
    r = lambda *shape, scale=1.0: _randn(gen, shape, dtype, device, scale)  # noqa: E731
    return [r(B, Tq, H), r(B, Tk, H), r(H, scale=max(H, 1) ** -0.5), r(B, Tk, Hv),
            _padding(s, gen, device)]


def _torch_masked_softmax(scores, pad):
    """Softmax over the keys that are not padding; padding's weight is exactly 0 (pyseqk's
    definition, which torch's softmax also gives unless a NaN score makes the row NaN)."""
    if pad is None:
        return torch.softmax(scores, -1)
    pad = pad.unsqueeze(1)
    return torch.softmax(scores.masked_fill(pad, float("-inf")), -1).masked_fill(pad, 0.0)


def _torch_luong(q, k, v, pad):
    w = _torch_masked_softmax(torch.bmm(q, k.transpose(1, 2)), pad)
    return torch.bmm(w, v), w


def _torch_bahdanau(wq, uk, va, values, pad):
    w = _torch_masked_softmax(torch.tanh(wq.unsqueeze(2) + uk.unsqueeze(1)) @ va, pad)
    return torch.bmm(w, values), w


_S2S_DIMS = {"B": (0, 4), "Tq": (0, 7), "Tk": (1, 9), "H": (0, 12), "Hv": (0, 9), "mask": (0, 1)}
_S2S_SIZES = {"B": 3, "Tq": 4, "Tk": 5, "H": 6, "Hv": 7, "mask": 1}
_S2S_BIG = {"B": 32, "Tq": 24, "Tk": 40, "H": 32, "Hv": 24, "mask": 1}
_s2s_work = lambda s: max(s["B"], 1) * max(s["Tq"], 1)  # noqa: E731


# Positional encoding (eval: no dropout): input [T, B, D] plus the sinusoid table, every size
# legal, so no size mutation is an error.

def _posenc_args(s, dtype, device="cpu", bias=True, gen=None):
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    return [_randn(gen, (s["T"], s["B"], s["D"]), dtype, device)]


def _torch_posenc(x):
    """The PyTorch tutorial's table (float32, sin on even and cos on odd features), added."""
    T, D = x.shape[0], x.shape[-1]
    pos = torch.arange(T, dtype=torch.float32, device=x.device).unsqueeze(1)
    div = torch.exp(torch.arange(0, D, 2, dtype=torch.float32, device=x.device)
                    * (-math.log(10000.0) / max(D, 1)))
    pe = torch.zeros(T, D, dtype=torch.float32, device=x.device)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div[: D // 2])
    return x + pe.to(x.dtype).unsqueeze(1)


_SIZE_MUTATIONS = tuple(f"size{d}-{w}-1" for d in range(4) for w in ("minus", "plus"))

OPS += [
    OpCase("scaled_dot_product_attention", _sdpa_fn(F.scaled_dot_product_attention),
           _sdpa_fn(torch.nn.functional.scaled_dot_product_attention), _sdpa_ref,
           _SDPA_DIMS, _sdpa_args, ("query", "key", "value", "attn_mask", "is_causal"),
           ("attn_mask",), triton_max=64, work=lambda s: max(s["B"], 1) * s["H"] * max(s["L"], 1),
           default_sizes=_SDPA_SIZES, big_sizes=_SDPA_BIG,
           # legal: a mask [L, S] may gain a leading dim or be a row [S]; the query's L and the
           # value's Ev are free (a query of another length fails on the mask, named there)
           no_mutate={"attn_mask": ("extra-dim", "one-dim-less", "float32"),  # float: additive
                      "query": ("size2-minus-1", "size2-plus-1"),
                      "value": ("size3-minus-1", "size3-plus-1")}),
    OpCase("luong_attention", F.luong_attention, _torch_luong, R.luong_attention, _S2S_DIMS,
           _luong_args, ("query", "keys", "values", "key_padding_mask"), ("key_padding_mask",),
           triton_max=64, work=_s2s_work, default_sizes=_S2S_SIZES, big_sizes=_S2S_BIG,
           # legal: Tq of the query and the value size Hv are free
           no_mutate={"query": ("size1-minus-1", "size1-plus-1"),
                      "values": ("size2-minus-1", "size2-plus-1")}),
    OpCase("bahdanau_attention", F.bahdanau_attention, _torch_bahdanau, R.bahdanau_attention,
           _S2S_DIMS, _bahdanau_args, ("wq", "uk", "v", "values", "key_padding_mask"),
           ("key_padding_mask",), triton_max=64, work=_s2s_work, default_sizes=_S2S_SIZES,
           big_sizes=_S2S_BIG,
           # legal: Tq and Hv are free; v [U] may come as Va.weight's [1, U]
           no_mutate={"wq": ("size1-minus-1", "size1-plus-1"),
                      "values": ("size2-minus-1", "size2-plus-1"), "v": ("extra-dim",)}),
    OpCase("positional_encoding", lambda x: F.positional_encoding(x, 0.0, training=False),
           _torch_posenc, lambda x: R.positional_encoding(x), {"T": (0, 12), "B": (0, 4), "D": (1, 16)},
           _posenc_args, ("input",), triton_max=64, work=lambda s: max(s["T"], 1) * max(s["B"], 1),
           default_sizes={"T": 5, "B": 3, "D": 6}, big_sizes={"T": 64, "B": 16, "D": 64},
           no_mutate={"input": _SIZE_MUTATIONS}, saturates=False),
]
OPS_BY_NAME = {op.name: op for op in OPS}


def outputs(out):
    """Every op's (or module's) outputs as a flat tuple of tensors: nested state tuples such as
    LSTM's (output, (h_n, c_n)) flattened, None (MultiheadAttention without weights) dropped."""
    if isinstance(out, (tuple, list)):
        return tuple(t for o in out for t in outputs(o))
    return () if out is None else (out,)


# ---------------------------------------------------------------------------------------------
# Modules


@dataclasses.dataclass(frozen=True)
class ModuleCase:
    id: str
    torch_cls: type
    pyseqk_cls: type
    kwargs: dict
    make_input: Callable   # (module, batch, dtype, gen) -> tuple of forward arguments


def _cell_input(with_c):
    def make(m, batch, dtype=torch.float32, gen=None):
        gen = gen if gen is not None else torch.Generator().manual_seed(0)
        x = torch.randn(batch, m.input_size, generator=gen, dtype=dtype)
        h = torch.randn(batch, m.hidden_size, generator=gen, dtype=dtype) * 0.5
        if with_c:
            return x, (h, torch.randn(batch, m.hidden_size, generator=gen, dtype=dtype) * 0.5)
        return x, h

    return make


_CELL_KW = {"input_size": 5, "hidden_size": 7}
MODULES = [
    ModuleCase("RNNCell-tanh", torch.nn.RNNCell, pyseqk.nn.RNNCell,
               {**_CELL_KW, "nonlinearity": "tanh"}, _cell_input(False)),
    ModuleCase("RNNCell-relu", torch.nn.RNNCell, pyseqk.nn.RNNCell,
               {**_CELL_KW, "nonlinearity": "relu"}, _cell_input(False)),
    ModuleCase("LSTMCell", torch.nn.LSTMCell, pyseqk.nn.LSTMCell, _CELL_KW, _cell_input(True)),
    ModuleCase("GRUCell", torch.nn.GRUCell, pyseqk.nn.GRUCell, _CELL_KW, _cell_input(False)),
    ModuleCase("RNNCell-nobias", torch.nn.RNNCell, pyseqk.nn.RNNCell,
               {**_CELL_KW, "bias": False}, _cell_input(False)),
]


def _rnn_input(with_c):
    """(input [T, batch, I] (or [batch, T, I]), h0 [layers * directions, batch, H] (, c0))."""
    def make(m, batch, dtype=torch.float32, gen=None, T=4):
        gen = gen if gen is not None else torch.Generator().manual_seed(0)
        x = torch.randn(T, batch, m.input_size, generator=gen, dtype=dtype)
        if m.batch_first:
            x = x.transpose(0, 1).contiguous()
        n = m.num_layers * (2 if m.bidirectional else 1)
        out = m.proj_size if getattr(m, "proj_size", 0) > 0 else m.hidden_size
        h = torch.randn(n, batch, out, generator=gen, dtype=dtype) * 0.5
        if with_c:
            return x, (h, torch.randn(n, batch, m.hidden_size, generator=gen, dtype=dtype) * 0.5)
        return x, h

    return make


def _attention_input(m, batch, dtype=torch.float32, gen=None, L=4, S=5):
    """(query [L, batch, E], key [S, batch, E], value [S, batch, E])."""
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    r = lambda T: torch.randn(T, batch, m.embed_dim, generator=gen, dtype=dtype)  # noqa: E731
    return r(L), r(S), r(S)


def _encoder_input(m, batch, dtype=torch.float32, gen=None, T=5):
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    return (torch.randn(T, batch, m.linear1.in_features, generator=gen, dtype=dtype),)


_RNN_KW = {"input_size": 5, "hidden_size": 7}
MODULES += [
    ModuleCase("LSTM-2layer-bidir", torch.nn.LSTM, pyseqk.nn.LSTM,
               {**_RNN_KW, "num_layers": 2, "bidirectional": True}, _rnn_input(True)),
    ModuleCase("LSTM-proj-batch_first", torch.nn.LSTM, pyseqk.nn.LSTM,
               {**_RNN_KW, "proj_size": 4, "batch_first": True}, _rnn_input(True)),
    ModuleCase("GRU-2layer-bidir", torch.nn.GRU, pyseqk.nn.GRU,
               {**_RNN_KW, "num_layers": 2, "bidirectional": True}, _rnn_input(False)),
    ModuleCase("RNN-relu-nobias", torch.nn.RNN, pyseqk.nn.RNN,
               {**_RNN_KW, "nonlinearity": "relu", "bias": False}, _rnn_input(False)),
    ModuleCase("MultiheadAttention", torch.nn.MultiheadAttention, pyseqk.nn.MultiheadAttention,
               {"embed_dim": 8, "num_heads": 2}, _attention_input),
    ModuleCase("TransformerEncoderLayer", torch.nn.TransformerEncoderLayer,
               pyseqk.nn.TransformerEncoderLayer,
               {"d_model": 8, "nhead": 2, "dim_feedforward": 16, "dropout": 0.0}, _encoder_input),
    # pyseqk.nn.PositionalEncoding, LuongAttention and BahdanauAttention have no torch.nn class
    # to compare with (state dicts both ways, torch's errors): their ops are in OPS, and the
    # attention model below carries PositionalEncoding through save/load, export and DDP/FSDP.
]


# ---------------------------------------------------------------------------------------------
# Models: small networks on pyseqk layers, for DDP/FSDP, torch.export and save/load.


class CellLoop(torch.nn.Module):
    """A recurrent cell unrolled over time, then a linear head: the smallest real RNN model."""

    def __init__(self, cell_cls, input_size=5, hidden_size=8, out=3, lstm=False):
        super().__init__()
        self.cell = cell_cls(input_size, hidden_size)
        self.head = torch.nn.Linear(hidden_size, out)
        self.lstm = lstm

    def forward(self, xs):  # xs [T, B, input_size]
        h = xs.new_zeros(xs.shape[1], self.cell.hidden_size)
        state = (h, h) if self.lstm else h
        for t in range(xs.shape[0]):
            state = self.cell(xs[t], state)
        return self.head(state[0] if self.lstm else state)


def _seq_input(batch, dtype=torch.float32, gen=None, T=4, input_size=5):
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    return (torch.randn(T, batch, input_size, generator=gen, dtype=dtype),)


class LSTMHead(torch.nn.Module):
    """A 2-layer bidirectional pyseqk LSTM, then a linear head on the last step."""

    def __init__(self, input_size=5, hidden_size=6, out=3):
        super().__init__()
        self.rnn = pyseqk.nn.LSTM(input_size, hidden_size, num_layers=2, bidirectional=True)
        self.head = torch.nn.Linear(2 * hidden_size, out)

    def forward(self, xs):  # xs [T, B, input_size]
        out, _ = self.rnn(xs)
        return self.head(out[-1])


class AttentionBlock(torch.nn.Module):
    """Positional encoding, a Transformer encoder layer, a cross-attention over the input, mean
    over time and a head: every attention module of pyseqk.nn that has weights to shard."""

    def __init__(self, d_model=8, nhead=2, out=3):
        super().__init__()
        self.pos = pyseqk.nn.PositionalEncoding(d_model, dropout=0.0)
        self.encoder = pyseqk.nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=16,
                                                         dropout=0.0)
        self.cross = pyseqk.nn.MultiheadAttention(d_model, nhead)
        self.head = torch.nn.Linear(d_model, out)

    def forward(self, xs):  # xs [T, B, d_model]
        h = self.encoder(self.pos(xs))
        ctx, _ = self.cross(h, xs, xs, need_weights=False)
        return self.head(ctx.mean(0))


def _attention_model_input(batch, dtype=torch.float32, gen=None):
    return _seq_input(batch, dtype, gen, T=5, input_size=8)


@dataclasses.dataclass(frozen=True)
class ModelCase:
    id: str
    make: Callable         # () -> torch.nn.Module on pyseqk layers
    make_input: Callable   # (batch, dtype, gen) -> tuple of forward arguments
    ops: tuple             # torch.ops.pyseqk op names the model's forward calls
    batch_dims: tuple = (1,)  # per forward argument, its batch dimension (None: no batch)


MODELS = [
    ModelCase("lstm_cell_loop", lambda: CellLoop(pyseqk.nn.LSTMCell, lstm=True), _seq_input,
              ("lstm_cell",)),
    ModelCase("gru_cell_loop", lambda: CellLoop(pyseqk.nn.GRUCell), _seq_input, ("gru_cell",)),
    ModelCase("rnn_cell_loop", lambda: CellLoop(pyseqk.nn.RNNCell), _seq_input, ("rnn_tanh_cell",)),
    ModelCase("lstm_2layer_bidir", LSTMHead, _seq_input, ("lstm_layer",)),
    ModelCase("attention_block", AttentionBlock, _attention_model_input,
              ("sdpa", "positional_encoding")),
]


# ---------------------------------------------------------------------------------------------
# Backward ops: public ops too (torch.ops.pyseqk.*_backward), so bad-input checks cover them.
# Each entry builds the backward op's arguments from a forward call, with their names.


def _lstm_bwd(args):
    x, h, c, w_ih, w_hh = args[:5]
    _, cy, ws = torch.ops.pyseqk.lstm_cell(*args)
    g = torch.randn(cy.shape, generator=torch.Generator().manual_seed(3))
    return ("lstm_cell_backward", [g, g.clone(), x, h, c, cy, w_ih, w_hh, ws],
            ("grad_hy", "grad_cy", "input", "hx", "cx", "cy", "w_ih", "w_hh", "workspace"))


def _gru_bwd(args):
    x, h, w_ih, w_hh = args[:4]
    hy, ws = torch.ops.pyseqk.gru_cell(*args)
    g = torch.randn(hy.shape, generator=torch.Generator().manual_seed(3))
    return ("gru_cell_backward", [g, x, h, w_ih, w_hh, ws],
            ("grad_hy", "input", "hx", "w_ih", "w_hh", "workspace"))


def _rnn_bwd(relu):
    def build(args):
        x, h, w_ih, w_hh = args[:4]
        hy = getattr(torch.ops.pyseqk, "rnn_relu_cell" if relu else "rnn_tanh_cell")(*args)
        g = torch.randn(hy.shape, generator=torch.Generator().manual_seed(3))
        return ("rnn_cell_backward", [g, x, h, hy, w_ih, w_hh, relu],
                ("grad_hy", "input", "hx", "hy", "w_ih", "w_hh", "relu"))

    return build


BACKWARDS = {  # forward op name -> builder
    "lstm_cell": _lstm_bwd,
    "gru_cell": _gru_bwd,
    "rnn_tanh_cell": _rnn_bwd(False),
    "rnn_relu_cell": _rnn_bwd(True),
}
