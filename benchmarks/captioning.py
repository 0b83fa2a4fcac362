"""End-to-end captioning: one image file's pixels -> 20 tokens, PyTorch `generate` against the runtime.

Both sides start from the same decoded image and do the same work: preprocessing (transformers'
`BlipImageProcessorPil` / the runtime's own), the vision encoder, and exactly 20 new tokens after
BLIP's prompt (`min_new_tokens = max_new_tokens = 20`; the runtime's `min_tokens = max_tokens = 20`),
greedy and with 3 beams, batch 1, the same thread count. PyTorch runs
`BlipForConditionalGeneration.generate` on the weights the graphs were exported from; the runtime
(`BlipRuntime.caption`, onnxruntime, KV cache) runs each converted variant. Runs go in turns.

Image -> image embeddings alone (preprocessing and the vision encoder) is timed too, in turns of its
own: it bounds what any decoder can gain, which explains an end-to-end ratio.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.conversions import Variant
from benchmarks.latency import Timing, TimingConfig, time_in_turns
from plugins.blip.graphs import TEXT_DECODER
from plugins.blip.runtime import BlipRuntime
from plugins.blip.source import BlipSource

TOKENS = 20
PYTORCH = "pytorch-generate"
VISION_PYTORCH = "pytorch"  # image -> embeddings: transformers' processor and vision model
DECODINGS = (("greedy", 1), ("beam 3", 3))


def sample_image(seed: int = 0) -> Image.Image:
    """A deterministic noise photo, 640 x 480, so that resizing costs what a camera image does."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (480, 640, 3), dtype=np.uint8))


def prompt_ids(runtime: BlipRuntime) -> list[int]:
    """The manifest's prompt ids; a model without BLIP's vocabulary (the tiny preset) gets [DEC] and
    three ordinary token ids, the length of "a picture of"."""
    ids = runtime.generation.get("prompt_ids")
    if ids:
        return list(ids)
    special = set(runtime.tokens.values())
    ordinary = [i for i in range(runtime.tokens["CLS"] + 1, runtime.manifest["vocab_size"]) if i not in special]
    return [runtime.tokens["DEC"], *ordinary[:3]]


def _reverted(variant: Variant) -> list[str]:
    return [module for module, reports in variant.pass_reports().items() if not all(r["kept"] for r in reports)]


def measure_captioning(source: BlipSource, variants: dict[str, Variant], threads: int,
                       timing: TimingConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per decoding, each side's p50/p90 and tokens; and image -> embeddings alone per side."""
    from transformers import BlipImageProcessorPil

    model = source.captioning
    if model is None:
        reason = source.absent.get(TEXT_DECODER, "no captioning decoder")
        return [{"decoding": name, "not_measured": reason} for name, _ in DECODINGS], {}
    image = sample_image()
    runtimes = {f"runtime-{name}": BlipRuntime(variant.directory, threads=threads)
                for name, variant in variants.items()}
    first = next(iter(runtimes.values()))
    ids = prompt_ids(first)
    settings = first.manifest["preprocessing"]
    processor = BlipImageProcessorPil(size={"height": settings["image_size"], "width": settings["image_size"]},
                                      image_mean=settings["mean"], image_std=settings["std"])
    # generate replaces the first id with [DEC] and drops the trailing [SEP], as BLIP's tokenizer output needs
    tokenized = torch.tensor([[first.tokens["CLS"], *ids[1:], first.tokens["SEP"]]])

    rows = []
    for decoding, beams in DECODINGS:
        def run_pytorch(beams: int = beams) -> list[int]:
            pixel_values = processor([image], return_tensors="pt").pixel_values
            rows_out = model.generate(pixel_values, input_ids=tokenized.clone(), max_new_tokens=TOKENS,
                                      min_new_tokens=TOKENS, num_beams=beams, do_sample=False)
            return rows_out[0, len(ids):].tolist()

        runners = {PYTORCH: run_pytorch}
        for name, runtime in runtimes.items():
            runners[name] = lambda r=runtime, beams=beams: r.caption(
                [image], beams=beams, max_tokens=TOKENS, min_tokens=TOKENS, prompt_ids=ids)[0].token_ids
        with torch.inference_mode():
            tokens = {name: run() for name, run in runners.items()}
            timings = time_in_turns(runners, timing)
        reference = tokens[PYTORCH]
        results: dict[str, Any] = {}
        for name, measured in timings.items():
            if not isinstance(measured, Timing):
                results[name] = {"not_run": measured}
                continue
            same = sum(a == b for a, b in zip(tokens[name], reference))
            results[name] = {**measured.to_json(), "tokens": len(tokens[name]),
                             "tokens_equal_to_pytorch": f"{same}/{len(reference)}"}
            if name != PYTORCH and isinstance(timings[PYTORCH], Timing):
                results[name]["speedup_vs_pytorch"] = round(timings[PYTORCH].p50_ms / measured.p50_ms, 3)
            if name != PYTORCH:
                results[name]["modules_with_pass_reverted"] = _reverted(variants[name.removeprefix("runtime-")])
        rows.append({"decoding": decoding, "beams": beams, "new_tokens": TOKENS, "batch": 1,
                     "image": "640x480 RGB", "results": results})

    def embed_pytorch() -> object:
        return model.vision_model(processor([image], return_tensors="pt").pixel_values)

    encoders = {VISION_PYTORCH: embed_pytorch}
    for name, runtime in runtimes.items():
        encoders[name] = lambda r=runtime: r.image_embeds([image])
    with torch.inference_mode():
        encoding = time_in_turns(encoders, timing)
    vision = {name: measured.to_json() if isinstance(measured, Timing) else {"not_run": measured}
              for name, measured in encoding.items()}
    eager = vision[VISION_PYTORCH].get("p50_ms")
    for name, entry in vision.items():
        if name != VISION_PYTORCH and eager and "p50_ms" in entry:
            entry["speedup_vs_pytorch"] = round(eager / entry["p50_ms"], 3)
    return rows, vision
