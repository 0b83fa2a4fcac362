"""INT8 vision encoder vs PyTorch eager: latency, size and image-embedding cosine (not a test).

    python -m benchmarks.quant_vision [--preset base] [--threads 2] [--runs 10] [--work DIR] [--openvino]

Random weights of the preset (BLIP ViT-B/16 at 384 for `base`), batch 1, the same intra-op thread
count for PyTorch and ONNX Runtime, median of `--runs` runs after two warm-up turns; PyTorch and
every graph run in turns so that load from other processes falls on all alike. Each variant is made
by the pass itself (`apply`, gated on the module's reference cases); the cosines printed are the
gate's (worst image-embedding row over the validation cases) and one fresh batch-1 image's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from converter_core.export import export_with_torch
from converter_core.validate import torch_references
from plugins.blip.graphs import PIXEL_VALUES, VISION_ENCODER
from plugins.blip.presets import random_source
from plugins.blip.recipes import RECIPE, BlipConversion, module_spec
from plugins.quant.fusion import FusionConfig, FusionPass
from plugins.quant.int8_dynamic import Int8DynamicConfig, Int8DynamicPass
from plugins.quant.int8_static import Int8StaticConfig, Int8StaticPass
from plugins.quant.measure import LatencyConfig


def ort_session(path: Path, threads: int, openvino: str | None = None) -> ort.InferenceSession:
    """A session on the default CPU EP, or on OpenVINO's CPU plugin at `openvino` inference precision
    ("f32", or "bf16": its float ops in bfloat16, on AMX where the CPU has it)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if openvino is None:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    config = json.dumps({"CPU": {"INFERENCE_PRECISION_HINT": openvino}})
    session = ort.InferenceSession(str(path), options, providers=[
        ("OpenVINOExecutionProvider", {"device_type": "CPU", "num_of_threads": str(threads), "load_config": config})])
    if session.get_providers()[0] != "OpenVINOExecutionProvider":  # ORT falls back to the CPU EP silently
        raise RuntimeError(f"{path.name}: the session runs on {session.get_providers()}, not on OpenVINO")
    return session


