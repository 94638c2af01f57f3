"""The CPU inference path (gpu_worker.cpu_inference) gives Demucs' stems within 1e-4."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import yaml
from torch import nn
from torch.nn import functional as F

from gpu_worker import models
from gpu_worker.cpu_conv_transpose import PhaseConvTranspose
from gpu_worker.cpu_dconv import FusedDConv
from gpu_worker.cpu_inference import (
    PackedLinear,
    ResidualFusedLayer,
    SDPAttention,
    fuse_feed_forward_gelu,
    fuse_residual_branches,
    leave_cpu,
    pack_weights,
    packing_available,
    prepare_for_cpu,
    use_sdpa_attention,
)
from gpu_worker.cpu_threads import WAIT_POLICY_ENV, prefer_passive_openmp
from gpu_worker.engine import separate
from gpu_worker.strategy import SeparationParams
from tests.model_fixtures import save_model, tiny_htdemucs
from tests.test_engine_equivalence import assert_equal_to_demucs, demucs_reference, mix

TOL = 1e-4


@pytest.fixture(scope="module")
def cross_repo(tmp_path_factory):
    """HTDemucs with a cross-transformer of a self-attention and a cross-attention layer, two heads."""
    folder = tmp_path_factory.mktemp("cross_models")
    save_model(tiny_htdemucs(seed=5, t_layers=2, t_heads=2), folder, "c0c0a7e2")
    (folder / "htdemucs_cross.yaml").write_text(yaml.safe_dump({"models": ["c0c0a7e2"]}))
    return folder


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("kind", ["self", "cross", "distinct"])
@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_attention_equals_multihead_attention(kind, masked):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    q = torch.randn(2, 11, 16)
    k = q if kind == "self" else torch.randn(2, 7, 16)
    v = k if kind != "distinct" else torch.randn(2, 7, 16)
    mask = torch.randn(11, k.shape[1]) if masked else None
    with torch.inference_mode():
        ref = mha(q, k, v, attn_mask=mask, need_weights=False)[0]
        ours, weights = SDPAttention(mha)(q, k, v, attn_mask=mask, need_weights=False)
    assert weights is None
    assert rel_err(ours, ref) < 1e-6


def test_swap_covers_self_and_cross_attention_and_shares_weights():
    model = tiny_htdemucs(seed=5, t_layers=2, t_heads=2)
    ref = copy.deepcopy(model)
    n_params = sum(p.numel() for p in model.parameters())
    assert use_sdpa_attention(model) == 4  # a self and a cross layer in each of the two branches
    assert not any(type(m) is nn.MultiheadAttention for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == n_params  # the same weights, not copies
    x = torch.randn(1, 2, 44100)
    with torch.inference_mode():
        random.seed(3)
        expected = ref(x)
        random.seed(3)
        got = model(x)
    assert rel_err(got, expected) < TOL


def test_prepare_for_cpu_once_per_model():
    model = tiny_htdemucs(seed=5, t_layers=2, t_heads=2)
    prepare_for_cpu(model)
    swapped = [m for m in model.modules() if isinstance(m, SDPAttention)]
    prepare_for_cpu(model)
    assert [m for m in model.modules() if isinstance(m, SDPAttention)] == swapped


@pytest.mark.parametrize("shifts", [0, 2])
def test_cpu_path_with_cross_attention_matches_demucs(cross_repo, shifts):
    wav = mix(3.1, seed=8)
    model = models.load_model("htdemucs_cross", cross_repo)
    ref = demucs_reference("htdemucs_cross", cross_repo, wav, shifts=shifts, seed=77)
    params = SeparationParams(shifts=shifts, batch_size=3)
    ours = separate(model, wav, params, torch.device("cpu"), rng=random.Random(77))
    assert_equal_to_demucs(ours, ref)
    # The path that gave these stems is the CPU one: every attention runs on SDPA, every
    # transposed convolution over phases, every DConv fused, every linear layer on oneDNN's packed
    # weights (where this torch build has them).
    assert any(isinstance(m, SDPAttention) for m in model.modules())
    assert any(isinstance(m, PhaseConvTranspose) for m in model.modules())
    assert any(isinstance(m, FusedDConv) for m in model.modules())
    stock = (nn.MultiheadAttention, nn.ConvTranspose1d, nn.ConvTranspose2d)
    assert not any(type(m) in stock for m in model.modules())
    dconvs = [m for m in model.modules() if type(m).__name__ == "DConv"]  # each kept inside its FusedDConv
    assert dconvs == [m.original for m in model.modules() if isinstance(m, FusedDConv)]
    if packing_available():
        assert any(isinstance(m, PackedLinear) for m in model.modules())
        assert not any(isinstance(m, nn.Linear) for m in model.modules())


needs_packing = pytest.mark.skipif(not packing_available(), reason="oneDNN packed linears (x86 builds)")


@needs_packing
@pytest.mark.parametrize("shape", [(5, 16), (2, 7, 16), (1, 300, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_linear(shape, bias):
    torch.manual_seed(1)
    linear = nn.Linear(16, 24, bias=bias)
    x = torch.randn(*shape)
    with torch.inference_mode():
        assert rel_err(PackedLinear(linear.weight, linear.bias)(x), linear(x)) < 1e-6
        strided = torch.randn(*shape[:-1], 32)[..., ::2]  # a non-contiguous input
        assert rel_err(PackedLinear(linear.weight, linear.bias)(strided), linear(strided)) < 1e-6


def _packable(parent: nn.Module, m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and not isinstance(parent, nn.MultiheadAttention)


@needs_packing
def test_packing_drops_the_dense_weights_and_leave_cpu_restores_them_exactly():
    model = tiny_htdemucs(seed=5, t_layers=2, t_heads=2)
    dense = [p.detach().clone().flatten() for p in model.parameters()]
    use_sdpa_attention(model)
    packable = [m for p in model.modules() for _, m in p.named_children() if _packable(p, m)]
    assert packable
    before = sum(p.numel() for p in model.parameters())
    assert pack_weights(model) == len(packable)
    # The weights are held packed only: no longer parameters, and not kept twice.
    assert sum(p.numel() for p in model.parameters()) == before - sum(m.weight.numel() for m in packable)
    x = torch.randn(1, 2, 44100)
    with torch.inference_mode():
        random.seed(3)
        packed_out = model(x)
    model._stemset_cpu_ready = True
    leave_cpu(model)
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    restored = [m.weight for p in model.modules() for _, m in p.named_children() if _packable(p, m)]
    assert len(restored) == len(packable)
    # Every restored weight is bit for bit one of the original dense weights (or a block of in_proj).
    for w in restored:
        assert any(torch.equal(w.flatten(), o[i : i + w.numel()]) for o in dense for i in (0, o.numel() // 3))
    with torch.inference_mode():
        random.seed(3)
        assert rel_err(model(x), packed_out) < 1e-5


def _output_then_packed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Demucs' own output for ``x`` (seeded shift); the model then has SDPA and packed linears."""
    random.seed(3)
    expected = model(x)
    use_sdpa_attention(model)
    pack_weights(model)
    return expected


