"""End-to-end caption latency: image file -> 20 tokens, greedy, batch 1, runtime vs PyTorch.

Both sides caption the same base-size random-weight BLIP (the `base` preset, seed 0, captioning
part) from the same decoded image: the runtime (`BlipRuntime.caption`: preprocessing, vision
encoder, decoder with KV cache on onnxruntime) and transformers (`BlipImageProcessorPil` +
`BlipForConditionalGeneration.generate`). Both write exactly 20 tokens after BLIP's prompt
(`min_tokens = max_tokens = 20`) so they do the same work, and both use the same thread count.
Runs alternate between the two so that a busy machine slows both alike; the median is reported.

    python benchmarks/caption_latency.py [--output DIR] [--repeats 7] [--threads N] [--json]

`--output DIR` keeps the conversion for the next run (it must have been written by this script).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import BlipImageProcessorPil

from converter_core.pipeline import ConvertOptions, convert
from plugins.blip.modules import BlipConversion
from plugins.blip.presets import random_source
from plugins.blip.runtime import BlipRuntime

TOKENS = 20
SEED = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, help="conversion directory to reuse or create")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    source = random_source("base", seed=SEED, parts=("captioning",))
    with tempfile.TemporaryDirectory() as scratch:
        out = args.output or Path(scratch) / "blip-base"
        if not (out / "manifest.json").is_file():
            started = time.perf_counter()
            convert(BlipConversion(source, max_batch=1, max_text_len=32), ConvertOptions(output_dir=out, validate=False))
            print(f"converted in {time.perf_counter() - started:.0f} s")
        result = measure(source, out, args.repeats, args.threads)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"image -> {TOKENS} tokens, base size, greedy, batch 1, {args.threads} threads, "
          f"median of {args.repeats} runs (all runs in ms):")
    for name in ("runtime", "pytorch"):
        runs = ", ".join(f"{ms:.0f}" for ms in result[name]["runs_ms"])
        print(f"  {name:8} {result[name]['median_ms']:7.0f} ms   [{runs}]")
    print(f"  pytorch / runtime: {result['pytorch']['median_ms'] / result['runtime']['median_ms']:.2f}x; "
          f"tokens identical: {result['tokens_identical']}")


def measure(source, out: Path, repeats: int, threads: int) -> dict:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    runtime = BlipRuntime(out, threads=threads)
    model = source.captioning
    settings = runtime.manifest["preprocessing"]
    size = settings["image_size"]
    processor = BlipImageProcessorPil(size={"height": size, "width": size}, image_mean=settings["mean"],
                                      image_std=settings["std"])
    prompt_ids = runtime.prompt_ids()
    tokenized = torch.tensor([[runtime.tokens["CLS"], *prompt_ids[1:], runtime.tokens["SEP"]]])

    def run_runtime() -> list[int]:
        return runtime.caption([image], max_tokens=TOKENS, min_tokens=TOKENS)[0].token_ids

    def run_pytorch() -> list[int]:
        with torch.no_grad():
            pixel_values = processor([image], return_tensors="pt").pixel_values
            rows = model.generate(pixel_values, input_ids=tokenized.clone(), max_new_tokens=TOKENS,
                                  min_new_tokens=TOKENS, num_beams=1, do_sample=False)
        return rows[0, len(prompt_ids):].tolist()

    tokens = {"runtime": run_runtime(), "pytorch": run_pytorch()}  # warm-up: sessions, first-call costs
    runs: dict[str, list[float]] = {"runtime": [], "pytorch": []}
    for _ in range(repeats):
        for name, call in (("runtime", run_runtime), ("pytorch", run_pytorch)):
            started = time.perf_counter()
            call()
            runs[name].append((time.perf_counter() - started) * 1000)
    result = {name: {"median_ms": statistics.median(ms), "runs_ms": ms} for name, ms in runs.items()}
    result["tokens_identical"] = tokens["runtime"] == tokens["pytorch"] and len(tokens["runtime"]) == TOKENS
    result["threads"] = threads
    return result


if __name__ == "__main__":
    main()
