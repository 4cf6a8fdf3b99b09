"""Drop-in recurrent modules. Each subclasses its torch.nn counterpart, so the constructor,
parameters, initialisation, state_dict, repr and isinstance checks are torch's own; only forward
runs on pyseqk's fused ops."""
from __future__ import annotations

import torch
import torch.nn.functional as _torch_F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from .. import functional as F


def _check_dims(cls_name: str, input: Tensor, hidden) -> bool:
    if input.dim() not in (1, 2):
        raise ValueError(f"{cls_name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    for label, h in hidden:
        if h is not None and h.dim() not in (1, 2):
            raise ValueError(f"{cls_name}: Expected {label} to be 1D or 2D, got {h.dim()}D instead")
    return input.dim() == 2


_RNN_CELL_FNS = {"tanh": F.rnn_tanh_cell, "relu": F.rnn_relu_cell}


def _cell_params(m) -> tuple:
    """(weight_ih, weight_hh, bias_ih, bias_hh) of a cell: read from m._parameters, where
    nn.Module.__getattr__ would find them (four dict reads instead of four __getattr__ calls:
    ~2 us of a ~45 us B=32 RNN cell step), or, where something else provides them
    (parametrizations, weight_norm), through getattr."""
    p = m._parameters
    try:
        return p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"]
    except KeyError:
        return m.weight_ih, m.weight_hh, m.bias_ih, m.bias_hh


class RNNCell(torch.nn.RNNCell):
    __doc__ = torch.nn.RNNCell.__doc__

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        if (hx is not None and input.dim() == 2 and hx.dim() == 2
                and self.nonlinearity in _RNN_CELL_FNS):
            # The common case in a time loop, kept free of per-call Python work.
            return _RNN_CELL_FNS[self.nonlinearity](input, hx, *_cell_params(self))
        batched = _check_dims("RNNCell", input, (("hidden", hx),))
        if not batched:
            input = input.unsqueeze(0)
        if hx is None:
            hx = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
        elif not batched:
            hx = hx.unsqueeze(0)
        fn = _RNN_CELL_FNS.get(self.nonlinearity)
        if fn is None:
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        ret = fn(input, hx, *_cell_params(self))
        return ret if batched else ret.squeeze(0)


class LSTMCell(torch.nn.LSTMCell):
    __doc__ = torch.nn.LSTMCell.__doc__

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        if hx is not None and input.dim() == 2 and hx[0].dim() == 2 and hx[1].dim() == 2:
            # The common case in a time loop, kept free of per-call Python work.
            return F.lstm_cell(input, hx[0], hx[1], *_cell_params(self))
        hidden = () if hx is None else tuple((f"hx[{i}]", h) for i, h in enumerate(hx))
        batched = _check_dims("LSTMCell", input, hidden)
        if not batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
            hx = (zeros, zeros)
        elif not batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        hy, cy = F.lstm_cell(input, hx[0], hx[1], *_cell_params(self))
        return (hy, cy) if batched else (hy.squeeze(0), cy.squeeze(0))


class GRUCell(torch.nn.GRUCell):
    __doc__ = torch.nn.GRUCell.__doc__

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        if hx is not None and input.dim() == 2 and hx.dim() == 2:
            # The common case in a time loop, kept free of per-call Python work.
            return F.gru_cell(input, hx, *_cell_params(self))
        batched = _check_dims("GRUCell", input, (("hidden", hx),))
        if not batched:
            input = input.unsqueeze(0)
        if hx is None:
            hx = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
        elif not batched:
            hx = hx.unsqueeze(0)
        ret = F.gru_cell(input, hx, *_cell_params(self))
        return ret if batched else ret.squeeze(0)


# ---------------------------------------------------------------------------------------------
# Whole-sequence modules: RNN, LSTM, GRU. Only forward is pyseqk's; everything else (constructor,
# parameters, reset_parameters, flatten_parameters, all_weights, check_forward_args,
# permute_hidden, repr) is inherited from torch.nn. The forward preambles mirror torch.nn's line
# for line, so that the same inputs are accepted and the same errors raised; the layer stack runs
# on pyseqk.functional's layer ops (one call per layer and direction, the time loop inside).


def _layer_stack(module, layer_fn, x: Tensor, hx: tuple[Tensor, ...], lengths: Tensor | None
                 ) -> tuple[Tensor, tuple[Tensor, ...]]:
    """x: time-major [T, B, I]. hx: the initial states, each [num_layers * D, B, *] (D = 2 if
    bidirectional), in torch's order (layer-major, forward before reverse). lengths: int64 [B]
    or None. layer_fn(x, states, weights, lengths, reverse) -> (out [T, B, H_out], *finals).
    Returns output [T, B, D * H_out] and the final states laid out like hx."""
    D = 2 if module.bidirectional else 1
    L = module.num_layers
    # getattr, not self._flat_weights: the current parameters, also under
    # torch.func.functional_call and parametrizations, and traceable by torch.compile.
    weights = [getattr(module, name) for name in module._flat_weights_names]
    per = len(weights) // (L * D)
    finals: list[list[Tensor]] = [[] for _ in hx]
    for layer in range(L):
        outs = []
        for d in range(D):
            k = layer * D + d
            out, *states = layer_fn(x, [h[k] for h in hx], weights[k * per:(k + 1) * per],
                                    lengths, d == 1)
            outs.append(out)
            for f, s in zip(finals, states):
                f.append(s)
        x = outs[0] if D == 1 else torch.cat(outs, 2)
        # torch.nn's CPU/CUDA layer stack calls at::dropout on each time-major layer output but
        # the last, which is what F.dropout calls: the same RNG draws for the same shapes.
        if module.dropout != 0 and module.training and layer < L - 1:
            x = _torch_F.dropout(x, module.dropout, True)
    return x, tuple(torch.stack(f) for f in finals)


def _split_weights(module, w: list[Tensor]):
    """(w_ih, w_hh, b_ih, b_hh, w_hr) of one layer and direction, absent ones None."""
    b_ih, b_hh = (w[2], w[3]) if module.bias else (None, None)
    w_hr = w[-1] if getattr(module, "proj_size", 0) > 0 else None
    return w[0], w[1], b_ih, b_hh, w_hr


def _packed_layout(packed: PackedSequence, batch: int) -> tuple[Tensor, Tensor]:
    """Where each row of packed.data [N, *] sits in the padded time-major layout [T * batch, *]
    (int64 [N], on the data's device), and the sequence lengths (int64 [batch], sorted order).
    Tensor ops on the CPU tensor batch_sizes with static shapes (N, T, batch): traceable, and one
    gather/scatter on the device instead of torch's one copy per time step."""
    batch_sizes = packed.batch_sizes
    T, N = batch_sizes.size(0), packed.data.size(0)
    steps = torch.arange(T).repeat_interleave(batch_sizes, output_size=N)
    starts = batch_sizes.cumsum(0) - batch_sizes
    index = steps * batch + (torch.arange(N) - starts[steps])
    lengths = (batch_sizes.unsqueeze(0) > torch.arange(batch).unsqueeze(1)).sum(1)
    return index.to(packed.data.device), lengths


def _run(module, layer_fn, input, hx: tuple[Tensor, ...], packed: PackedSequence | None):
    """The shared middle of every forward, after torch's argument checks: input is the padded
    [T, B, I] (or [B, T, I] with batch_first) tensor or, when packed is given, ignored in favour
    of packed; hx is in sorted order. Returns (output in the caller's layout, finals)."""
    if packed is not None:
        # PackedSequence -> padded time-major + lengths (sorted order, descending), and back once
        # at the end. The batch size is hx's (checked against batch_sizes[0] already).
        T, batch = packed.batch_sizes.size(0), hx[0].size(1)
        index, lengths = _packed_layout(packed, batch)
        data = packed.data
        x = data.new_zeros(T * batch, data.size(1)).index_copy(0, index, data)
        out, finals = _layer_stack(module, layer_fn, x.view(T, batch, data.size(1)), hx,
                                   lengths.to(data.device))
        return out.reshape(T * batch, out.size(2)).index_select(0, index), finals
    x = input.transpose(0, 1) if module.batch_first else input
    # The layer ops read [T, B, I] time-major: one copy for batch_first (torch.nn makes it too).
    out, finals = _layer_stack(module, layer_fn, x.contiguous(), hx, None)
    return (out.transpose(0, 1) if module.batch_first else out), finals


def _rnn_layer_fn(module):
    nonlinearity = "tanh" if module.mode == "RNN_TANH" else "relu"

    def layer_fn(x, states, w, lengths, reverse):
        w_ih, w_hh, b_ih, b_hh, _ = _split_weights(module, w)
        return F.rnn_layer(x, states[0], w_ih, w_hh, b_ih, b_hh, nonlinearity, lengths, reverse)

    return layer_fn


def _gru_layer_fn(module):
    def layer_fn(x, states, w, lengths, reverse):
        w_ih, w_hh, b_ih, b_hh, _ = _split_weights(module, w)
        return F.gru_layer(x, states[0], w_ih, w_hh, b_ih, b_hh, lengths, reverse)

    return layer_fn


def _lstm_layer_fn(module):
    def layer_fn(x, states, w, lengths, reverse):
        w_ih, w_hh, b_ih, b_hh, w_hr = _split_weights(module, w)
        return F.lstm_layer(x, states[0], states[1], w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
                            reverse)

    return layer_fn


def _packed_batch(packed: PackedSequence) -> int:
    """The number of sequences. batch_sizes[0] is a value inside a CPU tensor, which
    torch.compile can only treat as data-dependent; an unsorted PackedSequence also has it as a
    shape (sorted_indices [B]), which keeps the traced graph static."""
    if packed.sorted_indices is not None:
        return packed.sorted_indices.size(0)
    return int(packed.batch_sizes[0])


def _check_packed_args(module, packed: PackedSequence, hx: tuple[Tensor, ...], batch) -> None:
    """torch.nn's check_forward_args for a PackedSequence (same checks, same messages), with
    batch from _packed_batch. torch.nn.LSTM skips this for packed input and leaves it to its
    C++ core, which gives an unrelated message or crashes on some wrong shapes."""
    module.check_input(packed.data, packed.batch_sizes)
    if torch.compiler.is_compiling() and packed.sorted_indices is None:
        # batch is data-dependent here: tell the compiler it is hx's batch size (a runtime
        # assert in the graph) so that the shape checks below resolve statically.
        torch._check(batch == hx[0].size(1))
    D = 2 if module.bidirectional else 1
    h_out = module.proj_size if getattr(module, "proj_size", 0) > 0 else module.hidden_size
    if len(hx) == 1:
        module.check_hidden_size(hx[0], (module.num_layers * D, batch, h_out))
        return
    module.check_hidden_size(hx[0], (module.num_layers * D, batch, h_out),
                             "Expected hidden[0] size {}, got {}")
    module.check_hidden_size(hx[1], (module.num_layers * D, batch, module.hidden_size),
                             "Expected hidden[1] size {}, got {}")


def _single_state_forward(module, name: str, input_msg: str, layer_fn, input, hx):
    """RNN's and GRU's forward (torch.nn.RNN.forward / GRU.forward, same checks and messages)."""
    num_directions = 2 if module.bidirectional else 1
    packed = None
    if isinstance(input, PackedSequence):
        packed = input
        data, batch_sizes, sorted_indices, unsorted_indices = input
        batch = _packed_batch(input)
        if hx is None:
            hx = torch.zeros(module.num_layers * num_directions, batch,
                             module.hidden_size, dtype=data.dtype, device=data.device)
        else:
            hx = module.permute_hidden(hx, sorted_indices)
        _check_packed_args(module, input, (hx,), batch)
    else:
        if input.dim() not in (2, 3):
            raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D"
                             f"{input_msg}")
        is_batched = input.dim() == 3
        batch_dim = 0 if module.batch_first else 1
        if not is_batched:
            input = input.unsqueeze(batch_dim)
            if hx is not None:
                if hx.dim() != 2:
                    raise RuntimeError("For unbatched 2-D input, hx should also be 2-D but got "
                                       f"{hx.dim()}-D tensor")
                hx = hx.unsqueeze(1)
        elif hx is not None and hx.dim() != 3:
            raise RuntimeError("For batched 3-D input, hx should also be 3-D but got "
                               f"{hx.dim()}-D tensor")
        if hx is None:
            hx = torch.zeros(module.num_layers * num_directions, input.size(batch_dim),
                             module.hidden_size, dtype=input.dtype, device=input.device)
        module.check_forward_args(input, hx, None)

    output, (hidden,) = _run(module, layer_fn, input, (hx,), packed)
    if packed is not None:
        return (PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices),
                module.permute_hidden(hidden, unsorted_indices))
    if not is_batched:
        output = output.squeeze(batch_dim)
        hidden = hidden.squeeze(1)
    return output, hidden