@needs_packing
def test_feed_forward_gelu_moves_into_the_first_linear_layer_and_back():
    model = tiny_htdemucs(seed=5, t_layers=2, t_heads=2)
    x = torch.randn(1, 2, 44100)
    with torch.inference_mode():
        expected = _output_then_packed(model, x)
        layers = [m for m in model.modules() if hasattr(m, "_ff_block")]
        assert len(layers) == 4 and all(m.activation is F.gelu for m in layers)
        assert fuse_feed_forward_gelu(model) == 4
        assert all(m.linear1.gelu and m.activation is not F.gelu for m in layers)
        random.seed(3)
        assert rel_err(model(x), expected) < 1e-5
    model._stemset_cpu_ready = True
    leave_cpu(model)
    assert all(m.activation is F.gelu and isinstance(m.linear1, nn.Linear) for m in layers)


@needs_packing
def test_residual_branches_end_in_one_call_and_leave_cpu_restores_the_layers():
    model = tiny_htdemucs(seed=5, t_layers=2, t_heads=2)
    layers = [m for m in model.modules() if type(m).__name__.endswith("TransformerEncoderLayer")]
    with torch.no_grad():
        for layer in layers:
            layer.gamma_1.scale.uniform_(0.5, 2.0)  # not the tiny init, so a scale left out shows
            layer.gamma_2.scale.uniform_(0.5, 2.0)
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(1, 2, 44100)
    with torch.inference_mode():
        expected = _output_then_packed(model, x)
        fuse_feed_forward_gelu(model)
        assert fuse_residual_branches(model) == len(layers) == 4  # a self and a cross layer per branch
        assert [m.original for m in model.modules() if isinstance(m, ResidualFusedLayer)] == layers
        # the folded layers replace the originals: no weight held twice
        assert all(m.original.linear2 is None for m in model.modules() if isinstance(m, ResidualFusedLayer))
        random.seed(3)
        assert rel_err(model(x), expected) < 1e-5
    model._stemset_cpu_ready = True
    leave_cpu(model)
    assert not any(isinstance(m, (ResidualFusedLayer, PackedLinear)) for m in model.modules())
    assert [m for m in model.modules() if type(m).__name__.endswith("TransformerEncoderLayer")] == layers
    # the folded weights, divided by the scales again: the originals within a float32 rounding
    restored = {n: p.detach() for n, p in model.named_parameters()}
    for name in [n for n in dense if n.endswith(("linear2.weight", "out_proj.weight"))]:
        assert torch.allclose(restored[name], dense[name], rtol=1e-6, atol=0)
    with torch.inference_mode():
        random.seed(3)
        assert rel_err(model(x), expected) < 1e-5


def test_a_zero_layer_scale_keeps_its_layer_unfused():
    model = tiny_htdemucs(seed=5, t_layers=2, t_heads=2)
    use_sdpa_attention(model)
    pack_weights(model)
    layer = next(m for m in model.modules() if type(m).__name__ == "MyTransformerEncoderLayer")
    with torch.no_grad():
        layer.gamma_2.scale[3] = 0
    assert not ResidualFusedLayer.fits(layer)


@needs_packing
def test_attention_left_in_place_keeps_its_dense_out_proj():
    mha = nn.MultiheadAttention(16, 4)  # not batch-first: not swapped, so it reads out_proj.weight itself
    holder = nn.Sequential(mha, nn.Linear(16, 16))
    assert pack_weights(holder) == 1
    assert type(mha.out_proj) is not PackedLinear
    q = torch.randn(5, 1, 16)
    with torch.inference_mode():
        mha(q, q, q)


def test_passive_openmp_is_a_default_the_user_can_override(monkeypatch):
    monkeypatch.delitem(__import__("sys").modules, "torch", raising=False)  # as before torch loads
    env: dict[str, str] = {}
    assert prefer_passive_openmp(env)
    assert env == {WAIT_POLICY_ENV: "PASSIVE"}
    env = {WAIT_POLICY_ENV: "ACTIVE"}
    prefer_passive_openmp(env)
    assert env[WAIT_POLICY_ENV] == "ACTIVE"


def test_passive_openmp_reports_too_late_once_torch_is_loaded():
    env: dict[str, str] = {}
    assert not prefer_passive_openmp(env)
    assert env == {}
