"""Demucs' decoder upsampling (transposed convolutions, kernel 8, stride 4) as ordinary convolutions.

A transposed convolution along one axis whose kernel is ``m`` times its stride ``S`` gives
output row ``S * f + p`` from input rows ``f - m + 1 .. f`` only. So it is an ordinary
convolution (kernel ``m``, zero padding ``m - 1``) with ``S`` times the output channels, one per
phase ``p``, followed by interleaving the phases: the same multiply-adds in a different order.
On the CPU oneDNN runs ordinary convolutions at nearly the matrix rate and transposed ones at a
half to a quarter of it (and torch's own transposed convolution reorders its weight on every
call): the release htdemucs' four frequency decoders took 148 ms a forward as oneDNN transposed
convolutions with prepacked weights and 71 ms this way; the time decoders 50-60 ms and 34-38 ms
(benchmarks/RESULTS.md). Outputs equal torch's within float32 rounding.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class PhaseConvTranspose(nn.Module):
    """``nn.ConvTranspose1d``, or ``nn.ConvTranspose2d`` acting along its first spatial axis only
    (kernel ``(k, 1)``, stride ``(s, 1)``), with ``k`` a multiple of ``s``, no padding, one group:
    run as an ordinary convolution over phases. Holds only the phase-ordered weight, from which
    :meth:`to_module` rebuilds the original exactly (a permutation, no arithmetic)."""

    def __init__(self, conv: nn.ConvTranspose1d | nn.ConvTranspose2d):
        super().__init__()
        self.two_d = isinstance(conv, nn.ConvTranspose2d)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.stride = conv.stride[0]
        self.taps = conv.kernel_size[0] // self.stride
        weight = conv.weight.detach()[..., 0] if self.two_d else conv.weight.detach()
        # weight[c, o, j * S + p] feeds output row S * f + p from input row f - j; tap i of the
        # ordinary convolution over the padded input reads row f - (m - 1 - i), so i = m - 1 - j.
        phased = weight.reshape(self.in_channels, self.out_channels, self.taps, self.stride).flip(2)
        phased = phased.permute(1, 3, 0, 2).reshape(self.out_channels * self.stride, self.in_channels, self.taps)
        self.weight = nn.Parameter(phased[..., None] if self.two_d else phased.contiguous(), requires_grad=False)
        bias = None if conv.bias is None else conv.bias.detach().repeat_interleave(self.stride)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @staticmethod
    def fits(conv: nn.Module) -> bool:
        if type(conv) not in (nn.ConvTranspose1d, nn.ConvTranspose2d):
            return False
        if type(conv) is nn.ConvTranspose2d and (conv.kernel_size[1] != 1 or conv.stride[1] != 1):
            return False
        return (
            conv.groups == 1
            and conv.padding_mode == "zeros"
            and not any(conv.padding)
            and not any(conv.output_padding)
            and all(d == 1 for d in conv.dilation)
            and conv.kernel_size[0] % conv.stride[0] == 0
            and conv.weight.dtype == torch.float32
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels, phases = self.out_channels, self.stride
        if self.two_d:
            y = F.conv2d(x, self.weight, self.bias, padding=(self.taps - 1, 0))
            batch, _, rows, cols = y.shape
            return y.view(batch, channels, phases, rows, cols).transpose(2, 3).reshape(batch, channels, -1, cols)
        y = F.conv1d(x, self.weight, self.bias, padding=self.taps - 1)
        batch, _, rows = y.shape
        return y.view(batch, channels, phases, rows).transpose(2, 3).reshape(batch, channels, -1)

    def to_module(self) -> nn.ConvTranspose1d | nn.ConvTranspose2d:
        """The original transposed convolution, weight and bias bit for bit."""
        phased = self.weight.detach()[..., 0] if self.two_d else self.weight.detach()
        weight = phased.reshape(self.out_channels, self.stride, self.in_channels, self.taps).permute(2, 0, 3, 1)
        weight = weight.flip(2).reshape(self.in_channels, self.out_channels, self.taps * self.stride)
        kernel = self.taps * self.stride
        if self.two_d:
            conv = nn.ConvTranspose2d(
                self.in_channels, self.out_channels, (kernel, 1), (self.stride, 1), bias=self.bias is not None,
                device="meta",
            )  # fmt: skip
            weight = weight[..., None]
        else:
            conv = nn.ConvTranspose1d(
                self.in_channels, self.out_channels, kernel, self.stride, bias=self.bias is not None, device="meta"
            )
        conv.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        if self.bias is not None:
            conv.bias = nn.Parameter(self.bias.detach()[:: self.stride].clone(), requires_grad=False)
        return conv
