"""Separation of recordings of any length in bounded memory: decode, separate and encode in windows.

``engine.separate`` (like Demucs' ``separate_tensor``) holds the whole mix, every shifted view's
overlap-add buffer and every stem in memory at once: with four stems about 0.3 GB more per minute
of audio, 17 GB for an hour (benchmarks/RESULTS.md). This module gives the same samples (to
float32 rounding) while holding only a window of each:

Pass 1 (:func:`~.stream_stats.scan_file`)
    Streams the decoded mix once and accumulates, in float64, what Demucs' normalisation needs
    over the *whole* file: the length and the mean and (unbiased) standard deviation of the mono
    mix ``wav.mean(0)`` (Chan et al.'s pairwise update, so no sum of squares cancels), plus the
    mix energy for the residual level.

Pass 2 (:func:`separate_blocks_streaming`), one per strategy node in tree order
    Every model forward is planned up front by :mod:`.segments`, the planner ``engine`` uses: the same
    segment length, stride and padded input length per segment, the same shifted views with their
    offsets drawn from the same ``random.Random`` in the same order (the root node's bag members
    first, then each chained child depth first, replaying the draws HTDemucs' forwards make), and
    the same bag members skipped. In mix coordinates a segment of view ``v`` at view offset
    ``off`` writes output samples ``[off - trim_v, off - trim_v + chunk)`` and reads the
    normalised mix at ``[off - trim_v - delta // 2, ... + valid)`` with zeros outside the
    recording, which is exactly what Demucs' zero-padded ``TensorChunk`` reads.

    The output is cut into windows of ``W`` samples. Window ``k`` runs (batched, grouped by model
    and padded length) every segment whose first output sample falls in ``[k W, (k+1) W)``; every
    segment covering a sample before ``(k+1) W`` starts before it, so after window ``k`` those
    samples are final and are emitted. A segment's output is weighted by Demucs' triangular
    transition weight divided by the total weight its view puts on each sample (a function of
    the schedule alone, computed from the neighbouring segments), times a per-source coefficient
    ``bag_weight / bag_total / shifts``; so one rolling buffer serves every view of every bag
    member (no per-member or per-view buffers, whatever ``shifts`` and the bag size are). Emitted
    blocks are de-normalised and go straight to one writer per final stem.

    A chained node's input is its parent's output: while the parent runs, that output is spilled
    to a raw float32 file (interleaved frames, exactly the samples ``engine.run_strategy`` passes
    on) and its normalisation statistics are accumulated; the child then streams from the file.

Per stem a :class:`~.stream_stats.StreamStats` accumulates what the worker reports (frames, NaN/Inf count,
peak, sum of squares and BS.1770 integrated loudness, mirroring pyloudnorm's gating blocks: one
float per 100 ms, so 600 kB for two hours). The residual ``mix - sum(stems)`` energy is
accumulated per block; with chained nodes, whose stems appear in later passes, the partial
residual lives in a float64 scratch file updated in place by each pass.

Memory: the input window plus one segment of context (kept as the decoder's 10 s blocks), one
``(sources, 2, W + segment)`` buffer on the compute device, a 10 s slice of each stem on its way
to the encoders, and one batch of segments. Nothing grows with the recording's length except the
loudness block list. ``W`` is 30 s on the CPU (1.5-3 MB of RSS per second of window, four stems); on a
GPU it grows to hold a full batch of segments (64 x 5.85 s for htdemucs at batch 64).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.nn import functional as F

from .audio.decode import decode_source
from .audio.info import CHANNELS, SAMPLE_RATE, AudioWarning
from .audio.source import open_source
from .errors import ModelError
from .forwards import run_forwards
from .inference import EngineStats, Progress, auto_batch_size, center_trim, prepare_model, to_device
from .segments import Segment, SegmentPlan, View, bag_members, plan_segments, transition_weight
from .strategy import Strategy, StrategyNode, check_node_model
from .stream_scratch import Residual, Spill
from .stream_stats import MixStats, StreamResult, StreamStats, scan_file

DEFAULT_WINDOW_S = 30.0  # output finalised per step (more on a GPU, to fill a batch)
_EMIT_FRAMES = SAMPLE_RATE * 10  # finished output goes to the writers in slices of this size
_DECODE_FRAMES = SAMPLE_RATE * 10  # input block size asked of the decoder


class StemSink(Protocol):
    """What ``writers_factory(stem)`` returns: ``audio.encode.StemWriter`` fits."""

    def write(self, block: np.ndarray) -> None: ...  # float32 (channels, n), finite

    def close(self) -> None: ...

    def abort(self) -> None: ...


# --------------------------------------------------------------------------------------
# Planning: the segments of engine._apply_single (gpu_worker.segments), grouped by window
# --------------------------------------------------------------------------------------


@dataclass
class _Member:
    """One bag member's segments and how its output joins the result."""

    plan: SegmentPlan
    coef: torch.Tensor  # (sources,) bag weight / bag total / shifts
    batch_size: int
    weight: torch.Tensor | None = None  # triangular transition weight, on the device
    _scales: dict = field(default_factory=dict)

    def scale(self, view: View, off: int, chunk_len: int) -> torch.Tensor:
        """weight / (total weight of the view) over [off, off + chunk_len): what turns a segment's
        output into its share of the overlap-added result. Only segments near a view's ends see a
        different neighbourhood, so all others share one cached tensor."""
        p = self.plan
        key = (min(off, p.seg_len + p.stride), min(view.length - off, 2 * p.seg_len + p.stride), chunk_len)
        if key not in self._scales:
            self._scales[key] = self.weight[:chunk_len] / p.weight_sum(self.weight, view, off, chunk_len)
        return self._scales[key]


