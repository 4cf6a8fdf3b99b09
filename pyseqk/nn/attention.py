"""Drop-in multi-head attention. pyseqk.nn.MultiheadAttention subclasses torch.nn's, so the
constructor, parameters (in_proj_weight or q/k/v_proj_weight, in_proj_bias, bias_k/bias_v,
out_proj), initialisation, state_dict and repr are torch's own; forward routes the attention
through pyseqk.functional.scaled_dot_product_attention.

need_weights=True has to return the L x S probabilities, so that case computes them (and the
output from them) the way torch does: baddbmm, softmax, dropout, bmm. need_weights=False (what
the Transformer layers ask for) never builds the L x S matrix: it runs the fused SDPA. torch's
module fast path (torch._native_multi_head_attention) is never taken."""
from __future__ import annotations

import torch
import torch.nn.functional as TF
from torch import Tensor

from .. import functional as F


def _merge_masks(attn_mask, key_padding_mask, bsz, num_heads, tgt_len, src_len, flat):
    """torch's merge of attn_mask [1 or B*H, L, S] and key_padding_mask [B, S] (both additive
    floats by now, or None): their sum. flat: as torch lays it out for bmm, [1 or B*H, L or 1,
    S]; else 4-D for SDPA, [1 or B, 1 or H, L or 1, S], broadcasting instead of repeating the
    padding mask over heads and the 2-D mask over the batch (the same sums, up to H times fewer
    elements)."""
    if key_padding_mask is not None:
        torch._check_with(
            AssertionError, key_padding_mask.shape[0] == bsz,
            lambda: f"Expected key_padded_mask.shape[0] to be {bsz}, but got {key_padding_mask.shape[0]}")
        torch._check_with(
            AssertionError, key_padding_mask.shape[1] == src_len,
            lambda: f"Expected key_padded_mask.shape[1] to be {src_len}, but got {key_padding_mask.shape[1]}")
    if flat:
        if key_padding_mask is None:
            return attn_mask
        kpm = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1)
               .reshape(bsz * num_heads, 1, src_len))
        return kpm if attn_mask is None else attn_mask + kpm
    if attn_mask is not None:
        attn_mask = (attn_mask.unsqueeze(0) if attn_mask.size(0) == 1
                     else attn_mask.view(bsz, num_heads, tgt_len, src_len))
    if key_padding_mask is None:
        return attn_mask
    kpm = key_padding_mask.view(bsz, 1, 1, src_len)
    return kpm if attn_mask is None else attn_mask + kpm


