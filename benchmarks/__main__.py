"""`python -m benchmarks`: BLIP conversion speed on this machine, in one run, as ratios.

    python -m benchmarks [--quick] [--checkpoint PATH]... [--out DIR] [--threads N] [--keep-graphs DIR]

Writes `results.json`, `results.md` and `results.png` to `--out` (default `benchmarks/results`, or
`benchmarks/results/quick` with `--quick`). Base-size BLIP with random weights drawn from the real
config (`--preset base`), or the checkpoint(s) given. `--quick` runs the tiny preset at one image
size with few runs, in about a minute; the test suite runs it so that the benchmark cannot rot.

In one run: the machine's fp32 and INT8 matmul peaks; the timed `convert blip` (wall time, peak RSS);
the graph variants (fp32, fused fp32, INT8 dynamic, INT8 static, fp16) made by `convert` itself;
per-module latency against PyTorch eager with FLOP/s as a fraction of peak; end-to-end captioning
against `generate`; model sizes; the issue's targets.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.latency import TimingConfig

QUICK_OUT = Path("benchmarks/results/quick")
FULL_OUT = Path("benchmarks/results")


@dataclass(frozen=True)
class Mode:
    """What the quick and the full run differ in."""

    name: str
    preset: str
    batches: tuple[int, ...]
    modules: TimingConfig
    captioning: TimingConfig
    peak: TimingConfig
    peak_sizes: tuple[int, ...]
    # The vision encoder at a second image size too. Quick mode leaves it out: a second conversion's
    # exports would double its time, and the code measuring it is the same as at the first size.
    second_size: bool


# Full: 10 turns per cell (at least 1 s of them), cut to 5 where 10 would take over 45 s.
FULL = Mode("full", "base", (1, 8),
            modules=TimingConfig(runs=10, warmup=2, min_seconds=1.0, min_runs=5, max_seconds=45),
            captioning=TimingConfig(runs=7, warmup=1, min_seconds=0, min_runs=3, max_seconds=60),
            peak=TimingConfig(runs=5, warmup=1, min_seconds=0),
            peak_sizes=(1024, 2048, 4096), second_size=True)
QUICK = Mode("quick", "tiny", (1, 8),
             modules=TimingConfig(runs=3, warmup=1, min_seconds=0, min_runs=3),
             captioning=TimingConfig(runs=2, warmup=1, min_seconds=0, min_runs=2),
             peak=TimingConfig(runs=2, warmup=1, min_seconds=0),
             peak_sizes=(128, 256), second_size=False)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset, few runs: seconds (what the tests run)")
    parser.add_argument("--checkpoint", type=Path, action="append", default=[],
                        help="a BLIP checkpoint instead of random weights (repeatable, as `convert blip -c`)")
    parser.add_argument("--out", type=Path, help=f"where results go (default {FULL_OUT}, {QUICK_OUT} with --quick)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="intra-op threads for PyTorch and ONNX Runtime alike (default: the usable CPUs)")
    parser.add_argument("--keep-graphs", type=Path, help="keep the converted graphs in this directory")
    return parser.parse_args(argv)


def other_image_size(native: int) -> int:
    """The second vision size: 224 beside 384, and 384 beside a 224-px checkpoint."""
    return 224 if native != 224 else 384


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from benchmarks import captioning, conversions, machine, module_latency, peak, targets
    from plugins.blip.conversion import load_source
    from plugins.blip.graphs import VISION_ENCODER
    from plugins.blip.presets import random_source

    mode = QUICK if args.quick else FULL
    started = time.perf_counter()

    load_samples: list[dict[str, Any]] = []  # other processes' load shows here; the table cites it

    def progress(message: str) -> None:
        elapsed = time.perf_counter() - started
        load_samples.append({"seconds": round(elapsed), "load_1min": (machine.load_average() or [None])[0],
                             "stage": message[:60]})
        print(f"[{elapsed:6.0f} s, load {load_samples[-1]['load_1min']}] {message}", file=sys.stderr, flush=True)

    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"mode": mode.name, "command": args.command,
                               "timing": {"modules": asdict(mode.modules), "captioning": asdict(mode.captioning),
                                          "peak": asdict(mode.peak), "batches": list(mode.batches)}}
    results["machine"] = machine.describe(args.threads)
    progress(f"machine: {machine.summary_line(results['machine'])}")

    results["peak"] = peak.measure_peak(args.threads, mode.peak_sizes, mode.peak)
    found = results["peak"]["peak"]
    progress("peak: " + ", ".join(f"{p} {v['gflops']:.0f} GFLOP/s ({v['kernel']})" for p, v in found.items()))

    work = args.keep_graphs or Path(tempfile.mkdtemp(prefix="vlm-benchmark-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.checkpoint:
            cli = ["blip", *(f"--checkpoint={path}" for path in args.checkpoint)]
        else:
            cli = ["blip", "--random-weights", "--preset", mode.preset]
        progress(f"timed conversion: convert {' '.join(cli)}")
        timed = conversions.timed_conversion(cli, work / "native" / conversions.FP32)
        results["conversion"] = timed
        progress(f"converted in {timed['seconds']} s, peak RSS {timed['peak_rss_mb']:.0f} MB, "
                 f"exit {timed['exit_code']}")

        host, reuse = conversions.benchmark_host()
        source = load_source(args.checkpoint, not args.checkpoint, mode.preset, None, 0, None)
        native = source.image_size
        config = (source.captioning or source.retrieval).config
        other = other_image_size(native) if mode.second_size else None
        results["model"] = {
            "preset": None if args.checkpoint else mode.preset,
            "checkpoint": [str(path) for path in args.checkpoint] or None,
            "weights": source.format, "image_size": native, "other_image_size": other,
            "vision": {"hidden": config.vision_config.hidden_size, "layers": config.vision_config.num_hidden_layers},
            "text": {"hidden": config.text_config.hidden_size, "layers": config.text_config.num_hidden_layers},
        }
        fp32_dir = work / "native" / conversions.FP32 if timed["exit_code"] in (0, 1) else None
        variants = {native: conversions.convert_variants(source, work / "native", host, reuse,
                                                         conversions.VARIANTS, fp32_dir)}
        progress(f"variants at {native}px: {', '.join(variants[native])}")
        sources = {native: source}
        cells = [module_latency.vision_cell(native, profile=targets.PROFILED), *module_latency.text_cells(native)]
        if other is not None:
            if args.checkpoint:
                sources[other] = load_source(args.checkpoint, False, mode.preset, other, 0, None)
            else:  # only the vision encoder is measured at this size; the decoder keeps the output a valid one
                sources[other] = random_source(mode.preset, image_size=other, parts=("captioning",))
            variants[other] = conversions.convert_variants(sources[other], work / "other", host, reuse,
                                                           conversions.VARIANTS, pass_modules=(VISION_ENCODER,))
            cells.insert(0, module_latency.vision_cell(other))
            progress(f"variants at {other}px (passes on the vision encoder only)")
        results["variants"] = {
            f"{size}px {name}": {"image_size": size, "passes": variant.pass_reports()}
            for size, made in variants.items() for name, variant in made.items() if name != conversions.FP32
        }

        results["modules"] = []
        for cell in cells:
            rows = module_latency.measure_cell(cell, sources[cell.image_size], variants[cell.image_size],
                                               mode.batches, args.threads, mode.modules, found)
            results["modules"] += rows
            progress(f"{cell.label}: " + "; ".join(_brief(row) for row in rows))
        results["sizes"] = module_latency.model_sizes(cells, sources, variants)

        e2e = {name: variants[native][name] for name in (*targets.FP32_VARIANTS, *targets.INT8_VARIANTS)}
        results["captioning"], results["captioning_vision"] = captioning.measure_captioning(
            source, e2e, args.threads, mode.captioning)
        for row in results["captioning"]:
            progress(f"captioning {row['decoding']}: " + ", ".join(
                f"{name} {entry.get('p50_ms', float('nan')):.0f} ms" for name, entry in row.get("results", {}).items()))
    finally:
        if args.keep_graphs is None:
            shutil.rmtree(work, ignore_errors=True)

    results["targets"] = targets.judge(results)
    results["machine"]["load_average_at_end"] = machine.load_average()
    results["machine"]["load_during_run"] = load_samples
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    return results


def _brief(row: dict[str, Any]) -> str:
    if "results" not in row:
        return f"batch {row['batch']}: not measured ({row['not_measured']})"
    times = ", ".join(f"{name} {entry['p50_ms']:.1f}" for name, entry in row["results"].items() if "p50_ms" in entry)
    return f"batch {row['batch']}: {times} ms"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.command = " ".join(["python -m benchmarks", *(sys.argv[1:] if argv is None else argv)])
    from benchmarks import report

    results = run(args)
    out = args.out or (QUICK_OUT if args.quick else FULL_OUT)
    written = report.write(results, out)
    print(report.markdown(results))
    print("wrote " + ", ".join(str(path) for path in written), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