def cosine(expected: np.ndarray, actual: np.ndarray) -> float:
    a = expected.reshape(-1, expected.shape[-1]).astype(np.float64)
    b = actual.reshape(-1, actual.shape[-1]).astype(np.float64)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="base")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--work", type=Path, default=None, help="keep the graphs here (default: a temporary folder)")
    parser.add_argument("--openvino", action="store_true",
                        help="also time every graph on the OpenVINO EP (needs onnxruntime-openvino), in f32 and bf16")
    parser.add_argument("--variants", default="int8-dynamic,int8-dynamic-per-channel,int8-dynamic-no-conv,"
                                                "fusion+int8-dynamic,int8-static,int8-static-per-channel")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="quant-vision-"))
    work.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    source = random_source(args.preset, parts=("captioning",))
    wrapper = RECIPE[VISION_ENCODER].build(source).eval()
    spec = module_spec(RECIPE[VISION_ENCODER], BlipConversion(source))
    fp32 = work / "vision_encoder.onnx"
    if not fp32.exists():
        export_with_torch(wrapper, spec, fp32)
    references = torch_references(wrapper, spec, spec.atol)
    print(f"{args.preset}: image {source.image_size}, exported and referenced in {time.perf_counter() - started:.0f} s")

    pixels = np.random.default_rng(123).standard_normal((1, 3, source.image_size, source.image_size)).astype(np.float32)
    with torch.inference_mode():
        expected = wrapper(torch.from_numpy(pixels)).numpy()

    quick = LatencyConfig(runs=1, warmup=0, min_seconds=0, threads=args.threads)
    makers = {
        "int8-dynamic": lambda: Int8DynamicPass("int8-dynamic", Int8DynamicConfig(latency=quick)),
        "int8-dynamic-per-channel": lambda: Int8DynamicPass("pc", Int8DynamicConfig(per_channel=True, latency=quick)),
        "int8-dynamic-no-conv": lambda: Int8DynamicPass("nc", Int8DynamicConfig(op_types=("MatMul", "Gemm"), latency=quick)),
        "fusion": lambda: FusionPass(FusionConfig(latency=quick)),
        "int8-static": lambda: Int8StaticPass("int8-static", Int8StaticConfig(latency=quick)),
        "int8-static-per-channel": lambda: Int8StaticPass("spc", Int8StaticConfig(per_channel=True, latency=quick)),
        "int8-static-s8s8": lambda: Int8StaticPass("s8", Int8StaticConfig(activation_type="int8", latency=quick)),
    }
    graphs: dict[str, Path] = {}
    rows: dict[str, dict] = {}
    for variant in filter(None, args.variants.split(",")):
        current, reports = fp32, []
        t0 = time.perf_counter()
        for step, name in enumerate(variant.split("+")):
            target = work / f"{variant}.{step}.onnx"
            report = makers[name]().apply(current, target, references)
            reports.append(report)
            if report.kept:
                current = target
        got = ort_session(current, args.threads).run(None, {PIXEL_VALUES: pixels})[0]
        rows[variant] = {
            "kept": [r.kept for r in reports], "reasons": [r.reason for r in reports],
            "size_ratio": current.stat().st_size / fp32.stat().st_size, "bytes": current.stat().st_size,
            "gate_metrics": reports[-1].after.metrics if reports[-1].after else None,
            "cosine_batch1_fresh_image": cosine(expected, got),
            "excluded": [e["node"] for e in reports[-1].details.get("excluded", [])],
            "build_seconds": round(time.perf_counter() - t0, 1),
        }
        graphs[variant] = current
        print(f"built {variant}: {rows[variant]}", flush=True)

    # Every runner in turns, so that load from other processes falls on all of them alike.
    runners = {"torch-eager": lambda x=torch.from_numpy(pixels): wrapper(x)}
    openvino_cosines: dict[str, float | str] = {}
    for name, path in {"ort-fp32": fp32, **graphs}.items():
        runner = ort_session(path, args.threads)
        runners[name] = lambda r=runner: r.run(None, {PIXEL_VALUES: pixels})
        for precision in ("f32", "bf16") if args.openvino else ():
            label = f"{name} openvino-{precision}"
            try:
                runner = ort_session(path, args.threads, precision)
                openvino_cosines[label] = cosine(expected, runner.run(None, {PIXEL_VALUES: pixels})[0])
            except Exception as exc:  # OpenVINO's ONNX reader refuses some contrib/QOperator graphs
                openvino_cosines[label] = f"does not run: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:160]}"
                continue
            runners[label] = lambda r=runner: r.run(None, {PIXEL_VALUES: pixels})
    times: dict[str, list[float]] = {name: [] for name in runners}
    with torch.inference_mode():
        for turn in range(args.runs + 2):
            for name, call in runners.items():
                time.sleep(0.05)  # let the last library's spinning threads (ORT, OpenVINO's TBB) go idle
                start = time.perf_counter()
                call()
                if turn >= 2:
                    times[name].append(time.perf_counter() - start)
    ms = {name: statistics.median(spent) * 1000 for name, spent in times.items()}
    eager = ms["torch-eager"]
    results = {"preset": args.preset, "image_size": source.image_size, "threads": args.threads, "runs": args.runs,
               "latency_ms": ms, "fp32_bytes": fp32.stat().st_size, "variants": rows,
               "openvino_cosine_batch1_fresh_image": openvino_cosines}
    print(f"\n{args.preset} vision encoder, image {source.image_size}, batch 1, {args.threads} threads, "
          f"median of {args.runs} interleaved runs; fp32 ONNX {fp32.stat().st_size / 1e6:.1f} MB")
    print(f"{'graph':28s} {'ms':>8s} {'vs eager':>9s} {'vs ort fp32':>12s} {'size':>7s}  cosine (gate; batch-1 image)")
    print(f"{'torch-eager':28s} {eager:8.1f} {1:9.2f}x")
    print(f"{'ort-fp32':28s} {ms['ort-fp32']:8.1f} {eager / ms['ort-fp32']:9.2f}x {1:11.2f}x {1:7.3f}")
    for variant, row in rows.items():
        gate = (row["gate_metrics"] or {}).get("image_embeds:cosine", float("nan"))
        print(f"{variant:28s} {ms[variant]:8.1f} {eager / ms[variant]:9.2f}x {ms['ort-fp32'] / ms[variant]:11.2f}x "
              f"{row['size_ratio']:7.3f}  {gate:.5f}; {row['cosine_batch1_fresh_image']:.5f}")
    for label, value in openvino_cosines.items():
        if isinstance(value, str):
            print(f"{label:28s} {value}")
            continue
        base = label.rsplit(" ", 1)[0]
        size = 1.0 if base == "ort-fp32" else rows[base]["size_ratio"]
        print(f"{label:28s} {ms[label]:8.1f} {eager / ms[label]:9.2f}x {ms['ort-fp32'] / ms[label]:11.2f}x "
              f"{size:7.3f}  -; {value:.5f}")
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results: {work / 'results.json'}")
    if args.work is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
