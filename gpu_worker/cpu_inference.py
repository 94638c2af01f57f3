"""The CPU inference path: Demucs models set up to run faster on the CPU with the same outputs.

What is kept here won the comparisons in ``benchmarks/cpu_inference.py`` and in-process A/B
runs of the release htdemucs (benchmarks/RESULTS.md), and stays within 1e-4 of Demucs' own
output in float32. Each is a module swap done once per model, by :func:`prepare_for_cpu`:

- attention on the fused flash kernel (:class:`~gpu_worker.cpu_transformer.SDPAttention`);
- every linear layer on oneDNN with its weight reordered once (:mod:`gpu_worker.cpu_packed`),
  the feed-forward GELU as its post-op, and each transformer residual branch ending in one
  oneDNN call (:class:`~gpu_worker.cpu_transformer.ResidualFusedLayer`);
- the decoders' transposed convolutions as ordinary ones over phases
  (:class:`~gpu_worker.cpu_conv_transpose.PhaseConvTranspose`);
- the encoders' ``DConv`` residual branches in a few big operations
  (:class:`~gpu_worker.cpu_dconv.FusedDConv`).

:func:`leave_cpu` undoes the CPU-only ones if the model moves to a GPU. The variants that lost
(bf16, ``torch.compile``, channels-last, an ONNX Runtime or OpenVINO graph) live only in the
benchmark.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .cpu_conv_transpose import PhaseConvTranspose
from .cpu_dconv import FusedDConv
from .cpu_packed import PackedLinear, packing_available
from .cpu_transformer import ResidualFusedLayer, SDPAttention, fuse_feed_forward_gelu, unfuse_feed_forward_gelu

__all__ = [
    "CPU_SWAPS",
    "FusedDConv",
    "PackedLinear",
    "PhaseConvTranspose",
    "ResidualFusedLayer",
    "SDPAttention",
    "fuse_dconv",
    "fuse_feed_forward_gelu",
    "fuse_residual_branches",
    "leave_cpu",
    "pack_weights",
    "packing_available",
    "prepare_for_cpu",
    "use_phase_conv_transpose",
    "use_sdpa_attention",
]


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


def fuse_residual_branches(model: Any) -> int:
    """Swap every Demucs transformer layer inside ``model`` that :class:`ResidualFusedLayer` fits
    (packed linear layers, SDPA attention) for one. Returns how many were swapped."""
    return _swap(model, lambda _, m: ResidualFusedLayer.fits(m), ResidualFusedLayer)


def fuse_dconv(model: Any) -> int:
    """Swap every Demucs ``DConv`` residual branch inside ``model`` for :class:`FusedDConv` (in
    place; the original kept inside it). Returns how many were swapped."""
    return _swap(model, lambda _, m: FusedDConv.fits(m), FusedDConv)


# What prepare_for_cpu does, in order (the later swaps find what the earlier ones made);
# benchmarks/cpu_fusions.py leaves one out at a time.
CPU_SWAPS: dict[str, Callable[[Any], int]] = {
    "sdpa_attention": use_sdpa_attention,
    "packed_linears": pack_weights,
    "phase_conv_transpose": use_phase_conv_transpose,
    "feed_forward_gelu": fuse_feed_forward_gelu,
    "residual_branches": fuse_residual_branches,
    "fused_dconv": fuse_dconv,
}


def prepare_for_cpu(model: Any, without: str | None = None) -> None:
    """Set ``model`` (a model or a bag) up for the CPU path; once per model instance. ``without``
    names one of :data:`CPU_SWAPS` to leave out (for the benchmark that measures each)."""
    if getattr(model, "_stemset_cpu_ready", False):
        return
    for name, swap in CPU_SWAPS.items():
        if name != without:
            swap(model)
    model._stemset_cpu_ready = True


def leave_cpu(model: Any) -> None:
    """Undo the CPU-only part of :func:`prepare_for_cpu` before ``model`` moves to another device
    (packed weights live in CPU memory only); the attention swap works anywhere and stays."""
    if not getattr(model, "_stemset_cpu_ready", False):
        return
    unfuse_feed_forward_gelu(model)
    _swap(model, lambda _, m: isinstance(m, ResidualFusedLayer), lambda m: m.to_module())  # puts packed layers back
    _swap(model, lambda _, m: isinstance(m, (PackedLinear, PhaseConvTranspose, FusedDConv)), lambda m: m.to_module())
    model._stemset_cpu_ready = False
