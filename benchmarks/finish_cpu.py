"""CPU seconds of a job's work besides separating, for one tree of the code (before/after a change).

    python benchmarks/finish_cpu.py .              # this tree
    git archive 8ce9797 | tar -x -C /tmp/base && cp benchmarks/common.py /tmp/base/benchmarks/
    (cd /tmp/base && python /path/to/benchmarks/finish_cpu.py /tmp/base)   # the worker before issue 12

Four synthetic 240 s stereo stems in memory; ``time.process_time()`` of measuring them (the
tree's own describe/analyse function) and of encoding them to each output format, single thread.
A tree whose encoder takes ``aac_coder`` also gets ``m4a_fast`` (FFmpeg's ``aac_coder=fast``) and,
with ``--repeat N``, m4a and m4a_fast encoded N times in turn (the least CPU time counts), so
load on a shared machine touches both alike.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import tempfile
import time


def main(root: str, repeat: int = 1) -> dict:
    sys.path.insert(0, root)
    from benchmarks.common import synthetic_mix
    from gpu_worker.audio.encode import encode_audio

    names = ("drums", "bass", "other", "vocals")
    stems = {k: synthetic_mix(240.0, seed=i).numpy() * (0.3 + 0.1 * i) for i, k in enumerate(names)}
    tmp = tempfile.mkdtemp()
    out: dict = {"code": root}
    if not os.path.exists(os.path.join(root, "gpu_worker", "stages.py")):  # before issue 12
        from gpu_worker.worker import _describe

        def measure(s):
            return _describe(s, 0)
    else:
        from gpu_worker.audio.analyse import analyse_stem as measure

        measure(stems["bass"][:, :44100])  # scipy imported before the clock starts
    t0 = time.process_time()
    for s in stems.values():
        measure(s)
    out["analyse_cpu_s"] = round(time.process_time() - t0, 3)
    coders = "aac_coder" in inspect.signature(encode_audio).parameters
    aac = ("m4a", "m4a_fast") if coders else ("m4a",)
    best: dict[str, float] = {}
    for _ in range(max(1, repeat)):
        for fmt in aac:
            extra = {"aac_coder": "fast" if fmt == "m4a_fast" else "twoloop"} if coders else {}
            t0 = time.process_time()
            for k, s in stems.items():
                encode_audio(s, os.path.join(tmp, f"{k}.m4a"), "m4a", 192, **extra)
            best[fmt] = min(best.get(fmt, float("inf")), time.process_time() - t0)
    for fmt in aac:
        out[f"encode_{fmt}_cpu_s"] = round(best[fmt], 2)
    for fmt in ("opus", "flac", "wav"):
        t0 = time.process_time()
        for k, s in stems.items():
            encode_audio(s, os.path.join(tmp, f"{k}.{fmt}"), fmt, 192 if fmt in ("m4a", "opus") else None)
        out[f"encode_{fmt}_cpu_s"] = round(time.process_time() - t0, 2)
    out["load_average"] = [round(v, 2) for v in os.getloadavg()]
    return out


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--repeat=")]
    repeat = next((int(a.split("=", 1)[1]) for a in sys.argv[1:] if a.startswith("--repeat=")), 1)
    print(json.dumps(main(args[0] if args else ".", repeat)))
