"""The CPU inference path: Demucs models set up to run faster on the CPU with the same outputs.

What is kept here won the comparison in ``benchmarks/cpu_inference.py`` (table in
benchmarks/RESULTS.md) and stays within 1e-4 of Demucs' own output in float32:

- HTDemucs' cross-transformer attention runs through ``scaled_dot_product_attention`` (the fused
  flash kernel on the CPU) instead of ``nn.MultiheadAttention``, whose self-attention fast path
  on the CPU materialises the full attention matrix (a batched matmul and a separate softmax).
- Every linear layer (the attention projections and the feed-forward blocks) runs on oneDNN with
  its weight reordered once, at preparation, into oneDNN's blocked layout, instead of torch's
  ``addmm`` (MKL), which repacks the weight on every call: 17-20% faster on the transformer's
  shapes on an AVX-512 AMD EPYC. The packed weight replaces the dense one (no extra memory).
- The decoders' transposed convolutions run as ordinary ones over phases
  (:class:`~gpu_worker.cpu_conv_transpose.PhaseConvTranspose`).
- In each transformer layer the packed linear layers also do the element-wise step after them
  (oneDNN post-ops): the first feed-forward layer the GELU, and the layer that ends each residual
  branch its LayerScale. Every such pass over a layer's output costs a few milliseconds in a
  forward, where the data has left the cache; the post-op does it while the data is in registers.
- The encoders' ``DConv`` residual branches run as :class:`~gpu_worker.cpu_dconv.FusedDConv`.

All are module swaps done once per model; :func:`leave_cpu` undoes the CPU-only ones if the
model moves to a GPU. The variants that lost (bf16, ``torch.compile``, channels-last, an ONNX
Runtime or OpenVINO graph) live only in the benchmark.
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .cpu_conv_transpose import PhaseConvTranspose
from .cpu_dconv import FusedDConv


class PackedLinear(nn.Module):
    """``nn.Linear`` (float32) on oneDNN, its weight held only in oneDNN's reordered layout.
    Inside the same call, ``gelu`` applies the exact (erf) GELU to the output, or ``scale`` (a
    tensor over the output features) multiplies it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.gelu = False
        self.scale: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        if self.scale is not None:
            out_shape = (*x.shape[:-1], self.out_features)
            return torch.ops.mkldnn._linear_pointwise.binary(
                x, self.scale.expand(out_shape), self.packed, self.bias, "mul"
            )
        post_op, algorithm = ("gelu", "none") if self.gelu else ("none", "")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, post_op, [], algorithm)

    def to_module(self) -> nn.Linear:
        """The same layer as a plain ``nn.Linear`` (dense weight, exactly the original values)."""
        return _linear_of(self.packed.to_dense(), self.bias)


