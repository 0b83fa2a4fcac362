"""`python -m benchmarks.bulk`: images/s of `convert bulk` (captions + ITC embeddings) against a
transformers `pipeline("image-to-text")` loop, at one batch size, in one run.

    python -m benchmarks.bulk [--preset base] [--images 48] [--batch 8] [--out benchmarks/results/bulk]

Random weights of `--preset` (base: BLIP ViT-B/16 at 384 px, BERT-base text side), converted by
`convert blip --random-weights` as fp32 and as `int8-dynamic` graphs. Each `convert bulk` run is a
fresh command on a fresh RESULT (`--json`), so its images/s counts starting the workers (and, with
`--ray local`, the Ray cluster) as a user pays for them. Runs: fp32 with 1 worker x all threads and
with 2 workers x 1 thread (the scaling from 1 to 2 workers), INT8 with 1 worker, and fp32 with
`--ray local`. The baseline is what a user writes today: transformers' `image-to-text` pipeline over
the same files at the same batch size and thread count (`max_new_tokens` 20, greedy), then the
retrieval model's vision tower and `vision_proj` for the embeddings, one batch at a time. With
random weights [SEP] is as unlikely as any token, so both sides write 20 tokens per image (counted).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.machine import describe, summary_line

TOKENS = 20


def _convert(preset: str, out: Path, passes: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "converter_core", "-q", "blip", "--random-weights", "--preset", preset,
                    "--no-validate", "-o", str(out), *passes], check=True)
    return time.perf_counter() - started


def _images(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):  # camera-sized noise: resizing costs what it does for a photo
        path = folder / f"image-{index:04d}.jpg"
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def _bulk(model: Path, images: Path, result: Path, batch: int, *extra: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "converter_core", "bulk", str(model), str(images), "-o", str(result),
                           "--batch", str(batch), "--json", *extra], capture_output=True, text=True,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    if done.returncode != 0:
        raise RuntimeError(f"convert bulk {' '.join(extra)} failed: {done.stderr[-2000:]}")
    summary = json.loads(done.stdout)
    import pyarrow.parquet as pq

    tokens = [len(t) for t in pq.read_table(result, columns=["token_ids"]).column("token_ids").to_pylist()]
    return {"images_per_second": summary["images_per_second"], "seconds": summary["seconds"],
            "failed": summary["failed"], "mean_tokens": float(np.mean(tokens))}


def _vocab(folder: Path, size: int) -> Path:
    """A BERT vocab of `size` ids (bert-base-uncased's special ids, [DEC] and [ENC] last): both sides
    need a tokenizer to write text, and random weights ship none."""
    words = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += [f"word{i}" for i in range(len(words), size - 2)] + ["[DEC]", "[ENC]"]
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    return folder


def _baseline(preset: str, paths: list[Path], batch: int, threads: int, work: Path) -> dict[str, Any]:
    import torch
    from transformers import BertTokenizer, BlipImageProcessor, BlipProcessor, pipeline

    from plugins.blip.graphs import IMAGE_MEAN, IMAGE_STD, PROMPT
    from plugins.blip.presets import random_source

    torch.set_num_threads(threads)
    source = random_source(preset)
    model, retrieval = source.captioning, source.retrieval
    size = source.image_size
    processor = BlipImageProcessor(size={"height": size, "width": size}, image_mean=list(IMAGE_MEAN),
                                   image_std=list(IMAGE_STD))
    tokenizer = BertTokenizer(str(work / "vocab" / "vocab.txt"))
    captioner = pipeline("image-to-text", model=model, tokenizer=tokenizer, image_processor=processor,
                         processor=BlipProcessor(image_processor=processor, tokenizer=tokenizer), device="cpu")
    started = time.perf_counter()
    tokens = []
    with torch.inference_mode():
        for start in range(0, len(paths), batch):
            files = [str(p) for p in paths[start:start + batch]]
            # transformers 5 serves "image-to-text" as "image-text-to-text": images with BLIP's prompt
            captions = captioner(images=files, text=[PROMPT] * len(files), batch_size=batch,
                                 generate_kwargs={"max_new_tokens": TOKENS, "do_sample": False})
            tokens += [len(tokenizer.tokenize((c[0] if isinstance(c, list) else c)["generated_text"])) for c in captions]
            pixel_values = processor([Image.open(f).convert("RGB") for f in files], return_tensors="pt").pixel_values
            embeds = retrieval.vision_model(pixel_values=pixel_values).last_hidden_state
            torch.nn.functional.normalize(retrieval.vision_proj(embeds[:, 0]), dim=-1)
    seconds = time.perf_counter() - started
    return {"images_per_second": len(paths) / seconds, "seconds": seconds, "mean_words": float(np.mean(tokens))}


def _save(out: Path, results: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="base")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bulk"))
    args = parser.parse_args(argv)
    threads = len(os.sched_getaffinity(0))
    machine = describe(threads)
    print(summary_line(machine), flush=True)
    results: dict[str, Any] = {"preset": args.preset, "images": args.images, "batch": args.batch,
                               "threads": threads, "machine": machine, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bulk-bench-") as scratch:
        work = Path(scratch)
        images = _images(work / "images", args.images)
        results["convert_seconds"] = {"fp32": _convert(args.preset, work / "fp32", []),
                                      "int8": _convert(args.preset, work / "int8", ["--quantize", "int8-dynamic"])}
        runs = {
            "bulk fp32, 1 worker x 2 threads": (work / "fp32", ["--workers", "1", "--threads", str(threads)]),
            "bulk fp32, 2 workers x 1 thread": (work / "fp32", ["--workers", "2", "--threads", str(max(1, threads // 2))]),
            "bulk int8-dynamic, 1 worker x 2 threads": (work / "int8", ["--workers", "1", "--threads", str(threads)]),
            "bulk fp32, --ray local, 1 actor x 2 threads": (work / "fp32", ["--ray", "local", "--workers", "1",
                                                                           "--threads", str(threads)]),
        }
        vocab_size = json.loads((work / "fp32" / "manifest.json").read_text())["vocab_size"]
        vocab = _vocab(work / "vocab", vocab_size)
        for name, (model, extra) in runs.items():
            print(f"{name} ...", flush=True)
            results["runs"][name] = _bulk(model, work / "images", work / f"result-{len(results['runs'])}", args.batch,
                                          "--tokenizer", str(vocab), *extra)
            _save(args.out, results)  # each run as it ends: a run interrupted later keeps the ones before
        print("transformers pipeline ...", flush=True)
        results["runs"]["transformers pipeline('image-to-text') + vision_proj"] = _baseline(
            args.preset, images, args.batch, threads, work)
    baseline = results["runs"]["transformers pipeline('image-to-text') + vision_proj"]["images_per_second"]
    lines = [f"`python -m benchmarks.bulk --preset {args.preset} --images {args.images} --batch {args.batch}`; "
             f"{summary_line(machine)}", "", "| run | images/s | vs pipeline |", "|---|---|---|"]
    for name, run in results["runs"].items():
        lines.append(f"| {name} | {run['images_per_second']:.2f} | {run['images_per_second'] / baseline:.2f}x |")
    _save(args.out, results)
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
