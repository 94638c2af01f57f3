"""CPU inference variants of the release htdemucs, one model forward per 7.8 s segment.

    python benchmarks/cpu_inference.py --json                       # every variant
    python benchmarks/cpu_inference.py --json --variants reference,sdpa --repeats 3

Each variant runs in its own process (thread counts and backend flags are process-wide) on the
same segment; it reports the setup it needed (export, compile, first call), the median wall and
CPU seconds of a forward, its peak RSS, and ``max_rel_err``, max|out - ref| / max|ref| against
Demucs' own model in float32 (``reference``). Variants needing a package that is not installed
(onnxruntime, openvino) report ``skipped``. Only the winners are in the package
(``gpu_worker.cpu_inference``); the others live here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import emit, machine, peak_rss_mb, synthetic_mix, write_release_repo  # noqa: E402

VARIANTS = [
    "reference",  # Demucs' model as loaded, torch's default threads (one per core)
    "threads1",  # the same, one intra-op thread
    "stemset",  # what `stemset separate --device cpu` runs: every kept choice below, together
    "sdpa",  # gpu_worker.cpu_inference.use_sdpa_attention: attention on scaled_dot_product_attention
    "sdpa_threads1",
    "sdpa_passive",  # + OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep instead of spinning)
    "sdpa_spin20000",  # + GOMP_SPINCOUNT=20000: idle threads spin that many times, then sleep
    "sdpa_spin200000",
    "sdpa_kept",  # + gpu_worker.cpu_allocator.keep_freed_memory: glibc reuses freed activations
    "sdpa_kept_passive",
    "sdpa_kept_spin20000",
    "sdpa_kept_spin100000",
    "sdpa_kept_packed_passive",  # + gpu_worker.cpu_inference.pack_weights: oneDNN linears, packed once
    "sdpa_channels_last",  # + 4-D weights in channels-last memory format (oneDNN's preferred)
    "sdpa_mkldnn_off",  # + torch.backends.mkldnn disabled (native convolutions)
    "sdpa_bf16",  # + autocast to bfloat16 (the CPU has AVX512-BF16 / AMX); STFT parts in fp32
    "sdpa_compile",  # + torch.compile (inductor), compile time counted in setup
    "onnxruntime",  # exported core graph (STFT and iSTFT stay in torch) on ONNX Runtime
    "openvino",  # the same graph on OpenVINO
    "openvino_threads1",
]


def load_model(repo: Path):
    from gpu_worker import models

    return models.load_model("htdemucs", repo).models[0]


class Core(torch.nn.Module):
    """HTDemucs.forward between the STFT and the masking/iSTFT (a full-length segment): exportable."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, mix: torch.Tensor, mag: torch.Tensor):
        from einops import rearrange

        m = self.m
        mean = mag.mean(dim=(1, 2, 3), keepdim=True)
        std = mag.std(dim=(1, 2, 3), keepdim=True)
        x = (mag - mean) / (1e-5 + std)
        meant = mix.mean(dim=(1, 2), keepdim=True)
        stdt = mix.std(dim=(1, 2), keepdim=True)
        xt = (mix - meant) / (1e-5 + stdt)
        saved, saved_t, lengths, lengths_t = [], [], [], []
        for idx, encode in enumerate(m.encoder):
            lengths.append(x.shape[-1])
            inject = None
            if idx < len(m.tencoder):
                lengths_t.append(xt.shape[-1])
                tenc = m.tencoder[idx]
                xt = tenc(xt)
                if not tenc.empty:
                    saved_t.append(xt)
                else:
                    inject = xt
            x = encode(x, inject)
            if idx == 0 and m.freq_emb is not None:
                frs = torch.arange(x.shape[-2], device=x.device)
                emb = m.freq_emb(frs).t()[None, :, :, None].expand_as(x)
                x = x + m.freq_emb_scale * emb
            saved.append(x)
        f = x.shape[2]
        x = m.channel_upsampler(rearrange(x, "b c f t-> b c (f t)"))
        x = rearrange(x, "b c (f t)-> b c f t", f=f)
        xt = m.channel_upsampler_t(xt)
        x, xt = m.crosstransformer(x, xt)
        x = m.channel_downsampler(rearrange(x, "b c f t-> b c (f t)"))
        x = rearrange(x, "b c (f t)-> b c f t", f=f)
        xt = m.channel_downsampler_t(xt)
        for idx, decode in enumerate(m.decoder):
            x, pre = decode(x, saved.pop(-1), lengths.pop(-1))
            offset = m.depth - len(m.tdecoder)
            if idx >= offset:
                tdec = m.tdecoder[idx - offset]
                length_t = lengths_t.pop(-1)
                if tdec.empty:
                    xt, _ = tdec(pre[:, :, 0], None, length_t)
                else:
                    xt, _ = tdec(xt, saved_t.pop(-1), length_t)
        b, _, fq, t = mag.shape
        s = len(m.sources)
        x = x.view(b, s, -1, fq, t) * std[:, None] + mean[:, None]
        xt = xt.view(b, s, -1, mix.shape[-1]) * stdt[:, None] + meant[:, None]
        return x, xt


def graph_forward(model, run_core):
    """A forward for ``model`` that runs ``run_core(mix, mag) -> (x, xt)`` between its STFT and iSTFT."""

    def forward(mix: torch.Tensor) -> torch.Tensor:
        length = mix.shape[-1]
        z = model._spec(mix)
        mag = model._magnitude(z)
        x, xt = run_core(mix, mag)
        return xt + model._ispec(model._mask(z, x), length)

    return forward


