"""Batched overlap-add inference for Demucs models, and strategy trees built on it.

Demucs' ``apply_model`` runs one segment per forward pass. Here every segment of every shift
is cut first (:mod:`.segments`), the segments are stacked into batches on the device, and the
outputs are overlap-added with Demucs' own segment length, stride, padding and triangular
transition weights, so the result equals ``demucs.api.Separator.separate_tensor`` to float rounding.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.nn import functional as F

from .errors import ModelError
from .forwards import run_forwards
from .inference import EngineStats, Progress, auto_batch_size, center_trim, prepare_model, to_device
from .segments import Segment, bag_members, count_segments, is_bag, plan_segments, transition_weight
from .strategy import SeparationParams, Strategy, StrategyNode, check_node_model


def separate(
    model: Any,
    wav: torch.Tensor,
    params: SeparationParams,
    device: torch.device,
    *,
    needed_sources: Iterable[str] | None = None,
    rng: random.Random | None = None,
    progress: Progress | None = None,
    stats: EngineStats | None = None,
    output_device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Separate a (channels, length) float32 mix at the model's rate into {source: (channels, length)}.

    Normalises by the mix mean and std as ``demucs.api.Separator.separate_tensor`` does.
    ``needed_sources`` lets a bag skip members that contribute nothing to the kept sources.
    ``rng`` draws the shift offsets; seeded, it gives Demucs' offsets for ``random.seed`` of the same seed.
    Stems are returned on ``output_device`` (default: the device ``wav`` came on).
    """
    if wav.dim() != 2:
        raise ValueError(f"expected a (channels, length) tensor, got shape {tuple(wav.shape)}")
    if wav.shape[0] != model.audio_channels:
        raise ModelError(f"Model expects {model.audio_channels} channels, got {wav.shape[0]}.")
    rng = rng or random.Random()
    stats = stats or EngineStats()
    home = wav.device
    # Everything from here to the de-normalised stems stays on the compute device: a 4-minute
    # song's stems are ~340 MB, and copying them back once beats copying every segment.
    wav = wav.to(device)
    ref = wav.mean(0)
    mix = NormalisedMix(wav, ref.mean(), ref.std() + 1e-8)
    del ref
    out = _apply(model, mix, params, device, needed_sources, rng, progress, stats)
    out = out.mul_(mix.std).add_(mix.mean)  # in place: no second copy of every stem
    target = home if output_device is None else torch.device(output_device)
    return {name: to_device(stem, target) for name, stem in zip(model.sources, out[0], strict=True)}


def _apply(model, mix, params, device, needed_sources, rng, progress, stats) -> torch.Tensor:
    """Bag weighting as demucs.apply.apply_model: per-source weighted mean of the members."""
    if not is_bag(model):
        return _apply_single(model, mix, params, device, rng, progress, stats)
    estimates: torch.Tensor | None = None
    totals = [0.0] * len(model.sources)
    for sub, weights in bag_members(model, needed_sources):
        res = _apply_single(sub, mix, params, device, rng, progress, stats)
        for k, w in enumerate(weights):
            res[:, k] *= w
            totals[k] += w
        estimates = res if estimates is None else estimates.add_(res)
    assert estimates is not None, "a bag keeps at least one source"
    for k, total in enumerate(totals):
        if total:
            estimates[:, k] /= total
    return estimates


