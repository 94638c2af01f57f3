"""Linear layers on oneDNN with their weights reordered once (the CPU path's matrix products).

torch's ``nn.Linear`` calls MKL's ``addmm``, which packs the weight matrix on every call; oneDNN's
``_linear_pointwise`` takes a weight reordered once into its blocked layout: 17-20% faster on
htdemucs' transformer shapes on an AVX-512 AMD EPYC (benchmarks/RESULTS.md). The same call can
apply the GELU that follows, or add a residual, while the output is still in registers.
"""

from __future__ import annotations

import functools
import platform

import torch
from torch import nn
from torch.nn import functional as F


class PackedLinear(nn.Module):
    """``nn.Linear`` (float32) on oneDNN, its weight held only in oneDNN's reordered layout;
    ``gelu`` applies the exact (erf) GELU to the output inside the same call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.gelu = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        post_op, algorithm = ("gelu", "none") if self.gelu else ("none", "")
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, post_op, [], algorithm)

    def add_to(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + self(x)`` in one call (oneDNN's binary post-op)."""
        return torch.ops.mkldnn._linear_pointwise.binary(
            x.contiguous(), residual.contiguous(), self.packed, self.bias, "add"
        )

    def dense(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight in torch's layout (exactly the values packed) and the bias."""
        return self.packed.to_dense(), self.bias

    def to_module(self) -> nn.Linear:
        """The same layer as a plain ``nn.Linear`` (dense weight, exactly the original values)."""
        return linear_of(*self.dense())


def linear_of(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An inference-only ``nn.Linear`` over these tensors' storage (no copy)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    linear.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
    return linear


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
        w, b, x, r = (torch.randn(*shape, generator=gen) for shape in ((8, 16), (8,), (2, 3, 16), (2, 3, 8)))
        with torch.inference_mode():
            plain, gelu = PackedLinear(w, b), PackedLinear(w, b)
            gelu.gelu = True
            return bool(
                torch.allclose(plain(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
                and torch.allclose(gelu(x), F.gelu(F.linear(x, w, b)), rtol=1e-5, atol=1e-5)
                and torch.allclose(plain.add_to(x, r), r + F.linear(x, w, b), rtol=1e-5, atol=1e-5)
            )
    except (RuntimeError, AttributeError):  # an op missing from this build
        return False