def export_onnx(model, mix: torch.Tensor, folder: Path) -> Path:
    from gpu_worker.cpu_inference import use_sdpa_attention

    use_sdpa_attention(model)  # not the packed linears: oneDNN's ops do not export
    core = Core(model).eval()
    mag = model._magnitude(model._spec(mix))
    path = folder / "htdemucs_core.onnx"
    with torch.no_grad():
        torch.onnx.export(
            core, (mix, mag), str(path), input_names=["mix", "mag"], output_names=["x", "xt"], dynamo=True
        )
    return path


def build(variant: str, repo: Path, mix: torch.Tensor, tmp: Path):
    """``(forward, setup_s)`` for a variant; setup counts everything but the timed forwards."""
    from gpu_worker.cpu_allocator import keep_freed_memory
    from gpu_worker.cpu_inference import pack_weights, prepare_for_cpu, use_sdpa_attention
    from gpu_worker.inference import keep_spectral_ops_fp32

    t0 = time.perf_counter()
    if "threads1" in variant:
        torch.set_num_threads(1)
    if "kept" in variant or variant == "stemset":
        keep_freed_memory()
    if "mkldnn_off" in variant:
        torch.backends.mkldnn.enabled = False
    model = load_model(repo)
    if variant.startswith("onnxruntime"):
        import onnxruntime as ort

        path = export_onnx(model, mix, tmp)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = torch.get_num_threads()
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

        def run_core(m, g):
            x, xt = sess.run(None, {"mix": m.numpy(), "mag": g.numpy()})
            return torch.from_numpy(x), torch.from_numpy(xt)

        forward = graph_forward(model, run_core)
    elif variant.startswith("openvino"):
        import openvino as ov

        path = export_onnx(model, mix, tmp)
        compiled = ov.Core().compile_model(
            ov.Core().read_model(str(path)),
            "CPU",
            {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": torch.get_num_threads()},
        )

        def run_core(m, g):
            res = compiled([m.numpy(), g.numpy()])
            return torch.from_numpy(res[0]), torch.from_numpy(res[1])

        forward = graph_forward(model, run_core)
    else:
        if variant == "stemset":
            prepare_for_cpu(model)
        elif variant != "reference" and variant != "threads1":
            use_sdpa_attention(model)
        if "packed" in variant:
            pack_weights(model)
        if "channels_last" in variant:
            model.to(memory_format=torch.channels_last)
        forward = model
        if "bf16" in variant:
            keep_spectral_ops_fp32(model)

            def forward(x, __m=model):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return __m(x).float()

        if "compile" in variant:
            forward = torch.compile(model)
    with torch.inference_mode():
        forward(mix)  # first call: kernel selection, compilation
    return forward, time.perf_counter() - t0


def run_variant(variant: str, repo: Path, repeats: int, ref_path: Path | None) -> dict:
    mix = synthetic_mix(7.8)[None]
    mix = (mix - mix.mean()) / mix.std()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            forward, setup = build(variant, repo, mix, Path(tmp))
        except ImportError as err:
            return {"variant": variant, "skipped": f"{type(err).__name__}: {err}"}
        walls, cpus = [], []
        with torch.inference_mode():
            for _ in range(repeats):
                w0, c0 = time.perf_counter(), time.process_time()
                out = forward(mix)
                walls.append(time.perf_counter() - w0)
                cpus.append(time.process_time() - c0)
    result = {
        "variant": variant,
        "threads": torch.get_num_threads(),
        "setup_s": round(setup, 2),
        "forward_s": round(statistics.median(walls), 3),
        "forward_cpu_s": round(statistics.median(cpus), 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    if ref_path is None:
        return {**result, "out": out}
    ref = torch.load(ref_path)
    result["max_rel_err"] = float(((out.float() - ref).abs().max() / ref.abs().max()).item())
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    ap.add_argument("--repeats", type=int, default=3, help="timed forwards per variant (median kept)")
    ap.add_argument("--repo", type=Path, default=Path(tempfile.gettempdir()) / "stemset-release-repo")
    ap.add_argument("--timeout", type=float, default=600, help="seconds a variant may take in all (setup included)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one variant here
    ap.add_argument("--ref", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    repo = write_release_repo(args.repo)
    if args.one:
        res = run_variant(args.one, repo, args.repeats, args.ref)
        out = res.pop("out", None)
        if out is not None:
            torch.save(out, os.environ["STEMSET_REF_OUT"])
            res["max_rel_err"] = 0.0
        print(json.dumps(res))
        return 0
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="stemset-cpu-inf-") as tmp:
        ref = Path(tmp) / "ref.pt"
        me = [sys.executable, str(Path(__file__).resolve()), "--repo", str(repo), "--repeats", str(args.repeats)]
        for variant in ["reference"] + [v for v in args.variants.split(",") if v != "reference"]:
            cmd, run_env = me + ["--one", variant, "--ref", str(ref)], env
            if variant == "reference":
                cmd, run_env = me + ["--one", variant], {**env, "STEMSET_REF_OUT": str(ref)}
            if "passive" in variant or variant == "stemset":
                run_env = {**run_env, "OMP_WAIT_POLICY": "PASSIVE"}
            if "_spin" in variant:
                run_env = {**run_env, "GOMP_SPINCOUNT": variant.rsplit("_spin", 1)[1]}
            try:
                proc = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                rows.append({"variant": variant, "timed_out_after_s": args.timeout})
                print(json.dumps(rows[-1]), file=sys.stderr)
                continue
            if proc.returncode:
                rows.append({"variant": variant, "failed": proc.stderr.strip().splitlines()[-1][:300]})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    emit(
        {
            "segment_s": 7.8,
            "repeats": args.repeats,
            "variants": rows,
            "load_average_1m": os.getloadavg()[0],
            **machine(),
        },
        args.json,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
