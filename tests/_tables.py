"""The ops and modules the reliability tests (properties, bad input, threads and determinism,
serialization, distributed, sanitizers) run over. Adding an op or a module to those checks is one
entry here: OPS for functions of pyseqk.functional, MODULES for drop-in pyseqk.nn modules, MODELS
for small models built from pyseqk layers (DDP/FSDP, torch.export, save/load).

To extend after a merge (sequence layers, SDPA/MultiheadAttention/Transformer, Luong/Bahdanau):
  - OPS: an OpCase with the functional entry, PyTorch's own implementation of the same thing
    (same dtype: the accuracy rule's baseline), the reference, the size ranges property tests
    draw from, and a make_args(sizes, dtype, device, bias, gen) factory. arg_names name each
    positional argument as the op's error messages do; aliases add torch's own words for one.
  - MODULES: (torch class, pyseqk class, constructor kwargs, input factory).
  - MODELS: a factory of a small torch.nn.Module built on pyseqk layers and its input factory.
"""
from __future__ import annotations

import dataclasses
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
           _CELL_ALIASES, work=_cell_work, default_sizes=_CELL_SIZES),
    # After the merge: lstm_layer, gru_layer, rnn_layer (dims T, B, I, H; lengths),
    # scaled_dot_product_attention (dims B, Hq, L, S, E), luong_attention, bahdanau_attention.
]
OPS_BY_NAME = {op.name: op for op in OPS}


def outputs(out):
    """Every op's outputs as a tuple of tensors."""
    return out if isinstance(out, tuple) else (out,)


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
    # After the merge: LSTM/GRU/RNN (num_layers, bidirectional, batch_first, proj_size),
    # MultiheadAttention, TransformerEncoderLayer, Transformer, Luong/Bahdanau attention.
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
    # After the merge: an LSTM (2 layers, bidirectional) + head; a MultiheadAttention block; a
    # small Transformer encoder.
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
