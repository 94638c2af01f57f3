"""The engine equals Demucs' own `Separator.separate_tensor` on the same model and input."""

from __future__ import annotations

import random

import pytest
import torch
from torch.nn import functional as F

from gpu_worker import models
from gpu_worker.engine import NormalisedMix, separate
from gpu_worker.inference import EngineStats
from gpu_worker.strategy import SeparationParams
from tests.model_fixtures import make_model_repo

TOL = 1e-4


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_model_repo(tmp_path_factory.mktemp("models"))


def demucs_reference(name, repo, wav, shifts, overlap=0.25, seed=None, segment=None):
    from demucs.api import Separator

    sep = Separator(
        model=name, repo=repo, device="cpu", shifts=shifts, overlap=overlap, segment=segment, progress=False
    )
    if seed is not None:
        random.seed(seed)
    _, out = sep.separate_tensor(wav.clone())
    return out


def mix(seconds: float, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = int(round(seconds * 44100))
    t = torch.arange(n) / 44100
    tone = 0.3 * torch.sin(2 * torch.pi * 110 * t) + 0.2 * torch.sin(2 * torch.pi * 440 * t)
    return torch.stack([tone, 0.8 * tone]) + 0.05 * torch.randn(2, n, generator=g)


def assert_equal_to_demucs(ours, ref, ordered: bool = False):
    """Every stem within TOL of the reference (relative to its peak); ``ordered``: same stem order too."""
    assert (list(ours) == list(ref)) if ordered else (set(ours) == set(ref))
    for name in ref:
        assert ours[name].shape == ref[name].shape, name
        scale = ref[name].abs().max()
        assert scale > 0
        err = ((ours[name] - ref[name]).abs().max() / scale).item()
        assert err < TOL, f"{name}: max|diff|/max|ref| = {err:.2e}"


# Lengths: shorter than one 1 s segment; not a multiple of the 0.75 s stride; long.
@pytest.mark.parametrize("seconds", [0.37, 5.123])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_single_model_matches_demucs(repo, seconds, batch_size):
    wav = mix(seconds)
    model = models.load_model("htdemucs", repo)
    ours = separate(model, wav, SeparationParams(shifts=0, batch_size=batch_size), torch.device("cpu"))
    assert_equal_to_demucs(ours, demucs_reference("htdemucs", repo, wav, shifts=0))


def test_several_minutes_matches_demucs(repo):
    wav = mix(150.7, seed=3)
    model = models.load_model("htdemucs", repo)
    stats = EngineStats()
    ours = separate(model, wav, SeparationParams(shifts=0, batch_size=16), torch.device("cpu"), stats=stats)
    assert_equal_to_demucs(ours, demucs_reference("htdemucs", repo, wav, shifts=0))
    assert stats.batches < stats.segments  # really batched


def test_bag_with_weights_matches_demucs(repo):
    wav = mix(3.3, seed=1)
    model = models.load_model("tiny_bag", repo)
    ours = separate(model, wav, SeparationParams(shifts=0, batch_size=4), torch.device("cpu"))
    assert_equal_to_demucs(ours, demucs_reference("tiny_bag", repo, wav, shifts=0))


def test_shifts_with_fixed_seed_match_demucs(repo):
    wav = mix(4.2, seed=2)
    model = models.load_model("htdemucs", repo)
    ref = demucs_reference("htdemucs", repo, wav, shifts=2, seed=1234)
    ours = separate(model, wav, SeparationParams(shifts=2, batch_size=5), torch.device("cpu"), rng=random.Random(1234))
    assert_equal_to_demucs(ours, ref)


def test_shifts_in_a_bag_match_demucs(repo):
    wav = mix(2.5, seed=4)
    model = models.load_model("tiny_bag", repo)
    ref = demucs_reference("tiny_bag", repo, wav, shifts=2, seed=99)
    ours = separate(model, wav, SeparationParams(shifts=2, batch_size=8), torch.device("cpu"), rng=random.Random(99))
    assert_equal_to_demucs(ours, ref)


def test_hybrid_hdemucs_and_overlap_and_segment_match_demucs(repo):
    wav = mix(3.9, seed=5)
    model = models.load_model("hdemucs_mmi", repo)
    params = SeparationParams(shifts=0, overlap=0.5, segment=0.8, batch_size=4)
    ours = separate(model, wav, params, torch.device("cpu"))
    assert_equal_to_demucs(ours, demucs_reference("hdemucs_mmi", repo, wav, shifts=0, overlap=0.5, segment=0.8))


def test_htdemucs_shorter_segment_matches_demucs(repo):
    wav = mix(2.2, seed=6)
    model = models.load_model("htdemucs", repo)
    params = SeparationParams(shifts=0, segment=0.6, batch_size=4)
    ours = separate(model, wav, params, torch.device("cpu"))
    assert_equal_to_demucs(ours, demucs_reference("htdemucs", repo, wav, shifts=0, segment=0.6))


def test_skipping_bag_members_keeps_needed_sources_exact(repo):
    wav = mix(2.0, seed=7)
    model = models.load_model("htdemucs_ft", repo)
    full = separate(model, wav, SeparationParams(shifts=0), torch.device("cpu"))
    stats = EngineStats()
    vocals_only = separate(
        model, wav, SeparationParams(shifts=0), torch.device("cpu"), needed_sources=["vocals"], stats=stats
    )
    assert len(stats.models_run) == 1  # three of the four specialists were skipped
    assert torch.allclose(vocals_only["vocals"], full["vocals"], atol=1e-6)


def test_normalised_mix_segments_equal_the_normalised_whole_bit_for_bit():
    wav = mix(1.3, seed=2)
    ref = wav.mean(0)
    mean, std = ref.mean(), ref.std() + 1e-8
    whole = (wav - mean) / std
    segments = NormalisedMix(wav, mean, std)
    for start, length in [(0, 1000), (-700, 2000), (wav.shape[1] - 300, 1000), (-50, wav.shape[1] + 100)]:
        lo, hi = max(0, start), min(wav.shape[1], start + length)
        expected = F.pad(whole[..., lo:hi], (lo - start, start + length - hi))
        assert torch.equal(segments.padded(start, length), expected)