@dataclass
class _NodePlan:
    node: StrategyNode
    name: str
    sources: list[str]
    members: list[_Member]


def _plan_node(
    node: StrategyNode, model: Any, strategy: Strategy, path: str, length: int, rng: random.Random, device: torch.device
) -> _NodePlan:
    check_node_model(strategy.name, node, model, path)
    if model.audio_channels != CHANNELS:
        raise ModelError(f"Model expects {model.audio_channels} channels, got {CHANNELS}.")
    params = node.params
    subs = bag_members(model, node.outputs)  # the members engine._apply runs (same skipping rule)
    totals = [0.0] * len(model.sources)
    for _sub, weights in subs:
        for k, w in enumerate(weights):
            totals[k] += w
    members = []
    for sub, weights in subs:
        coef = [(w / totals[k] if totals[k] else w) / (params.shifts or 1) for k, w in enumerate(weights)]
        members.append(
            _Member(
                plan=plan_segments(sub, params, length, rng),
                coef=torch.tensor(coef, dtype=torch.float32),
                batch_size=params.batch_size or auto_batch_size(device, params.precision),
            )
        )
    return _NodePlan(node=node, name=path, sources=list(model.sources), members=members)


def _window_frames(window_s: float | None, plans: list[_NodePlan]) -> int:
    if window_s is not None:
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        return max(1, int(round(window_s * SAMPLE_RATE)))
    frames = int(DEFAULT_WINDOW_S * SAMPLE_RATE)
    for plan in plans:  # big enough to fill a batch with one window's segments
        for m in plan.members:
            frames = max(frames, -(-m.batch_size // len(m.plan.views)) * m.plan.stride)
    return frames


# --------------------------------------------------------------------------------------
# Pass 2: one strategy node over a stream of blocks
# --------------------------------------------------------------------------------------


class _Reader:
    """Raw mix samples from a block iterator, for any range at or after the retained start;
    zeros outside [0, length). Keeps the blocks themselves (no growing buffer to re-copy) and
    only those not yet discarded."""

    def __init__(self, blocks: Iterable[np.ndarray], length: int):
        self.blocks = iter(blocks)
        self.length = length
        self.kept: list[tuple[int, np.ndarray]] = []  # (first frame, (channels, n) block)
        self.start = 0  # frames before this were discarded
        self.end = 0  # frames read from the iterator so far

    def fill(self, upto: int) -> None:
        upto = min(upto, self.length)
        while self.end < upto:
            block = next(self.blocks, None)
            if block is None:
                raise RuntimeError(f"the input ended after {self.end} of {self.length} frames")
            block = np.asarray(block, np.float32)
            if block.ndim != 2 or block.shape[0] != CHANNELS:
                raise ValueError(f"input blocks must be ({CHANNELS}, n), got {block.shape}")
            if block.shape[1]:
                self.kept.append((self.end, block))
                self.end += block.shape[1]

    def read(self, a: int, b: int) -> np.ndarray:
        lo, hi = max(a, 0), min(b, self.length)
        if lo >= hi:
            return np.zeros((CHANNELS, b - a), np.float32)
        self.fill(hi)
        if lo < self.start:
            raise RuntimeError(f"frames from {lo} were already discarded (kept from {self.start})")
        parts = []
        for first, block in self.kept:
            last = first + block.shape[1]
            if last <= lo or first >= hi:
                continue
            parts.append(block[:, max(lo, first) - first : min(hi, last) - first])
        x = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        if lo > a or hi < b:
            x = np.pad(x, ((0, 0), (lo - a, b - hi)))
        return x

    def discard_before(self, pos: int) -> None:
        self.start = max(self.start, pos)
        while self.kept and self.kept[0][0] + self.kept[0][1].shape[1] <= self.start:
            self.kept.pop(0)

    def finish(self) -> None:
        self.fill(self.length)
        extra = sum(b.shape[1] for b in self.blocks)
        if self.end + extra != self.length:
            raise RuntimeError(f"the input holds {self.end + extra} frames, expected {self.length}")


def _window_segments(plan: _NodePlan, k: int, window: int) -> list[Segment]:
    w0, w1 = k * window, (k + 1) * window
    return [s for mi, m in enumerate(plan.members) for s in m.plan.window_segments(w0, w1, k == 0, member=mi)]


Emit = Callable[[int, np.ndarray, "_Reader"], None]  # (first frame, (sources, 2, n) stems, reader)


def _run_node(
    plan: _NodePlan,
    blocks: Iterable[np.ndarray],
    length: int,
    mix_stats: MixStats,
    window: int,
    device: torch.device,
    emit: Emit,
    progress: Progress | None,
    stats: EngineStats,
) -> None:
    mean, std = mix_stats.normalisation()
    mean_t, std_t = torch.tensor(mean), torch.tensor(std)
    for m in plan.members:
        prepare_model(m.plan.model, device, plan.node.params.precision, stats)
        m.weight = transition_weight(m.plan.seg_len).to(device)
        m.coef = m.coef.to(device)
    precision = plan.node.params.precision
    reader = _Reader(blocks, length)
    span = window + max(m.plan.seg_len for m in plan.members)
    acc = torch.zeros(len(plan.sources), CHANNELS, span, device=device)
    mean_d, std_d = mean_t.to(device), std_t.to(device)
    n_windows = -(-length // window)
    jobs = _window_segments(plan, 0, window)
    for k in range(n_windows):
        w0, w1 = k * window, min((k + 1) * window, length)
        groups: dict[tuple[int, int], list[Segment]] = {}
        for job in jobs:
            groups.setdefault((job.member, job.valid), []).append(job)
        for (mi, _valid), group in groups.items():
            m = plan.members[mi]
            batches = [group[i : i + m.batch_size] for i in range(0, len(group), m.batch_size)]

            def normalised(batch: list[Segment]) -> torch.Tensor:
                return torch.stack([_normalised(reader, j.in_start, j.valid, mean_t, std_t) for j in batch]).to(device)

            for batch, y in run_forwards(m.plan.model, batches, normalised, device, precision, stats):
                for j, y_j in zip(batch, y, strict=True):
                    skip = max(0, -j.out_start)
                    if skip >= j.length:
                        continue  # a shifted view's first segment can fall wholly before the mix
                    contrib = center_trim(y_j, j.length) * m.scale(m.plan.views[j.view], j.offset, j.length)
                    a = j.out_start + skip - w0
                    acc[..., a : a + j.length - skip] += m.coef[:, None, None] * contrib[..., skip:]
                y = y_j = contrib = None  # not alive during the next forward (as in engine.separate)
                if progress:
                    progress(len(batch))
        for a in range(0, w1 - w0, _EMIT_FRAMES):  # de-normalise and hand over in slices
            b = min(a + _EMIT_FRAMES, w1 - w0)
            out = to_device(acc[..., a:b] * std_d + mean_d, torch.device("cpu")).numpy()
            emit(w0 + a, out, reader)
            del out
        # Slide the buffer by one window, in place (span = window + longest segment).
        tail = acc[..., window:]
        acc[..., : span - window].copy_(tail.clone() if span - window > window else tail)  # overlap?
        acc[..., span - window :].zero_()
        jobs = _window_segments(plan, k + 1, window) if k + 1 < n_windows else []
        keep = min([j.in_start for j in jobs] + [w1])
        reader.discard_before(keep)
    reader.finish()


def _normalised(reader: _Reader, a: int, n: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The model input [a, a + n) of the normalised mix, zero outside the recording (as Demucs pads)."""
    lo, hi = max(a, 0), min(a + n, reader.length)
    if lo >= hi:
        return torch.zeros(CHANNELS, n)
    x = (torch.from_numpy(reader.read(lo, hi)) - mean) / std
    return F.pad(x, (lo - a, a + n - hi))


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------


def separate_blocks_streaming(
    strategy: Strategy,
    open_blocks: Callable[[int], Iterable[np.ndarray]],
    mix_stats: MixStats,
    writers_factory: Callable[[str], StemSink],
    load: Callable[[str], Any],
    device: torch.device,
    *,
    seed: int | None = None,
    window_s: float | None = None,
    progress: Progress | None = None,
    stats: EngineStats | None = None,
    tmpdir: str | os.PathLike[str] | None = None,
) -> StreamResult:
    """Run ``strategy`` over a mix that ``open_blocks(frames)`` streams as float32 ``(2, n)`` blocks
    (any sizes; ``frames`` is a suggestion), with ``mix_stats`` from a first pass over the same
    blocks. Final stems go to ``writers_factory(stem)`` writers (closed here, aborted on error),
    NaN/Inf written as zeros. Equal to ``engine.run_strategy`` with the same ``seed``.
    ``window_s`` (default: 30 s, or more where a batch of segments needs it) sets the memory.
    Chained nodes spill their input to ``tmpdir`` (default: a new temporary folder)."""
    length = mix_stats.frames
    if length <= 0:
        raise ValueError("cannot separate an empty mix")
    stats = stats or EngineStats()
    rng = random.Random(seed) if seed is not None else random.Random()
    started = time.perf_counter()
    encode_s = 0.0

    # Plan every node first, in run_strategy's order, so the shift offsets are drawn as it draws them.
    nodes: list[tuple[StrategyNode, str]] = []

    def walk(node: StrategyNode, path: str) -> None:
        nodes.append((node, path))
        for source, target in node.outputs.items():
            if isinstance(target, StrategyNode):
                walk(target, f"{path}.{source}")

    walk(strategy.root, strategy.name)
    plans = [_plan_node(node, load(node.model), strategy, path, length, rng, device) for node, path in nodes]
    window = _window_frames(window_s, plans)

    own_tmp = tmpdir is None
    scratch = Path(tempfile.mkdtemp(prefix="stemset-stream-") if own_tmp else tmpdir)
    chained = len(plans) > 1
    results = {name: StreamStats(length) for name in strategy.stems}
    writers: dict[str, StemSink] = {}
    spills: dict[int, Spill] = {}  # id(child node) -> its input
    residual = Residual(scratch / f"residual-{os.getpid()}-{id(plans)}.f64" if chained else None)
    try:
        for name in strategy.stems:
            writers[name] = writers_factory(name)
        for index, plan in enumerate(plans):
            node = plan.node
            last = index == len(plans) - 1
            if index == 0:
                node_stats = mix_stats
                blocks = open_blocks(min(window, _DECODE_FRAMES))
            else:
                spill = spills[id(node)]  # stays listed (and removed in `finally`) until done
                spill.close()
                node_stats, blocks = spill.stats, spill.blocks(min(window, _DECODE_FRAMES))
            for source, target in node.outputs.items():
                if isinstance(target, StrategyNode):
                    spills[id(target)] = Spill(scratch / f"{plan.name}.{source}-{os.getpid()}.f32")
            routes = [(k, node.outputs.get(s)) for k, s in enumerate(plan.sources) if s in node.outputs]

            def emit(pos: int, out: np.ndarray, reader: _Reader, routes=routes, first=(index == 0), last=last) -> None:
                nonlocal encode_s
                t0 = time.perf_counter()
                total = np.zeros((CHANNELS, out.shape[-1]), np.float64)
                for k, target in routes:
                    if isinstance(target, StrategyNode):
                        spills[id(target)].write(out[k])
                    else:
                        clean = results[target].clean(out[k])
                        writers[target].write(clean)
                        total += clean
                mix = reader.read(pos, pos + out.shape[-1]) if first else None
                residual.update(pos, mix, total, last)
                del total
                encode_s += time.perf_counter() - t0

            _run_node(plan, blocks, length, node_stats, window, device, emit, progress, stats)
            if index:
                spills.pop(id(node)).remove()
            t0 = time.perf_counter()
            for _k, target in routes:
                if isinstance(target, str):
                    results[target].finish()
                    writers.pop(target).close()
            encode_s += time.perf_counter() - t0
    except BaseException:
        for writer in writers.values():
            try:
                writer.abort()
            except Exception:
                pass
        raise
    finally:
        for spill in spills.values():
            spill.remove()
        residual.remove()
        if own_tmp:
            shutil.rmtree(scratch, ignore_errors=True)
    total_s = time.perf_counter() - started
    return StreamResult(
        stems=results,
        length=length,
        mix_energy=mix_stats.energy,
        residual_energy=residual.energy,
        timings={"separate": total_s - encode_s, "encode": encode_s},
    )


def separate_file_streaming(
    strategy: Strategy,
    input_path,
    writers_factory: Callable[[str], StemSink],
    load: Callable[[str], Any],
    device: torch.device,
    *,
    seed: int | None = None,
    window_s: float | None = None,
    progress: Progress | None = None,
    stats: EngineStats | None = None,
    mix_stats: MixStats | None = None,
    tmpdir: str | os.PathLike[str] | None = None,
) -> StreamResult:
    """Separate an audio file in bounded memory: pass 1 (:func:`scan_file`, skipped when
    ``mix_stats`` is given) and pass 2 decoding it again with ``audio.decode.iter_decode``, whose samples
    are exactly ``decode_audio``'s. Output equals ``run_strategy(strategy, decode_audio(path))``."""
    if mix_stats is None:
        mix_stats, _info = scan_file(input_path)

    def blocks(frames: int) -> Iterator[np.ndarray]:
        with warnings.catch_warnings():  # pass 1 already warned about this file (e.g. a cut-off WAV)
            warnings.simplefilter("ignore", AudioWarning)
            src = open_source(input_path)
        yield from decode_source(src, frames, SAMPLE_RATE, CHANNELS, [0])

    return separate_blocks_streaming(
        strategy,
        blocks,
        mix_stats,
        writers_factory,
        load,
        device,
        seed=seed,
        window_s=window_s,
        progress=progress,
        stats=stats,
        tmpdir=tmpdir,
    )
