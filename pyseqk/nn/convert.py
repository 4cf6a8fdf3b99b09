"""pyseqk.convert(model): swap torch.nn's recurrent and attention modules for pyseqk's, in place.

Every pyseqk module that replaces a torch.nn one subclasses it with the same parameters and
buffers, so the swap changes only the class of the existing object: weights, device, dtype,
training mode, hooks and parametrizations all stay. Only exact torch.nn types are swapped: a
user's subclass has its own forward, which pyseqk must not replace."""
from __future__ import annotations

import torch

from . import rnn

# torch.nn class -> pyseqk.nn class (a subclass of it with the same state).
SWAPS: dict[type, type] = {
    torch.nn.RNNCell: rnn.RNNCell,
    torch.nn.LSTMCell: rnn.LSTMCell,
    torch.nn.GRUCell: rnn.GRUCell,
    torch.nn.RNN: rnn.RNN,
    torch.nn.LSTM: rnn.LSTM,
    torch.nn.GRU: rnn.GRU,
}


def convert(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every torch.nn module that pyseqk has a drop-in for, in place; return ``model``."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"pyseqk.convert: model must be a torch.nn.Module, got {type(model).__name__}")
    swapped = False
    for module in model.modules():
        target = SWAPS.get(type(module))
        if target is not None:
            module.__class__ = target
            swapped = True
    if swapped:
        rnn._let_dynamo_trace()  # what construction does for pyseqk's RNN/LSTM/GRU
    return model