# torch._dynamo refuses to trace any instance of torch.nn.RNN/LSTM/GRU (a delayed graph break
# unless torch._dynamo.config.allow_rnn is set) because their forward calls fused ATen RNN ops.
# Its test is an isinstance, so it also catches these subclasses, whose forward is traceable.
# Exempt exactly pyseqk's classes; torch.nn's own keep torch's behaviour. Installed lazily (on
# construction, unpickling and pyseqk.convert) because importing torch._dynamo costs seconds.
_dynamo_patched = False


def _let_dynamo_trace() -> None:
    global _dynamo_patched
    if _dynamo_patched:
        return
    _dynamo_patched = True
    try:
        from torch._dynamo import config
        from torch._dynamo.variables.builder import VariableBuilder
    except Exception:  # a torch without dynamo, or internals moved: compile then graph-breaks
        return
    original = VariableBuilder.wrap_module

    def wrap_module(self, value):
        if isinstance(value, (RNN, LSTM, GRU)) and not config.allow_rnn:
            with config.patch(allow_rnn=True):
                return original(self, value)
        return original(self, value)

    VariableBuilder.wrap_module = wrap_module


class _Traceable:
    """Mixin: install the dynamo exemption whenever an instance comes to exist."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _let_dynamo_trace()

    def __setstate__(self, state):
        super().__setstate__(state)
        _let_dynamo_trace()


class RNN(_Traceable, torch.nn.RNN):
    __doc__ = torch.nn.RNN.__doc__

    def forward(self, input, hx=None):
        if self.mode not in ("RNN_TANH", "RNN_RELU"):
            raise AssertionError(f"mode must be RNN_TANH or RNN_RELU, got {self.mode}")
        return _single_state_forward(self, "RNN", " tensor instead", _rnn_layer_fn(self), input, hx)


class GRU(_Traceable, torch.nn.GRU):
    __doc__ = torch.nn.GRU.__doc__

    def forward(self, input, hx=None):
        return _single_state_forward(self, "GRU", " instead", _gru_layer_fn(self), input, hx)


class LSTM(_Traceable, torch.nn.LSTM):
    __doc__ = torch.nn.LSTM.__doc__

    def forward(self, input, hx=None):
        """torch.nn.LSTM.forward's checks and messages. One difference: with a PackedSequence
        and a given hx, the shapes of hx are checked here (torch.nn's C++ core gives an
        unrelated message or crashes on some wrong shapes)."""
        num_directions = 2 if self.bidirectional else 1
        real_hidden_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        packed = None

        def zeros(batch, like):
            shape = (self.num_layers * num_directions, batch)
            return (torch.zeros(*shape, real_hidden_size, dtype=like.dtype, device=like.device),
                    torch.zeros(*shape, self.hidden_size, dtype=like.dtype, device=like.device))

        if isinstance(input, PackedSequence):
            packed = input
            data, batch_sizes, sorted_indices, unsorted_indices = input
            batch = _packed_batch(input)
            if hx is None:
                hx = zeros(batch, data)
            else:
                hx = self.permute_hidden(hx, sorted_indices)
            _check_packed_args(self, input, hx, batch)
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            if hx is None:
                hx = zeros(input.size(batch_dim), input)
            elif is_batched:
                if hx[0].dim() != 3 or hx[1].dim() != 3:
                    raise RuntimeError("For batched 3-D input, hx and cx should also be 3-D but "
                                       f"got ({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
            else:
                if hx[0].dim() != 2 or hx[1].dim() != 2:
                    raise RuntimeError("For unbatched 2-D input, hx and cx should also be 2-D but "
                                       f"got ({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
            self.check_forward_args(input, hx, None)

        output, hidden = _run(self, _lstm_layer_fn(self), input, tuple(hx), packed)
        if packed is not None:
            return (PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices),
                    self.permute_hidden(hidden, unsorted_indices))
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1))
        return output, hidden

