"""FusedDConv (gpu_worker.cpu_dconv) gives Demucs' DConv residual branch within float32 rounding."""

from __future__ import annotations

import random

import pytest
import torch
from demucs.demucs import DConv

from gpu_worker import cpu_dconv
from gpu_worker.cpu_dconv import FusedDConv
from gpu_worker.cpu_inference import leave_cpu, prepare_for_cpu
from tests.model_fixtures import tiny_htdemucs


def _dconv(channels: int, seed: int, **kw) -> DConv:
    torch.manual_seed(seed)
    dconv = DConv(channels, compress=8, depth=2, init=1e-3, **kw).eval()
    with torch.no_grad():
        for layer in dconv.layers:
            for m in layer:
                if isinstance(m, torch.nn.GroupNorm):  # gains and biases away from 1 and 0
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.3)
                elif isinstance(m, torch.nn.Conv1d) and m.kernel_size == (1,):
                    m.bias.normal_(0, 1.0)  # conv2's bias shifts the mean its norm removes
                elif hasattr(m, "scale"):
                    m.scale.uniform_(0.2, 1.0)  # a branch as large as the input, so errors show
    return dconv


def _branch_err(ours: torch.Tensor, ref: torch.Tensor, x: torch.Tensor) -> float:
    """Largest difference over the largest change the branch makes to its input."""
    return ((ours - ref).abs().max() / (ref - x).abs().max()).item()


@pytest.mark.parametrize(
    ("channels", "batch", "length"),
    [
        (16, 1, 3001),  # one long sample: the time branch
        (16, 37, 29),  # many samples: the frequency branch
        (32, 5, 2),  # shorter than the dilation
        (8, 3, 1),
    ],
)
@pytest.mark.parametrize("block", [None, 64])  # the default block, and many small ones with a remainder
def test_fused_dconv_equals_demucs(channels, batch, length, block, monkeypatch):
    if block is not None:
        monkeypatch.setattr(cpu_dconv, "_BLOCK_ELEMENTS", block)
    dconv = _dconv(channels, seed=channels + batch)
    x = torch.randn(batch, channels, length) * 3 + 1
    with torch.inference_mode():
        ref = dconv(x)
        ours = FusedDConv(dconv)(x)
    assert ours.shape == ref.shape
    assert _branch_err(ours, ref, x) < 1e-5
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_fused_dconv_takes_a_non_contiguous_input():
    dconv = _dconv(16, seed=1)
    x = torch.randn(40, 16, 3).transpose(0, 2)  # (3, 16, 40), strided
    with torch.inference_mode():
        assert _branch_err(FusedDConv(dconv)(x), dconv(x), x) < 1e-5


@pytest.mark.parametrize(
    "kw", [{"lstm": True}, {"attn": True}, {"norm": False}, {"gelu": False}], ids=["lstm", "attn", "no-norm", "relu"]
)
def test_only_plain_dconv_layers_are_fused(kw):
    assert FusedDConv.fits(_dconv(32, seed=2))
    assert not FusedDConv.fits(_dconv(32, seed=2, **kw))


def test_cpu_preparation_fuses_every_dconv_and_leave_cpu_restores_the_originals():
    model = tiny_htdemucs(seed=5, t_layers=2, t_heads=2).eval()
    originals = [m for m in model.modules() if isinstance(m, DConv)]
    assert originals
    x = torch.randn(1, 2, 44100)
    with torch.inference_mode():
        random.seed(3)
        expected = model(x)
        prepare_for_cpu(model)
        fused = [m for m in model.modules() if isinstance(m, FusedDConv)]
        assert [f.original for f in fused] == originals
        random.seed(3)
        got = model(x)
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5
    leave_cpu(model)
    assert not any(isinstance(m, FusedDConv) for m in model.modules())
    assert [m for m in model.modules() if isinstance(m, DConv)] == originals