@functools.cache
def packing_available() -> bool:
    """oneDNN's packed linear layer and its post-ops exist in this torch build and agree with
    torch's own (x86 only: where they were measured; elsewhere the layers stay as they are)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        w, b, x = (torch.randn(*shape, generator=gen) for shape in ((8, 16), (8,), (2, 3, 16)))
        with torch.inference_mode():
            gelu, scaled = PackedLinear(w, b), PackedLinear(w, b)
            gelu.gelu, scaled.scale = True, b
            return bool(
                torch.allclose(PackedLinear(w, b)(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
                and torch.allclose(gelu(x), F.gelu(F.linear(x, w, b)), rtol=1e-5, atol=1e-5)
                and torch.allclose(scaled(x), b * F.linear(x, w, b), rtol=1e-5, atol=1e-5)
            )
    except (RuntimeError, AttributeError):  # an op missing from this build
        return False


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
        self.q_proj = _linear_of(w[:e], None if b is None else b[:e])
        self.kv_proj = _linear_of(w[e:], None if b is None else b[e:])
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
        out = out.transpose(1, 2).reshape(batch, lq, e)
        return self.out_proj(out), None


def _linear_of(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An inference-only ``nn.Linear`` over these tensors' storage (no copy)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    linear.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
    return linear


def _swap(model: Any, wanted: Callable[[nn.Module, nn.Module], bool], make: Callable[[Any], nn.Module]) -> int:
    """Replace every module ``c`` inside ``model`` whose parent ``p`` has ``wanted(p, c)`` by ``make(c)``."""
    swaps = [
        (parent, name) for parent in model.modules() for name, child in parent.named_children() if wanted(parent, child)
    ]
    for parent, name in swaps:  # one at a time: each old module is freed as soon as it is replaced
        setattr(parent, name, make(getattr(parent, name)))
    return len(swaps)


def use_sdpa_attention(model: Any) -> int:
    """Swap every batch-first ``nn.MultiheadAttention`` inside ``model`` for :class:`SDPAttention`
    (in place; weights shared). Returns how many were swapped."""
    return _swap(
        model,
        lambda _, m: type(m) is nn.MultiheadAttention and m.batch_first and m._qkv_same_embed_dim,
        SDPAttention,
    )


def pack_weights(model: Any) -> int:
    """Swap every float32 ``nn.Linear`` inside ``model`` for :class:`PackedLinear` (in place; the
    dense weights are dropped). Returns how many were swapped: 0 where packing is unavailable."""
    if not packing_available():
        return 0
    return _swap(
        model,
        # An nn.MultiheadAttention left in place reads its out_proj's dense weight itself.
        lambda parent, m: (
            isinstance(m, nn.Linear)
            and m.weight.dtype == torch.float32
            and not isinstance(parent, nn.MultiheadAttention)
        ),
        lambda m: PackedLinear(m.weight, m.bias),
    )


def use_phase_conv_transpose(model: Any) -> int:
    """Swap every transposed convolution inside ``model`` that :class:`PhaseConvTranspose` fits
    (Demucs' decoders: kernel 8, stride 4) for one. Returns how many were swapped."""
    return _swap(model, lambda _, m: PhaseConvTranspose.fits(m), PhaseConvTranspose)


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


class ScaleDoneByLinear(nn.Module):
    """A transformer layer's LayerScale once the linear layer before it multiplies by the scale."""

    def __init__(self, layer_scale: nn.Module):
        super().__init__()
        self.original = layer_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def to_module(self) -> nn.Module:
        return self.original


def fuse_layer_scales(model: Any) -> int:
    """In every Demucs transformer layer of ``model``, let the packed linear layer that ends each
    residual branch (the attention's ``out_proj``, the feed-forward's ``linear2``) multiply by the
    branch's LayerScale: one pass over the layer's output fewer per branch. Returns how many."""
    fused = 0
    for layer in list(model.modules()):
        attention = getattr(layer, "self_attn", None) or getattr(layer, "cross_attn", None)
        branches = (("gamma_1", getattr(attention, "out_proj", None)), ("gamma_2", getattr(layer, "linear2", None)))
        for name, linear in branches:
            scale = getattr(layer, name, None)
            if type(scale).__name__ == "LayerScale" and scale.channel_last and isinstance(linear, PackedLinear):
                linear.scale = scale.scale.detach()
                setattr(layer, name, ScaleDoneByLinear(scale))
                fused += 1
    return fused


def fuse_dconv(model: Any) -> int:
    """Swap every Demucs ``DConv`` residual branch inside ``model`` for :class:`FusedDConv` (in
    place; the original kept inside it). Returns how many were swapped."""
    return _swap(model, lambda _, m: FusedDConv.fits(m), FusedDConv)


def prepare_for_cpu(model: Any) -> None:
    """Set ``model`` (a model or a bag) up for the CPU path; once per model instance."""
    if getattr(model, "_stemset_cpu_ready", False):
        return
    use_sdpa_attention(model)
    pack_weights(model)
    use_phase_conv_transpose(model)
    fuse_feed_forward_gelu(model)
    fuse_layer_scales(model)
    fuse_dconv(model)
    model._stemset_cpu_ready = True


def leave_cpu(model: Any) -> None:
    """Undo the CPU-only part of :func:`prepare_for_cpu` before ``model`` moves to another device
    (packed weights live in CPU memory only); the attention swap works anywhere and stays."""
    if not getattr(model, "_stemset_cpu_ready", False):
        return
    for layer in model.modules():
        if getattr(layer, "activation", None) is _gelu_done_by_linear1:
            layer.activation = F.gelu
    undo = (PackedLinear, PhaseConvTranspose, FusedDConv, ScaleDoneByLinear)
    _swap(model, lambda _, m: isinstance(m, undo), lambda m: m.to_module())
    model._stemset_cpu_ready = False
