"""PhaseConvTranspose (gpu_worker.cpu_conv_transpose) equals torch's transposed convolutions."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from gpu_worker.cpu_conv_transpose import PhaseConvTranspose
from gpu_worker.cpu_inference import leave_cpu, prepare_for_cpu
from tests.model_fixtures import tiny_htdemucs


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


CASES = [
    # Demucs' decoders: kernel 8, stride 4, along frequency (2-D) or time (1-D)
    (nn.ConvTranspose2d, {"kernel_size": (8, 1), "stride": (4, 1)}, [(1, 6, 9, 7), (2, 6, 33, 4), (1, 6, 1, 3)]),
    (nn.ConvTranspose1d, {"kernel_size": 8, "stride": 4}, [(1, 6, 41), (3, 6, 2), (1, 6, 1)]),
    # other multiples: one tap (kernel = stride), three taps
    (nn.ConvTranspose1d, {"kernel_size": 4, "stride": 4}, [(2, 6, 13)]),
    (nn.ConvTranspose2d, {"kernel_size": (6, 1), "stride": (2, 1)}, [(1, 6, 11, 5)]),
]


@pytest.mark.parametrize(("klass", "kw", "shapes"), CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_phase_conv_transpose_equals_torch(klass, kw, shapes, bias):
    torch.manual_seed(2)
    conv = klass(6, 5, bias=bias, **kw)
    assert PhaseConvTranspose.fits(conv)
    phased = PhaseConvTranspose(conv)
    with torch.inference_mode():
        for shape in shapes:  # one weight, any input size
            x = torch.randn(*shape)
            out, ref = phased(x), conv(x)
            assert out.shape == ref.shape
            assert out.is_contiguous()
            assert rel_err(out, ref) < 1e-6
    back = phased.to_module()  # the original, bit for bit
    assert type(back) is klass and back.kernel_size == conv.kernel_size and back.stride == conv.stride
    assert torch.equal(back.weight, conv.weight)
    assert (back.bias is None) == (conv.bias is None)
    if bias:
        assert torch.equal(back.bias, conv.bias)


@pytest.mark.parametrize(
    "conv",
    [
        nn.ConvTranspose1d(6, 5, 3, 2),  # kernel not a multiple of the stride
        nn.ConvTranspose1d(6, 5, 8, 4, padding=2),
        nn.ConvTranspose1d(6, 5, 8, 4, output_padding=1),
        nn.ConvTranspose1d(6, 6, 8, 4, groups=2),
        nn.ConvTranspose1d(6, 5, 8, 4, dilation=2),
        nn.ConvTranspose2d(6, 5, (8, 3), (4, 1)),  # also along the second axis
        nn.ConvTranspose2d(6, 5, (8, 1), (4, 2)),
    ],
    ids=["kernel", "padding", "output-padding", "groups", "dilation", "2d-kernel", "2d-stride"],
)
def test_other_transposed_convolutions_are_left_alone(conv):
    assert not PhaseConvTranspose.fits(conv)


def test_cpu_preparation_swaps_every_decoder_upsampling_and_leave_cpu_restores_them():
    model = tiny_htdemucs(seed=5, t_layers=2, t_heads=2).eval()
    stock = [
        (n, m.weight.detach().clone())
        for n, m in model.named_modules()
        if isinstance(m, nn.ConvTranspose1d | nn.ConvTranspose2d)
    ]
    assert {type(m) for _, m in model.named_modules() if isinstance(m, nn.ConvTranspose1d | nn.ConvTranspose2d)} == {
        nn.ConvTranspose1d,
        nn.ConvTranspose2d,
    }
    x = torch.randn(1, 2, 44100)
    with torch.inference_mode():
        random.seed(3)
        expected = model(x)
        prepare_for_cpu(model)
        assert sorted(n for n, m in model.named_modules() if isinstance(m, PhaseConvTranspose)) == sorted(
            n for n, _ in stock
        )
        random.seed(3)
        assert rel_err(model(x), expected) < 1e-5
    leave_cpu(model)
    modules = dict(model.named_modules())
    for name, weight in stock:
        assert type(modules[name]) in (nn.ConvTranspose1d, nn.ConvTranspose2d)
        assert torch.equal(modules[name].weight, weight)
