"""The CPU inference path: Demucs models set up to run faster on the CPU with the same outputs.

What is kept here won the comparison in ``benchmarks/cpu_inference.py`` (table in
benchmarks/RESULTS.md) and stays within 1e-4 of Demucs' own output in float32:

- HTDemucs' cross-transformer attention runs through ``scaled_dot_product_attention`` (the fused
  flash kernel on the CPU) instead of ``nn.MultiheadAttention``, whose self-attention fast path
  on the CPU materialises the full attention matrix (a batched matmul and a separate softmax).
  The swap is a module swap done once per model: the same projection weights, shared, not copied.

The variants that lost (bf16, ``torch.compile``, channels-last, an ONNX Runtime or OpenVINO
graph) live only in the benchmark.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


class SDPAttention(nn.Module):
    """``nn.MultiheadAttention`` (batch first, no dropout, no weights returned) on
    ``F.scaled_dot_product_attention``, holding the original module's parameters."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha._qkv_same_embed_dim or not mha.batch_first or mha.bias_k is not None:
            raise ValueError("only batch-first attention with packed q/k/v projections is supported")
        self.num_heads = mha.num_heads
        self.embed_dim = mha.embed_dim
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj
        self.batch_first = True

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
        e = self.embed_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        if query is key and key is value:
            q, k, v = F.linear(query, w, b).chunk(3, dim=-1)
        elif key is value:
            q = F.linear(query, w[:e], None if b is None else b[:e])
            k, v = F.linear(key, w[e:], None if b is None else b[e:]).chunk(2, dim=-1)
        else:
            bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
            wq, wk, wv = w.chunk(3)
            q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
        batch, lq, _ = q.shape
        heads = self.num_heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (heads, e // heads)).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=attn_mask, is_causal=is_causal)
        out = out.transpose(1, 2).reshape(batch, lq, e)
        return self.out_proj(out), None


def use_sdpa_attention(model: Any) -> int:
    """Swap every batch-first ``nn.MultiheadAttention`` inside ``model`` for :class:`SDPAttention`
    (in place; weights shared). Returns how many were swapped."""
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.MultiheadAttention and child.batch_first and child._qkv_same_embed_dim:
                swaps.append((parent, name, child))
    for parent, name, child in swaps:
        setattr(parent, name, SDPAttention(child))
    return len(swaps)


def prepare_for_cpu(model: Any) -> None:
    """Set ``model`` (a model or a bag) up for the CPU path; once per model instance."""
    if getattr(model, "_stemset_cpu_ready", False):
        return
    use_sdpa_attention(model)
    model._stemset_cpu_ready = True
