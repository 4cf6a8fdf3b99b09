"""Drop-in Transformer modules. Each subclasses its torch.nn counterpart and runs torch's own
constructor, so arguments, parameters, initialisation and state_dict are torch's; then the
attention submodules (and, in the containers, the layers) have their class swapped for pyseqk's,
which keeps every parameter as torch initialised it.

torch's inference fast paths (torch._transformer_encoder_layer_fwd, the nested-tensor
conversion in TransformerEncoder, torch._native_multi_head_attention) would bypass pyseqk's
attention, so these forwards never take them. One visible difference follows: in eval mode with
a src_key_padding_mask, torch.nn.TransformerEncoder's nested-tensor path returns zeros at the
padded positions, while pyseqk (like torch with the fast path off, and like torch in training)
returns whatever the layers compute there. Non-padded positions agree."""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as TF
from torch import Tensor

from .. import functional as PF
from .attention import MultiheadAttention


def _swap(module: torch.nn.Module) -> None:
    """Swap the exact torch.nn modules under ``module`` (itself included) for pyseqk's."""
    from .convert import convert

    convert(module)


def _canonical_masks(x, mask, mask_name, key_padding_mask, kpm_name):
    key_padding_mask = TF._canonical_mask(
        mask=key_padding_mask, mask_name=kpm_name, other_type=TF._none_or_dtype(mask),
        other_name=mask_name, target_type=x.dtype)
    mask = TF._canonical_mask(mask=mask, mask_name=mask_name, other_type=None, other_name="",
                              target_type=x.dtype, check_other=False)
    return mask, key_padding_mask


class TransformerEncoderLayer(torch.nn.TransformerEncoderLayer):
    __doc__ = torch.nn.TransformerEncoderLayer.__doc__

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.self_attn.__class__ = MultiheadAttention

    def forward(self, src: Tensor, src_mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        src_mask, src_key_padding_mask = _canonical_masks(
            src, src_mask, "src_mask", src_key_padding_mask, "src_key_padding_mask")
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x


class TransformerDecoderLayer(torch.nn.TransformerDecoderLayer):
    """torch.nn.TransformerDecoderLayer has no fast path: its forward, calling the swapped
    attention modules, is already pyseqk's."""

    __doc__ = torch.nn.TransformerDecoderLayer.__doc__

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.self_attn.__class__ = MultiheadAttention
        self.multihead_attn.__class__ = MultiheadAttention


class TransformerEncoder(torch.nn.TransformerEncoder):
    __doc__ = torch.nn.TransformerEncoder.__doc__

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # The layers are deep copies made by torch: swapping them leaves the caller's
        # encoder_layer alone.
        _swap(self.layers)

    def forward(self, src: Tensor, mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None, is_causal: bool | None = None
                ) -> Tensor:
        mask, src_key_padding_mask = _canonical_masks(
            src, mask, "mask", src_key_padding_mask, "src_key_padding_mask")
        seq_len = torch.nn.modules.transformer._get_seq_len(src, self.layers[0].self_attn.batch_first)
        is_causal = torch.nn.modules.transformer._detect_is_causal_mask(mask, is_causal, seq_len)
        output = src
        for mod in self.layers:
            output = mod(output, src_mask=mask, is_causal=is_causal,
                         src_key_padding_mask=src_key_padding_mask)
        if self.norm is not None:
            output = self.norm(output)
        return output


class TransformerDecoder(torch.nn.TransformerDecoder):
    """torch's forward is kept (it has no fast path); the layers are pyseqk's."""

    __doc__ = torch.nn.TransformerDecoder.__doc__

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _swap(self.layers)


class Transformer(torch.nn.Transformer):
    """torch's forward is kept; the encoder and decoder it builds are pyseqk's (a custom_encoder
    or custom_decoder is the caller's and is left as given)."""

    __doc__ = torch.nn.Transformer.__doc__

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        given = inspect.signature(torch.nn.Transformer.__init__).bind(self, *args, **kwargs).arguments
        if given.get("custom_encoder") is None:
            _swap(self.encoder)
        if given.get("custom_decoder") is None:
            _swap(self.decoder)


class PositionalEncoding(torch.nn.Module):
    r"""The sinusoidal positional encoding of "Attention Is All You Need", added to the input and
    followed by dropout, in one fused pass: ``forward(x) = dropout(x + pe[:T])`` with
    ``pe[t, 2i] = sin(t / 10000^(2i/d_model))`` and ``pe[t, 2i+1] = cos(t / 10000^(2i/d_model))``.

    x: ``[T, B, d_model]``, ``[B, T, d_model]`` with ``batch_first``, or unbatched ``[T, d_model]``.
    Odd ``d_model`` works (the last feature is a sine).

    The encoding is computed inside the kernel rather than stored: a ``pe`` buffer would cost
    ``max_len * d_model`` memory and a second input stream for a value that is cheaper to
    recompute, and would tie the layer to one dtype and device. So the module has no state;
    ``device`` and ``dtype`` are accepted for the usual factory signature and unused, and a
    ``pe`` entry in a loaded state_dict (the PyTorch tutorial's PositionalEncoding buffer) is
    ignored, so tutorial checkpoints load with ``strict=True``. ``max_len`` bounds T as the
    tutorial's table did. ``self.dropout`` is a ``torch.nn.Dropout`` as in the tutorial; its ``p``
    is the probability used."""

    def __init__(self, d_model: int, dropout: float = 0.1, max_len: int = 5000,
                 batch_first: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        if d_model <= 0 or max_len <= 0:
            raise ValueError(f"PositionalEncoding: d_model and max_len must be positive, got "
                             f"d_model={d_model}, max_len={max_len}")
        self.d_model = d_model
        self.max_len = max_len
        self.batch_first = batch_first
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() not in (2, 3):
            raise ValueError("PositionalEncoding: expected x of shape [T, B, d_model] "
                             "([B, T, d_model] with batch_first) or [T, d_model], got "
                             f"{list(x.shape)}")
        if x.shape[-1] != self.d_model:
            raise ValueError(f"PositionalEncoding: expected x's last dimension to be d_model="
                             f"{self.d_model}, got shape {list(x.shape)}")
        T = x.shape[1] if (x.dim() == 3 and self.batch_first) else x.shape[0]
        if T > self.max_len:
            raise ValueError(f"PositionalEncoding: sequence length {T} exceeds max_len={self.max_len}")
        return PF.positional_encoding(x, self.dropout.p, self.training, self.batch_first)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        state_dict.pop(prefix + "pe", None)  # the tutorial's table: recomputed, not stored
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, max_len={self.max_len}, batch_first={self.batch_first}"
