"""Batched overlap-add inference for Demucs models, and strategy trees built on it.

Demucs' ``apply_model`` runs one segment per forward pass. Here every segment of every shift
is cut first, the segments are stacked into batches on the device, and the outputs are
overlap-added with Demucs' own segment length, stride, padding and triangular transition
weights, so the result equals ``demucs.api.Separator.separate_tensor`` to float rounding.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch.nn import functional as F

from .errors import ModelError, StrategyError
from .strategy import SeparationParams, Strategy, StrategyNode

Progress = Callable[[int], None]  # called with the number of segments just finished

# Activation memory per 7.8 s htdemucs segment in a batched forward, used to size batches from
# free GPU memory when the config gives no batch size: ~225 MB fp32 and ~200 MB bf16 measured on
# an H100 at batch 64 (benchmarks/RESULTS.md), with headroom for other models.
_GPU_BYTES_PER_SEGMENT = {"fp32": 0.35e9, "bf16": 0.3e9, "fp16": 0.3e9}
_MAX_AUTO_BATCH = 64
_CPU_BATCH = 1


@dataclass
class EngineStats:
    """Counters a job reports: how much model work a separation took."""

    segments: int = 0
    batches: int = 0
    forward_s: float = 0.0
    models_run: list[str] = field(default_factory=list)


def pick_device(requested: str | None = None) -> torch.device:
    if requested and requested != "auto":
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ModelError(f"Device {requested!r} was requested but no CUDA GPU is visible.",
                             "Use device 'cpu' or 'auto', or run on a machine with a GPU.")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def auto_batch_size(device: torch.device, precision: str) -> int:
    if device.type != "cuda":
        return _CPU_BATCH
    free, _total = torch.cuda.mem_get_info(device)
    per_segment = _GPU_BYTES_PER_SEGMENT.get(precision, _GPU_BYTES_PER_SEGMENT["fp32"])
    return int(max(1, min(_MAX_AUTO_BATCH, (free * 0.8) // per_segment)))


def count_segments(model: Any, length: int, params: SeparationParams) -> int:
    """How many segment forward passes separating ``length`` samples with ``model`` takes."""
    subs = _sub_models(model)
    total = 0
    for sub, _weights in subs:
        seg_len = int(sub.samplerate * _segment_seconds(sub, params))
        stride = max(1, int((1 - params.overlap) * seg_len))
        if params.shifts:
            max_shift = int(0.5 * sub.samplerate)
            # Each shifted view is between length and length + max_shift samples long.
            per_shift = -(-(length + max_shift // 2) // stride)
            total += params.shifts * per_shift
        else:
            total += -(-length // stride)
    return total


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
    mean = ref.mean()
    std = ref.std() + 1e-8
    mix = ((wav - mean) / std)[None]
    out = _apply(model, mix, params, device, needed_sources, rng, progress, stats)
    out = out * std + mean
    target = home if output_device is None else torch.device(output_device)
    return {name: to_device(stem, target) for name, stem in zip(model.sources, out[0])}


def _sub_models(model: Any) -> list[tuple[Any, list[float]]]:
    from demucs.apply import BagOfModels

    if isinstance(model, BagOfModels):
        return list(zip(model.models, model.weights))
    return [(model, [1.0] * len(model.sources))]


def _segment_seconds(model: Any, params: SeparationParams) -> float:
    return float(params.segment if params.segment is not None else model.segment)


def _apply(model, mix, params, device, needed_sources, rng, progress, stats) -> torch.Tensor:
    """Bag weighting as demucs.apply.apply_model: per-source weighted mean of the members."""
    from demucs.apply import BagOfModels

    if not isinstance(model, BagOfModels):
        return _apply_single(model, mix, params, device, rng, progress, stats)
    needed = set(needed_sources) if needed_sources is not None else set(model.sources)
    needed_idx = [k for k, s in enumerate(model.sources) if s in needed]
    estimates: torch.Tensor | None = None
    totals = [0.0] * len(model.sources)
    for sub, weights in zip(model.models, model.weights):
        if not any(weights[k] for k in needed_idx):
            continue  # contributes to no kept source (e.g. htdemucs_ft's per-stem specialists)
        res = _apply_single(sub, mix, params, device, rng, progress, stats)
        for k, w in enumerate(weights):
            res[:, k] *= w
            totals[k] += w
        estimates = res if estimates is None else estimates + res
    assert estimates is not None, "a bag keeps at least one source"
    for k, total in enumerate(totals):
        if total:
            estimates[:, k] /= total
    return estimates


@dataclass
class _Job:
    """One model forward on one padded segment, and where its output goes."""

    view: int  # which shifted view of the mix
    offset: int  # segment start inside the view
    length: int  # valid samples the segment contributes
    start: int  # where the padded model input starts in the (shift-padded) mix
    valid: int  # model input length


def _apply_single(model, mix, params, device, rng, progress, stats) -> torch.Tensor:
    """One model, all shifts, all segments, batched. Mirrors apply_model's shift/split/pad logic."""
    from demucs.htdemucs import HTDemucs

    _, channels, length = mix.shape
    sr = model.samplerate
    model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # few distinct shapes: autotuning pays off at once
    if params.precision != "fp32":
        _keep_spectral_ops_fp32(model)
    stats.models_run.append(type(model).__name__)

    # Views of the mix: Demucs pads by max_shift on both sides and reads each shifted view
    # out of that padded tensor, so segment padding may take real samples past the view's end.
    segment = _segment_seconds(model, params)
    seg_len = int(sr * segment)
    stride = int((1 - params.overlap) * seg_len)
    if stride <= 0:
        raise StrategyError(f"overlap {params.overlap} leaves no stride for a {segment}s segment.")

    if params.shifts:
        max_shift = int(0.5 * sr)
        base = _padded(mix, -max_shift, length + 2 * max_shift)
        views = []
        draws_per_forward = _random_draws_per_forward(model)
        for _ in range(params.shifts):
            offset = rng.randint(0, max_shift)
            view_len = length + max_shift - offset
            views.append((offset, view_len, max_shift - offset))
            # Demucs draws the next offset after this view's forwards, each of which (HTDemucs'
            # sinusoidal embedding) draws from the same generator: replay those draws so a seed
            # gives Demucs' exact offsets.
            for _ in range(len(range(0, view_len, stride)) * draws_per_forward):
                rng.randrange(model.crosstransformer.sin_random_shift + 1)
    else:
        base = mix
        views = [(0, length, 0)]
    weight = torch.cat([torch.arange(1, seg_len // 2 + 1), torch.arange(seg_len - seg_len // 2, 0, -1)])
    weight = (weight / weight.max()).to(device)

    jobs: list[_Job] = []
    for v, (view_start, view_len, _trim) in enumerate(views):
        for off in range(0, view_len, stride):
            chunk_len = min(view_len - off, seg_len)
            if isinstance(model, HTDemucs) and params.segment is not None:
                valid = int(params.segment * sr)
            elif hasattr(model, "valid_length"):
                valid = model.valid_length(chunk_len)
            else:
                valid = chunk_len
            delta = valid - chunk_len
            start = view_start + off - delta // 2
            jobs.append(_Job(v, off, chunk_len, start, valid))

    outs = [torch.zeros(len(model.sources), channels, view_len, device=device) for (_, view_len, _) in views]
    sums = [torch.zeros(view_len, device=device) for (_, view_len, _) in views]
    batch_size = params.batch_size or auto_batch_size(device, params.precision)

    # Segments of equal padded length share a batch (all of them for HTDemucs).
    by_len: dict[int, list[_Job]] = {}
    for job in jobs:
        by_len.setdefault(job.valid, []).append(job)
    for group in by_len.values():
        for i in range(0, len(group), batch_size):
            batch = group[i : i + batch_size]
            x = torch.stack([_padded(base[0], j.start, j.valid) for j in batch])
            t0 = time.perf_counter()
            with torch.inference_mode(), _autocast(device, params.precision):
                y = model(x)
            y = y.float()
            stats.forward_s += time.perf_counter() - t0
            stats.batches += 1
            stats.segments += len(batch)
            for j, y_j in zip(batch, y):
                y_j = _center_trim(y_j, j.length)
                w = weight[: j.length]
                outs[j.view][..., j.offset : j.offset + j.length] += w * y_j
                sums[j.view][j.offset : j.offset + j.length] += w
            if progress:
                progress(len(batch))

    result = torch.zeros(1, len(model.sources), channels, length, device=device)
    for (_, _view_len, trim), out, total in zip(views, outs, sums):
        out /= total
        result[0] += out[..., trim:]
    if params.shifts:
        result /= params.shifts
    return result


_staging: dict[int, torch.Tensor] = {}
_STAGING_ELEMENTS = 8 << 20  # 32 MB of float32


def to_device(t: torch.Tensor, target: torch.device) -> torch.Tensor:
    """``t.to(target)``, but GPU -> CPU goes through a reused pinned buffer in 32 MB chunks.

    A plain copy into pageable memory ran at ~1.5 GB/s on an H100 host (a third of the whole
    engine's time for a 4-minute song); pinned staging runs at PCIe speed.
    """
    if t.device.type != "cuda" or target.type != "cpu":
        return t.to(target)
    src = t.contiguous().view(-1)
    out = torch.empty(t.shape, dtype=t.dtype)
    dst = out.view(-1)
    key = t.device.index or 0
    if key not in _staging or _staging[key].dtype != t.dtype:
        _staging[key] = torch.empty(_STAGING_ELEMENTS, dtype=t.dtype, pin_memory=True)
    buf = _staging[key]
    for i in range(0, src.numel(), _STAGING_ELEMENTS):
        n = min(_STAGING_ELEMENTS, src.numel() - i)
        buf[:n].copy_(src[i : i + n], non_blocking=True)
        torch.cuda.current_stream(t.device).synchronize()
        dst[i : i + n].copy_(buf[:n])
    return out


def _random_draws_per_forward(model: Any) -> int:
    """How many times one forward of ``model`` draws from Python's ``random`` (Demucs 4.1)."""
    cross = getattr(model, "crosstransformer", None)
    return 1 if cross is not None and getattr(cross, "emb", None) == "sin" else 0


def _padded(t: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """t[..., start:start+length], zero-filled where the window leaves t (TensorChunk.padded)."""
    total = t.shape[-1]
    lo, hi = max(0, start), min(total, start + length)
    return F.pad(t[..., lo:hi], (lo - start, start + length - hi))


def _center_trim(t: torch.Tensor, length: int) -> torch.Tensor:
    delta = t.shape[-1] - length
    if delta:
        t = t[..., delta // 2 : t.shape[-1] - (delta - delta // 2)]
    return t


def _keep_spectral_ops_fp32(model: Any) -> None:
    """Run (H/HT)Demucs' complex-valued mask and inverse STFT in float32 under autocast.

    Complex tensors have no bfloat16/float16 form, so these two steps take their input back to
    float32; the convolutions and the transformer, where the time goes, stay in low precision.
    Patched once per model instance; a no-op in float32.
    """
    if getattr(model, "_stemset_fp32_spectral", False):
        return
    for name in ("_mask", "_ispec"):
        original = getattr(model, name, None)
        if original is None:
            continue

        def wrapped(*args, __original=original, **kwargs):
            args = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
            with torch.autocast(device_type="cuda", enabled=False), torch.autocast(device_type="cpu", enabled=False):
                return __original(*args, **kwargs)

        setattr(model, name, wrapped)
    model._stemset_fp32_spectral = True


def _autocast(device: torch.device, precision: str):
    if precision == "fp32" or device.type != "cuda":
        # CPU stays float32: bf16 on CPU was slower and less accurate here (benchmarks/RESULTS.md).
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


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
        missing = sorted(set(node.outputs) - set(model.sources))
        if missing:
            raise StrategyError(
                f"Strategy {strategy.name!r}: model {node.model!r} at {path} has no output(s) {missing}; "
                f"it produces {list(model.sources)}."
            )
        if model.samplerate != 44100:
            raise ModelError(f"Model {node.model!r} runs at {model.samplerate} Hz; Stemset feeds 44100 Hz.")
        sources = separate(model, mix, node.params, device, needed_sources=node.outputs.keys(),
                           rng=rng, progress=progress, stats=stats, output_device=device)
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


def describe_models(load: Callable[[str], Any], names: Iterable[str]) -> Mapping[str, list[str]]:
    return {name: list(load(name).sources) for name in names}
