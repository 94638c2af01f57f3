"""Device check: the streaming engine equals engine.separate on CUDA; GPU memory of both.

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl   # demucs & co
    PYTHONPATH=/tmp/site python3 benchmarks/gpu_stream_check.py        # writes $OUT/gpu_stream_check.json

The lent GPU image has PyTorch but not PyAV, soundfile, soxr or pyloudnorm, which only file I/O and
loudness need: they are stubbed here and the loudness meter replaced by a no-op, so this checks the
separation arithmetic on the device, not audio I/O (the CPU tests cover that).
"""

import json
import os
import random
import sys
import time
import traceback
import types

sys.path.insert(0, "/tmp/site")
for name in ("av", "soundfile", "soxr", "pyloudnorm"):
    try:
        __import__(name)
    except ImportError:
        sys.modules[name] = types.ModuleType(name)
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.getcwd())
from gpu_worker import models, stream_stats, streaming
from gpu_worker.engine import separate
from gpu_worker.inference import EngineStats
from gpu_worker.strategy import SeparationParams, parse_strategy


class NoLoudness:
    def __init__(self, *a, **k):
        pass

    def add(self, b):
        pass

    def integrated(self):
        return None


stream_stats.StreamingLoudness = NoLoudness


class Collect:
    def __init__(self):
        self.blocks = []

    def write(self, b):
        self.blocks.append(b.copy())

    def close(self):
        pass

    def abort(self):
        pass


out = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
dev = torch.device("cuda")
OUT = Path(os.environ.get("OUT", "/tmp"))


def save():
    (OUT / "gpu_stream_check.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out), flush=True)


def run_stream(tree, wav, load, seed, window_s):
    sinks = {}

    def fac(n):
        sinks[n] = Collect()
        return sinks[n]

    st = parse_strategy("s", tree)
    stats = EngineStats()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = streaming.separate_blocks_streaming(
        st,
        lambda f: stream_stats.tensor_blocks(wav, f),
        stream_stats.mix_stats_of(wav),
        fac,
        load,
        dev,
        seed=seed,
        window_s=window_s,
        stats=stats,
    )
    torch.cuda.synchronize()
    t = time.perf_counter() - t0
    return (
        {k: torch.from_numpy(np.concatenate(v.blocks, axis=1)) for k, v in sinks.items()},
        t,
        stats,
        torch.cuda.max_memory_allocated() / 2**20,
    )


def run_engine(model, wav, params, seed):
    stats = EngineStats()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    ref = separate(model, wav, params, dev, rng=random.Random(seed), stats=stats, output_device="cpu")
    torch.cuda.synchronize()
    return ref, time.perf_counter() - t0, stats, torch.cuda.max_memory_allocated() / 2**20


def err(a, b):
    return max(float((a[k].float() - b[k].float()).abs().max() / b[k].abs().max()) for k in b)


try:
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    from gpu_worker.demo_models import make_model_repo

    repo = make_model_repo(Path("/tmp/tinyrepo"))
    load = lambda n: models.load_model(n, repo)
    sys.path.insert(0, os.getcwd())
    from tests.test_engine_equivalence import mix

    wav = mix(20.3, seed=1)
    four = {"drums": "drums", "bass": "bass", "other": "other", "vocals": "vocals"}
    for prec, bs in (("fp32", 8), ("bf16", 16)):
        ref, _, _, _ = run_engine(load("htdemucs"), wav, SeparationParams(shifts=2, batch_size=bs, precision=prec), 5)
        ours, _, _, _ = run_stream(
            {"_": "htdemucs", **four, "__params": {"shifts": 2, "batch_size": bs, "precision": prec}}, wav, load, 5, 3.0
        )
        out[f"tiny_{prec}_rel_err"] = err(ours, ref)
        save()
except Exception:
    out["tiny_error"] = traceback.format_exc()[-1500:]
    save()

try:
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    from benchmarks.common import synthetic_mix, write_release_repo

    rrepo = write_release_repo(Path("/tmp/relrepo"))
    rload = lambda n: models.load_model(n, rrepo)
    tree = {"_": "htdemucs", **four, "__params": {"shifts": 1, "batch_size": 64, "precision": "bf16"}}
    warm = synthetic_mix(60.0, seed=2)
    run_engine(rload("htdemucs"), warm, SeparationParams(shifts=1, batch_size=64, precision="bf16"), 1)
    run_stream(tree, warm, rload, 1, None)
    for secs in (240.0, 1200.0):
        wav = synthetic_mix(secs, seed=3)
        ref, te, se, me = run_engine(
            rload("htdemucs"), wav, SeparationParams(shifts=1, batch_size=64, precision="bf16"), 1
        )
        ours, ts, ss, ms = run_stream(tree, wav, rload, 1, None)
        out[f"release_bf16_b64_{int(secs)}s"] = {
            "engine_s": round(te, 3),
            "engine_rtf": round(secs / te, 1),
            "engine_gpu_peak_mb": round(me),
            "stream_s": round(ts, 3),
            "stream_rtf": round(secs / ts, 1),
            "stream_gpu_peak_mb": round(ms),
            "segments": [se.segments, ss.segments],
            "batches": [se.batches, ss.batches],
            "rel_err_stream_vs_engine": err(ours, ref),
        }
        save()
        del ref, ours
except Exception:
    out["release_error"] = traceback.format_exc()[-1500:]
    save()
