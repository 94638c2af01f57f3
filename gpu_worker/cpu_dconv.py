"""Demucs' ``DConv`` residual branch for the CPU: the same arithmetic in a few big operations.

Each DConv layer is ``x + scale * GLU(GroupNorm(conv2(GELU(GroupNorm(conv1(x))))))``, where
conv1 projects C channels down to C/8 (kernel 3, dilated) and conv2 back up to 2C (kernel 1).
Run as Demucs writes it, the wide end costs six passes over 2C-channel tensors (conv2's output,
its norm's two, the GLU, the scale, the residual add) and oneDNN handles the narrow
convolutions poorly; in htdemucs the encoders' DConvs took ~10% of a CPU forward. Here:

- conv1 is one matmul of the stacked taps with the input, whose shifted slices are summed;
- the GroupNorm after conv2 needs only the mean and the 2nd moments of conv2's narrow input
  (conv2 is linear), so its statistics come from a small Gram matrix (float64), and the norm,
  the LayerScale and conv2's bias fold into per-sample weights of one batched matmul;
- that matmul, the GLU and the residual add run on cache-sized blocks of samples, the GLU
  writing straight into the output.

Outputs equal Demucs' within float32 rounding (tests/test_cpu_dconv.py). The original module
is kept inside, unchanged, for :meth:`FusedDConv.to_module`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# Elements of the 2C-channel activation computed per block: 2 MB of float32, which stays in
# the L2 cache between the matmul that writes it and the GLU that reads it.
_BLOCK_ELEMENTS = 1 << 19


class _FusedLayer:
    """One DConv layer (conv1, norm, GELU, conv2, norm, GLU, LayerScale), derived constants only."""

    def __init__(self, layer: nn.Sequential):
        conv1, norm1, act, conv2, norm2, _glu, scale = layer
        self.hidden, channels, self.kernel = conv1.weight.shape
        self.dilation = conv1.dilation[0]
        # taps stacked: rows [j * hidden, (j + 1) * hidden) are tap j's weights
        self.taps = conv1.weight.detach().permute(2, 0, 1).reshape(self.kernel * self.hidden, channels).contiguous()
        self.bias1 = conv1.bias.detach()[:, None]
        self.norm1 = norm1
        self.approximate = act.approximate
        w2 = conv2.weight.detach()[:, :, 0].double()
        b2 = conv2.bias.detach().double()
        self.w2, self.b2 = w2, b2
        self.gram = w2.T @ w2
        self.b2_w2 = b2 @ w2
        self.w2_mean, self.b2_mean, self.b2_sq = w2.mean(0), b2.mean(), (b2 * b2).sum()
        self.gamma2, self.beta2, self.eps2 = norm2.weight.detach().double(), norm2.bias.detach().double(), norm2.eps
        # LayerScale multiplies GLU's first half, so it folds into those rows
        self.row_scale = torch.cat([scale.scale.detach().double(), torch.ones_like(self.b2[channels:])])[:, None]

    def narrow(self, x: torch.Tensor) -> torch.Tensor:
        """GELU(GroupNorm(conv1(x))), conv1 as one matmul of the stacked taps and shifted sums."""
        h, length = self.hidden, x.shape[-1]
        z = torch.matmul(self.taps, x)
        centre = self.kernel // 2
        u = z[:, centre * h : (centre + 1) * h] + self.bias1
        for j in range(self.kernel):
            shift = (j - centre) * self.dilation  # tap j reads x[t + shift]
            if j == centre or abs(shift) >= length:
                continue
            tap = z[:, j * h : (j + 1) * h]
            if shift < 0:
                u[:, :, -shift:] += tap[:, :, : length + shift]
            else:
                u[:, :, : length - shift] += tap[:, :, shift:]
        u = F.group_norm(u, 1, self.norm1.weight, self.norm1.bias, self.norm1.eps)
        return F.gelu(u, approximate=self.approximate)

    def wide_weights(self, u: torch.Tensor) -> torch.Tensor:
        """Per sample, conv2 with its GroupNorm and the LayerScale folded in: ``[B, 2C, h + 1]``,
        the last column the bias (the narrow input gets a row of ones)."""
        ud = u.double()
        mean_u = ud.mean(-1)  # [B, h]
        second = torch.bmm(ud, ud.transpose(1, 2)) / u.shape[-1]  # E_t[u u^T], [B, h, h]
        rows = self.w2.shape[0]
        mean = mean_u @ self.w2_mean + self.b2_mean
        mean_sq = ((second * self.gram).sum((1, 2)) + 2 * (mean_u @ self.b2_w2) + self.b2_sq) / rows
        rstd = torch.rsqrt(mean_sq - mean * mean + self.eps2)  # GroupNorm's biased variance
        gain = self.gamma2 * rstd[:, None]  # [B, 2C]
        weight = gain[:, :, None] * self.w2
        bias = gain * (self.b2 - mean[:, None]) + self.beta2
        return (torch.cat([weight, bias[:, :, None]], 2) * self.row_scale).float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, length = x.shape
        u = self.narrow(x)
        weights = self.wide_weights(u)
        u = torch.cat([u, u.new_ones(batch, 1, length)], 1)
        out = torch.empty_like(x)
        if batch > 1:  # blocks of whole samples
            step = max(1, _BLOCK_ELEMENTS // (2 * channels * length))
            blocks = [(slice(b, b + step), slice(None)) for b in range(0, batch, step)]
        else:  # one long sample (the time branch): blocks of time steps
            step = max(1, _BLOCK_ELEMENTS // (2 * channels))
            blocks = [(slice(None), slice(t, t + step)) for t in range(0, length, step)]
        for rows, steps in blocks:
            block = out[rows, :, steps]
            torch._C._nn.glu(torch.bmm(weights[rows], u[rows, :, steps]), 1, out=block)
            block.add_(x[rows, :, steps])
        return out


class FusedDConv(nn.Module):
    """A ``demucs.demucs.DConv`` (GroupNorm, GELU, no LSTM or attention) run by :class:`_FusedLayer`."""

    def __init__(self, dconv: nn.Module):
        super().__init__()
        self.original = dconv
        self._layers = [_FusedLayer(layer) for layer in dconv.layers]

    @staticmethod
    def fits(module: nn.Module) -> bool:
        if type(module).__name__ != "DConv" or not isinstance(getattr(module, "layers", None), nn.ModuleList):
            return False
        return all(_plain_layer(layer) for layer in module.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        for layer in self._layers:
            x = layer(x)
        return x

    def to_module(self) -> nn.Module:
        return self.original


def _plain_layer(layer: nn.Module) -> bool:
    """conv1 (odd kernel, 'same' padding), GroupNorm(1), GELU, conv2 (kernel 1), GroupNorm(1), GLU(1),
    LayerScale over channels: the layer Demucs builds with norm and GELU and no LSTM or attention."""
    if not isinstance(layer, nn.Sequential) or len(layer) != 7:
        return False
    conv1, norm1, act, conv2, norm2, glu, scale = layer
    convs_ok = all(
        type(c) is nn.Conv1d and c.groups == 1 and c.bias is not None and c.padding_mode == "zeros" and c.stride == (1,)
        for c in (conv1, conv2)
    )
    return (
        convs_ok
        and conv1.kernel_size[0] % 2 == 1
        and conv1.padding == (conv1.dilation[0] * (conv1.kernel_size[0] // 2),)
        and conv2.kernel_size == (1,)
        and conv2.out_channels == 2 * conv1.in_channels
        and all(type(n) is nn.GroupNorm and n.num_groups == 1 and n.affine for n in (norm1, norm2))
        and type(act) is nn.GELU
        and type(glu) is nn.GLU
        and glu.dim == 1
        and type(scale).__name__ == "LayerScale"
        and not scale.channel_last
        and conv1.weight.dtype == torch.float32
    )
