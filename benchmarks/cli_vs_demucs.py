"""`stemset separate` against the Demucs CLI as whole processes on the CPU: wall time, CPU seconds
and peak RSS of each process (from ``os.wait4``), runs alternating, medians.

Both load the same release-size htdemucs (41.5 M parameters, random weights) from a Demucs repo
folder, separate the same synthetic stereo WAV with shifts=1, overlap=0.25, and write WAV (or a
lossy format: Demucs' mp3 against Stemset's m4a / opus).

    python benchmarks/cli_vs_demucs.py --json --seconds 20 --runs 3
    python benchmarks/cli_vs_demucs.py --json --seconds 240 --runs 3 --lossy m4a
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit, machine, synthetic_mix, write_release_repo  # noqa: E402

CONFIG = """
models: {{repo: {repo}}}
profiles:
  bench: {{strategies: [htdemucs], output: {{format: {fmt}}}}}
strategies:
  htdemucs:
    _: htdemucs
    drums: drums
    bass: bass
    other: other
    vocals: vocals
    __params: {{shifts: 1, overlap: 0.25}}
"""


RATIOS = ("wall_s", "cpu_s", "peak_rss_mb")


def steal_seconds() -> float | None:
    """CPU time the hypervisor gave to other guests, all cores together (Linux ``/proc/stat``):
    on a shared VM, wall time that neither process could use."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def measure(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run ``cmd`` to the end; its wall seconds, CPU seconds (user + system), peak RSS, and the
    seconds stolen from this VM's cores meanwhile."""
    started, steal = time.perf_counter(), steal_seconds()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    stolen = steal_seconds()
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[0:4]} failed:\n{err[-2000:]}")
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
        **({} if steal is None or stolen is None else {"steal_s": round(stolen - steal, 2)}),
    }


def commands(tmp: Path, wav: Path, repo: Path, fmt: str) -> dict[str, list[str]]:
    config = tmp / f"config-{fmt}.yaml"
    config.write_text(CONFIG.format(repo=repo, fmt=fmt))
    stemset = [sys.executable, "-m", "stemset_assets.cli", "--config", str(config), "separate", "-q"]
    stemset += ["--device", "cpu", "--format", fmt, "--out", str(tmp / "stemset"), str(wav)]
    demucs = [sys.executable, "-m", "demucs", "--repo", str(repo), "-n", "htdemucs", "-d", "cpu"]
    demucs += ["--shifts", "1", "--overlap", "0.25", "-o", str(tmp / "demucs"), str(wav)]
    if fmt != "wav":
        demucs.insert(-1, "--mp3")
    return {"stemset": stemset, "demucs": demucs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--lossy", choices=["m4a", "opus"], default=None, help="also time a lossy format")
    ap.add_argument("--repo", default=str(Path(tempfile.gettempdir()) / "stemset-release-repo"))
    ap.add_argument(
        "--stemset-env",
        action="append",
        default=[],
        metavar="NAME=VALUE[,NAME=VALUE]",
        help="also time stemset with these environment settings (repeatable; one variant each)",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    repo = write_release_repo(Path(args.repo))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    results = {}
    with tempfile.TemporaryDirectory(prefix="stemset-cli-bench-") as tmp_name:
        tmp = Path(tmp_name)
        wav = tmp / "mix.wav"
        sf.write(wav, synthetic_mix(args.seconds).numpy().T, 44100, subtype="PCM_16")
        for fmt in ["wav"] + ([args.lossy] if args.lossy else []):
            cmds = commands(tmp, wav, repo, fmt)
            envs = {name: env for name in cmds}
            for spec in args.stemset_env:  # variants of stemset, e.g. STEMSET_CPU_FORWARDS=1
                cmds[f"stemset {spec}"] = cmds["stemset"]
                envs[f"stemset {spec}"] = {**env, **dict(kv.split("=", 1) for kv in spec.split(","))}
            runs: dict[str, list[dict]] = {name: [] for name in cmds}
            for _ in range(args.runs):
                for name, cmd in cmds.items():  # alternating: drift in the machine hits all of them
                    runs[name].append(measure(cmd, envs[name]))
            medians = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
            s, d = medians["stemset"], medians["demucs"]
            results[fmt] = {
                "runs": runs,
                "median": medians,
                "stemset_over_demucs": {key: round(s[key] / d[key], 3) for key in RATIOS},
                "over_demucs": {
                    name: {key: round(m[key] / d[key], 3) for key in RATIOS}
                    for name, m in medians.items()
                    if name != "demucs"
                },
            }
    emit(
        {
            "seconds": args.seconds,
            "runs": args.runs,
            "formats": results,
            "load_average_1m": os.getloadavg()[0],
            **machine(),
        },
        args.json,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