def multi_head_attention_forward(
    query: Tensor, key: Tensor, value: Tensor, num_heads: int, in_proj_weight: Tensor | None,
    in_proj_bias: Tensor | None, bias_k: Tensor | None, bias_v: Tensor | None,
    add_zero_attn: bool, dropout_p: float, out_proj_weight: Tensor,
    out_proj_bias: Tensor | None, training: bool = True, key_padding_mask: Tensor | None = None,
    need_weights: bool = True, attn_mask: Tensor | None = None,
    q_proj_weight: Tensor | None = None, k_proj_weight: Tensor | None = None,
    v_proj_weight: Tensor | None = None, average_attn_weights: bool = True,
    is_causal: bool = False, embed_dim_to_check: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """torch.nn.functional.multi_head_attention_forward (without static_k/static_v), sequence-first
    [L, B, E] or unbatched [L, E]; separate projection weights when in_proj_weight is None."""
    is_batched = TF._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
    if not is_batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    src_len = key.shape[0]

    key_padding_mask = TF._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask",
        other_type=TF._none_or_dtype(attn_mask), other_name="attn_mask", target_type=query.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError(
            "Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
            "method `generate_square_subsequent_mask` to create this mask.")
    if is_causal and key_padding_mask is None and not need_weights:
        # The hint stands in for the mask: the fused kernel skips the masked tiles.
        attn_mask = None
    else:
        attn_mask = TF._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None,
                                       other_name="", target_type=query.dtype, check_other=False)
        if key_padding_mask is not None:
            is_causal = False  # the merged mask is no longer causal

    if embed_dim_to_check is not None and embed_dim != embed_dim_to_check:
        raise AssertionError(
            f"was expecting embedding dimension of {embed_dim_to_check}, but got {embed_dim}")
    head_dim = embed_dim // num_heads
    if head_dim * num_heads != embed_dim:
        raise AssertionError(f"embed_dim {embed_dim} not divisible by num_heads {num_heads}")
    if in_proj_weight is None:
        if key.shape[:2] != value.shape[:2]:
            raise AssertionError(
                f"key's sequence and batch dims {key.shape[:2]} do not match value's {value.shape[:2]}")
        b_q, b_k, b_v = (None,) * 3 if in_proj_bias is None else in_proj_bias.chunk(3)
        q, k, v = TF._in_projection(query, key, value, q_proj_weight, k_proj_weight,
                                    v_proj_weight, b_q, b_k, b_v)
    else:
        if key.shape != value.shape:
            raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        q, k, v = TF._in_projection_packed(query, key, value, in_proj_weight, in_proj_bias)

    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, src_len):
                raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but "
                                   f"should be {(tgt_len, src_len)}.")
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
            raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should "
                               f"be {(bsz * num_heads, tgt_len, src_len)}.")

    if (bias_k is None) != (bias_v is None):
        raise AssertionError("bias_k and bias_v must both be set or both be None")
    if bias_k is not None:
        k = torch.cat([k, bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, bias_v.repeat(1, bsz, 1)])
        attn_mask = None if attn_mask is None else TF.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else TF.pad(key_padding_mask, (0, 1))

    # [L, B, E] -> [B*H, L, hd]
    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    if add_zero_attn:
        zeros = torch.zeros((bsz * num_heads, 1, head_dim), dtype=k.dtype, device=k.device)
        k = torch.cat([k, zeros], dim=1)
        v = torch.cat([v, zeros], dim=1)
        attn_mask = None if attn_mask is None else TF.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else TF.pad(key_padding_mask, (0, 1))
    src_len = k.size(1)
    attn_mask = _merge_masks(attn_mask, key_padding_mask, bsz, num_heads, tgt_len, src_len,
                             flat=need_weights)
    if not training:
        dropout_p = 0.0

    if need_weights:
        # torch's own arithmetic, so that the returned weights are torch's.
        q_scaled = q * (1.0 / head_dim) ** 0.5
        if attn_mask is not None:
            weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = weights.softmax(dim=-1)
        if dropout_p > 0.0:
            weights = TF.dropout(weights, p=dropout_p)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        weights = weights.view(bsz, num_heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not is_batched:
            weights = weights.squeeze(0)
    else:
        out = F.scaled_dot_product_attention(
            q.view(bsz, num_heads, tgt_len, head_dim), k.view(bsz, num_heads, src_len, head_dim),
            v.view(bsz, num_heads, src_len, head_dim), attn_mask, dropout_p, is_causal)
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        weights = None
    out = TF.linear(out, out_proj_weight, out_proj_bias).view(tgt_len, bsz, -1)
    if not is_batched:
        out = out.squeeze(1)
    return out, weights


class MultiheadAttention(torch.nn.MultiheadAttention):
    __doc__ = torch.nn.MultiheadAttention.__doc__

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if query.is_nested or key.is_nested or value.is_nested:
            raise AssertionError("pyseqk.nn.MultiheadAttention does not support NestedTensor "
                                 "inputs; pass padded tensors and a key_padding_mask")
        is_batched = query.dim() == 3
        if self.batch_first and is_batched:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        separate = not self._qkv_same_embed_dim
        out, weights = multi_head_attention_forward(
            query, key, value, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, self.out_proj.weight,
            self.out_proj.bias, training=self.training, key_padding_mask=key_padding_mask,
            need_weights=need_weights, attn_mask=attn_mask,
            q_proj_weight=self.q_proj_weight if separate else None,
            k_proj_weight=self.k_proj_weight if separate else None,
            v_proj_weight=self.v_proj_weight if separate else None,
            average_attn_weights=average_attn_weights, is_causal=is_causal,
            embed_dim_to_check=self.embed_dim)
        if self.batch_first and is_batched:
            out = out.transpose(1, 0)
        return out, weights
