"""Running Demucs models on a device: device choice, batch size, precision, and the copies back.

Shared by ``engine`` (whole-mix separation) and ``streaming`` (windowed separation).
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .cpu_allocator import keep_freed_memory
from .cpu_inference import leave_cpu, prepare_for_cpu
from .errors import ModelError

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
            raise ModelError(
                f"Device {requested!r} was requested but no CUDA GPU is visible.",
                "Use device 'cpu' or 'auto', or run on a machine with a GPU.",
            )
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def auto_batch_size(device: torch.device, precision: str) -> int:
    if device.type != "cuda":
        return _CPU_BATCH
    free, _total = torch.cuda.mem_get_info(device)
    per_segment = _GPU_BYTES_PER_SEGMENT.get(precision, _GPU_BYTES_PER_SEGMENT["fp32"])
    return int(max(1, min(_MAX_AUTO_BATCH, (free * 0.8) // per_segment)))


def prepare_model(model: Any, device: torch.device, precision: str, stats: EngineStats) -> None:
    """Move ``model`` to ``device`` and set it up for ``precision``; counts it in ``stats``."""
    if device.type != "cpu":
        leave_cpu(model)  # a model prepared for the CPU earlier in this process
    model.to(device)
    if device.type == "cpu":
        prepare_for_cpu(model)  # same outputs, faster kernels (gpu_worker.cpu_inference)
        keep_freed_memory()  # no page faults per forward (gpu_worker.cpu_allocator)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # few distinct shapes: autotuning pays off at once
    if precision != "fp32":
        keep_spectral_ops_fp32(model)
    stats.models_run.append(type(model).__name__)


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


def center_trim(t: torch.Tensor, length: int) -> torch.Tensor:
    delta = t.shape[-1] - length
    if delta:
        t = t[..., delta // 2 : t.shape[-1] - (delta - delta // 2)]
    return t


def keep_spectral_ops_fp32(model: Any) -> None:
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


def autocast(device: torch.device, precision: str):
    if precision == "fp32" or device.type != "cuda":
        # CPU stays float32: bf16 on CPU was slower and less accurate here (benchmarks/RESULTS.md).
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)
