"""Drop-in recurrent modules. Each subclasses its torch.nn counterpart, so the constructor,
parameters, initialisation, state_dict, repr and isinstance checks are torch's own; only forward
runs on pyseqk's fused ops."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as F


def _check_dims(cls_name: str, input: Tensor, hidden) -> bool:
    if input.dim() not in (1, 2):
        raise ValueError(f"{cls_name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    for label, h in hidden:
        if h is not None and h.dim() not in (1, 2):
            raise ValueError(f"{cls_name}: Expected {label} to be 1D or 2D, got {h.dim()}D instead")
    return input.dim() == 2


class RNNCell(torch.nn.RNNCell):
    __doc__ = torch.nn.RNNCell.__doc__

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        batched = _check_dims("RNNCell", input, (("hidden", hx),))
        if not batched:
            input = input.unsqueeze(0)
        if hx is None:
            hx = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
        elif not batched:
            hx = hx.unsqueeze(0)
        if self.nonlinearity == "tanh":
            fn = F.rnn_tanh_cell
        elif self.nonlinearity == "relu":
            fn = F.rnn_relu_cell
        else:
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        ret = fn(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return ret if batched else ret.squeeze(0)


class LSTMCell(torch.nn.LSTMCell):
    __doc__ = torch.nn.LSTMCell.__doc__

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        if hx is not None and input.dim() == 2 and hx[0].dim() == 2 and hx[1].dim() == 2:
            # The common case in a time loop, kept free of per-call Python work.
            return F.lstm_cell(input, hx[0], hx[1], self.weight_ih, self.weight_hh, self.bias_ih,
                               self.bias_hh)
        hidden = () if hx is None else tuple((f"hx[{i}]", h) for i, h in enumerate(hx))
        batched = _check_dims("LSTMCell", input, hidden)
        if not batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
            hx = (zeros, zeros)
        elif not batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        hy, cy = F.lstm_cell(input, hx[0], hx[1], self.weight_ih, self.weight_hh, self.bias_ih,
                             self.bias_hh)
        return (hy, cy) if batched else (hy.squeeze(0), cy.squeeze(0))


class GRUCell(torch.nn.GRUCell):
    __doc__ = torch.nn.GRUCell.__doc__

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        batched = _check_dims("GRUCell", input, (("hidden", hx),))
        if not batched:
            input = input.unsqueeze(0)
        if hx is None:
            hx = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
        elif not batched:
            hx = hx.unsqueeze(0)
        ret = F.gru_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return ret if batched else ret.squeeze(0)
