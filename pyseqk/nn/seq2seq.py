"""Encoder-decoder attention modules: Luong (dot, general) and Bahdanau (additive), on pyseqk's
fused ops (score, mask, softmax and weighted sum in one kernel; Bahdanau never materialises the
[B, Tq, Tk, units] tanh tensor).

torch.nn has no such modules, so pyseqk.convert leaves models alone here: use these directly.
BahdanauAttention has the parameters (Wa, Ua, Va) and the call of the BahdanauAttention in
PyTorch's "NLP From Scratch: Translation with a Sequence to Sequence Network and Attention"
tutorial, so it drops into that tutorial's AttnDecoderRNN (and loads its state_dict)::

    class AttnDecoderRNN(nn.Module):
        def __init__(self, hidden_size, output_size, dropout_p=0.1):
            super().__init__()
            self.embedding = nn.Embedding(output_size, hidden_size)
            self.attention = pyseqk.nn.BahdanauAttention(hidden_size)   # was BahdanauAttention
            ...
        def forward_step(self, input, hidden, encoder_outputs):
            query = hidden.permute(1, 0, 2)                               # [B, 1, H]
            context, attn_weights = self.attention(query, encoder_outputs)
            ...

Both modules take batch-first tensors: query [B, Tq, H] (Tq = 1 for one decoder step), keys
[B, Tk, H] (the encoder outputs), and an optional key_padding_mask bool [B, Tk], True marking
padding. A query row whose keys are all padding gets zero weights and a zero context."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import functional as F


class LuongAttention(torch.nn.Module):
    """Luong et al. (2015) multiplicative attention.

    score="dot": score(q, k) = q . k.  score="general": score(q, k) = q W k^T with a parameter
    ``weight`` [hidden_size, hidden_size] (initialised like nn.Linear's weight).

    forward(query [B, Tq, H], keys [B, Tk, H], values=None (= keys) [B, Tk, Hv],
    key_padding_mask=None) -> (context [B, Tq, Hv], weights [B, Tq, Tk])."""

    def __init__(self, hidden_size: int, score: str = "dot", device=None, dtype=None):
        super().__init__()
        if score not in ("dot", "general"):
            raise ValueError(f"LuongAttention: score must be 'dot' or 'general', got {score!r}")
        self.hidden_size = hidden_size
        self.score = score
        if score == "general":
            self.weight = torch.nn.Parameter(torch.empty(hidden_size, hidden_size, device=device,
                                                         dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            torch.nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, score={self.score!r}"

    def forward(self, query: Tensor, keys: Tensor, values: Tensor | None = None,
                key_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return F.luong_attention(query, keys, values, key_padding_mask, self.weight)


class BahdanauAttention(torch.nn.Module):
    """Bahdanau et al. (2015) additive attention, as in PyTorch's seq2seq translation tutorial:
    score(q, k) = Va(tanh(Wa(q) + Ua(k))), with Wa, Ua nn.Linear(hidden, hidden) and Va
    nn.Linear(hidden, 1). The projections are GEMMs; tanh, Va, mask, softmax and the weighted
    sum of the keys run fused. Va.bias cancels in the softmax: it receives no gradient (None),
    where the unfused version gives it an exact-zero-in-theory, rounding-noise-in-practice one.

    forward(query [B, Tq, H], keys [B, Tk, H], key_padding_mask=None, projected_keys=None)
    -> (context [B, Tq, H], weights [B, Tq, Tk]).

    A decoder that attends to the same keys at every step can pass projected_keys =
    project_keys(keys), computed once per sequence, and save the Ua GEMM (B*Tk*H*H multiply-adds,
    more than the attention itself at Tq = 1) at every step."""

    def __init__(self, hidden_size: int, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.hidden_size = hidden_size
        self.Wa = torch.nn.Linear(hidden_size, hidden_size, **kw)
        self.Ua = torch.nn.Linear(hidden_size, hidden_size, **kw)
        self.Va = torch.nn.Linear(hidden_size, 1, **kw)

    def project_keys(self, keys: Tensor) -> Tensor:
        """Ua(keys) [B, Tk, H]: pass it to forward as projected_keys to reuse it across steps."""
        return self.Ua(keys)

    def forward(self, query: Tensor, keys: Tensor, key_padding_mask: Tensor | None = None,
                projected_keys: Tensor | None = None) -> tuple[Tensor, Tensor]:
        uk = self.Ua(keys) if projected_keys is None else projected_keys
        return F.bahdanau_attention(self.Wa(query), uk, self.Va.weight.reshape(-1), keys,
                                    key_padding_mask)