class NormalisedMix:
    """``(wav - mean) / std`` as Demucs normalises a mix, computed segment by segment: the same
    values (elementwise, so bit for bit), without a normalised copy of the whole song (85 MB at
    4 minutes, held through every forward)."""

    def __init__(self, wav: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
        self.wav, self.mean, self.std = wav, mean, std
        self.channels, self.length = wav.shape

    def padded(self, start: int, length: int) -> torch.Tensor:
        """Normalised samples [start, start + length), zero-filled where the window leaves the mix
        (``TensorChunk.padded`` on the normalised mix)."""
        lo, hi = max(0, start), min(self.length, start + length)
        return F.pad((self.wav[..., lo:hi] - self.mean) / self.std, (lo - start, start + length - hi))


def _apply_single(model, mix: NormalisedMix, params, device, rng, progress, stats) -> torch.Tensor:
    """One model, all shifts, all segments, batched. Mirrors apply_model's shift/split/pad logic."""
    channels, length = mix.channels, mix.length
    prepare_model(model, device, params.precision, stats)
    plan = plan_segments(model, params, length, rng)
    weight = transition_weight(plan.seg_len).to(device)

    # One buffer per view over the mix's own samples: a shifted view's first ``trim`` positions
    # fall before the mix and are dropped (as Demucs drops them after summing), so they are
    # never summed, and the first view's buffer is the result, with no copy.
    outs = [torch.zeros(len(model.sources), channels, length, device=device) for _ in plan.views]
    sums = [torch.zeros(length, device=device) for _ in plan.views]
    batch_size = params.batch_size or auto_batch_size(device, params.precision)

    # Segments of equal padded length share a batch (all of them for HTDemucs).
    by_len: dict[int, list[Segment]] = {}
    for seg in plan.segments():
        by_len.setdefault(seg.valid, []).append(seg)
    batches = [group[i : i + batch_size] for group in by_len.values() for i in range(0, len(group), batch_size)]

    def stacked(batch: list[Segment]) -> torch.Tensor:
        # Segment padding may read real samples past a shifted view's end, zeros past the mix.
        return torch.stack([mix.padded(s.in_start, s.valid) for s in batch])

    for batch, y in run_forwards(model, batches, stacked, device, params.precision, stats):
        for s, y_s in zip(batch, y, strict=True):
            trim = plan.views[s.view].trim
            skip = max(0, trim - s.offset)  # output samples that land before the mix
            if skip >= s.length:
                continue
            y_s = center_trim(y_s, s.length)[..., skip:]
            w = weight[skip : s.length]
            start = s.offset + skip - trim
            outs[s.view][..., start : start + s.length - skip] += w * y_s
            sums[s.view][start : start + s.length - skip] += w
        # Drop this output before the next forward starts: alive, it sits among the forward's
        # freed activations and the kept heap (gpu_worker.cpu_allocator) grows around it.
        y = y_s = None
        if progress:
            progress(len(batch))

    # Sum the views into the first one's buffer (the same sums as into zeros, without a copy).
    result = outs[0].div_(sums[0])
    for out, total in zip(outs[1:], sums[1:], strict=True):
        result += out.div_(total)
    if params.shifts:
        result /= params.shifts
    return result[None]


def run_strategy(
    strategy: Strategy,
    wav: torch.Tensor,
    load: Callable[[str], Any],
    device: torch.device,
    *,
    seed: int | None = None,
    progress: Progress | None = None,
    stats: EngineStats | None = None,
) -> dict[str, torch.Tensor]:
    """Run a strategy tree on a (2, length) 44.1 kHz mix: {final stem name: (2, length)}."""
    rng = random.Random(seed) if seed is not None else None
    stems: dict[str, torch.Tensor] = {}

    def visit(node: StrategyNode, mix: torch.Tensor, path: str) -> None:
        model = load(node.model)
        check_node_model(strategy.name, node, model, path)
        sources = separate(
            model,
            mix,
            node.params,
            device,
            needed_sources=node.outputs.keys(),
            rng=rng,
            progress=progress,
            stats=stats,
            output_device=device,
        )
        for source, target in node.outputs.items():
            if isinstance(target, StrategyNode):
                visit(target, sources[source], f"{path}.{source}")  # chained on the device
            else:
                stems[target] = to_device(sources[source], wav.device)

    visit(strategy.root, wav, strategy.name)
    return {name: stems[name] for name in strategy.stems}


def strategy_segments(strategy: Strategy, length: int, load: Callable[[str], Any]) -> int:
    """Total segment passes a strategy takes on ``length`` samples (for progress bars)."""
    total = 0
    for node in strategy.root.walk():
        total += count_segments(load(node.model), length, node.params)
    return total
