"""HTDemucs' cross-transformer on the CPU: flash attention, and residual branches that end in one call.

- :class:`SDPAttention` runs ``nn.MultiheadAttention`` through ``scaled_dot_product_attention``
  (the fused flash kernel on the CPU), whose self-attention fast path otherwise materialises the
  full attention matrix (a batched matmul and a separate softmax).
- In a layer whose linear layers are packed (:mod:`gpu_worker.cpu_packed`), the first feed-forward
  layer applies the GELU as a oneDNN post-op, and :class:`ResidualFusedLayer` ends each residual
  branch in one oneDNN call: the branch's last linear layer, with the LayerScale folded into its
  weight, adds the residual as a binary post-op. Each of those element-wise passes over a layer's
  output cost a few milliseconds in a forward, where the data had left the cache.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .cpu_packed import PackedLinear, linear_of


class SDPAttention(nn.Module):
    """``nn.MultiheadAttention`` (batch first, no dropout, no weights returned) on
    ``F.scaled_dot_product_attention``, holding the original module's parameters."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha._qkv_same_embed_dim or not mha.batch_first or mha.bias_k is not None:
            raise ValueError("only batch-first attention with packed q/k/v projections is supported")
        self.num_heads = mha.num_heads
        self.embed_dim = e = mha.embed_dim
        w, b = mha.in_proj_weight, mha.in_proj_bias
        # Two projections over views of the packed in_proj (shared, not copied): the query's, and
        # the key's and value's together (one matmul when key is value, as in self- and cross-attention).
        self.q_proj = linear_of(w[:e], None if b is None else b[:e])
        self.kv_proj = linear_of(w[e:], None if b is None else b[e:])
        self.out_proj = mha.out_proj
        self.batch_first = True

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """The heads' outputs, concatenated, before the output projection."""
        e = self.embed_dim
        q = self.q_proj(query)
        if key is value:
            k, v = self.kv_proj(key).chunk(2, dim=-1)
        else:  # never in Demucs: each projected whole, half of each kept
            k, v = self.kv_proj(key)[..., :e], self.kv_proj(value)[..., e:]
        batch, lq, _ = q.shape
        heads = self.num_heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (heads, e // heads)).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=attn_mask, is_causal=is_causal)
        return out.transpose(1, 2).reshape(batch, lq, e)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        if need_weights or key_padding_mask is not None:
            raise NotImplementedError("SDPAttention returns no attention weights and takes no padding mask")
        return self.out_proj(self.attend(query, key, value, attn_mask, is_causal)), None


def _gelu_done_by_linear1(x: torch.Tensor) -> torch.Tensor:
    """A feed-forward block's activation once its first linear layer applies the GELU itself."""
    return x


def fuse_feed_forward_gelu(model: Any) -> int:
    """In every transformer layer of ``model`` whose feed-forward block is ``linear2(gelu(linear1(x)))``
    with a packed ``linear1``, let that layer apply the GELU (a oneDNN post-op: one pass over the
    block's widest activation fewer). Returns how many layers changed."""
    layers = [
        m
        for m in model.modules()
        if hasattr(m, "_ff_block") and isinstance(getattr(m, "linear1", None), PackedLinear) and m.activation is F.gelu
    ]
    for layer in layers:
        layer.linear1.gelu = True
        layer.activation = _gelu_done_by_linear1
    return len(layers)


def unfuse_feed_forward_gelu(model: Any) -> None:
    """Undo :func:`fuse_feed_forward_gelu` (the packed layers themselves are undone elsewhere)."""
    for layer in model.modules():
        if getattr(layer, "activation", None) is _gelu_done_by_linear1:
            layer.activation = F.gelu
            if isinstance(layer.linear1, PackedLinear):
                layer.linear1.gelu = False


def _scaled(linear: PackedLinear, scale: torch.Tensor) -> PackedLinear:
    weight, bias = linear.dense()
    return PackedLinear(weight * scale[:, None], None if bias is None else bias * scale)


def _unscaled(linear: PackedLinear, scale: torch.Tensor) -> PackedLinear:
    weight, bias = linear.dense()
    return PackedLinear(weight / scale[:, None], None if bias is None else bias / scale)


class ResidualFusedLayer(nn.Module):
    """A Demucs transformer layer (``MyTransformerEncoderLayer`` or ``CrossTransformerEncoderLayer``,
    norm first, dense attention) whose two residual branches each end in one oneDNN call:
    ``x + gamma * linear(h)`` as ``linear'(h) + x`` with ``gamma`` folded into ``linear'``.

    The folded layers replace the original's attention output projection and second feed-forward
    layer (no weight is held twice); :meth:`to_module` puts them back, divided by the scales
    again (equal to the originals within a float32 rounding)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.cross = hasattr(layer, "cross_attn")
        attention = layer.cross_attn if self.cross else layer.self_attn
        self.attention_out = _scaled(attention.out_proj, layer.gamma_1.scale.detach())
        self.feed_forward_out = _scaled(layer.linear2, layer.gamma_2.scale.detach())
        attention.out_proj = None
        layer.linear2 = None
        self.original = layer

    @staticmethod
    def fits(layer: nn.Module) -> bool:
        if type(layer).__name__ not in ("MyTransformerEncoderLayer", "CrossTransformerEncoderLayer"):
            return False
        attention = getattr(layer, "cross_attn", None) or getattr(layer, "self_attn", None)
        scales = [getattr(layer, name, None) for name in ("gamma_1", "gamma_2")]
        return (
            layer.norm_first
            and not getattr(layer, "sparse", False)
            and isinstance(attention, SDPAttention)
            and isinstance(attention.out_proj, PackedLinear)
            and isinstance(layer.linear1, PackedLinear)
            and isinstance(layer.linear2, PackedLinear)
            and all(type(s).__name__ == "LayerScale" and s.channel_last for s in scales)
            # a zero scale could not be divided out again by to_module
            and all(bool((s.scale != 0).all()) for s in scales)
        )

    def forward(
        self, x: torch.Tensor, other: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if mask is not None:
            raise NotImplementedError("ResidualFusedLayer takes no attention mask (Demucs passes none)")
        layer = self.original
        if self.cross:  # (q, k): queries from this branch, keys and values from the other
            keys = layer.norm2(other)  # keys and values: one tensor, projected in one matmul
            h = layer.cross_attn.attend(layer.norm1(x), keys, keys)
            norm_ff = layer.norm3
        else:  # (src,)
            h = layer.norm1(x)
            h = layer.self_attn.attend(h, h, h)
            norm_ff = layer.norm2
        x = self.attention_out.add_to(h, x)
        x = self.feed_forward_out.add_to(layer.activation(layer.linear1(norm_ff(x))), x)
        return layer.norm_out(x) if layer.norm_out else x

    def to_module(self) -> nn.Module:
        layer = self.original
        attention = layer.cross_attn if self.cross else layer.self_attn
        attention.out_proj = _unscaled(self.attention_out, layer.gamma_1.scale.detach())
        layer.linear2 = _unscaled(self.feed_forward_out, layer.gamma_2.scale.detach())
        return layer
