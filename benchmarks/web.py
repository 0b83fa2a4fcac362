"""`python -m benchmarks.web OUT...`: the `web` backend's site in headless Chromium against the Python runtime.

For each `convert blip --backend web` output: the page's load time (fetching, hash-checking and
creating every ONNX Runtime Web session) and its caption latency (one 640 x 480 PNG -> exactly 20
new tokens, `min_tokens = max_tokens = 20`, greedy and 3 beams, decoding and preprocessing
included), beside `BlipRuntime` doing the same from the same file (load: the manifest, hashes and
every onnxruntime session). Both sides use one thread: the page runs ONNX Runtime Web's WASM EP
single-threaded unless served cross-origin isolated. Each page load is a fresh page; the first
caption of a page is a warm-up and is not counted.

Writes `results.json` and `results.md` to `--out` (default `benchmarks/results/web`).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.captioning import sample_image
from benchmarks.machine import describe, summary_line
from plugins.backends.web.browser import CHECK_PREFIX, SiteBrowser, find_executable
from plugins.blip.graphs import TEXT_DECODER, TEXT_DECODER_WITH_PAST
from plugins.blip.runtime import BlipRuntime

TOKENS = 20
DECODINGS = (("greedy", 1), ("beam 3", 3))
IMAGE = "sample-640x480.png"


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 1)


def measure_browser(out: Path, pages: int, captions: int) -> dict[str, Any]:
    decode = [{"beams": beams, "max_tokens": TOKENS, "min_tokens": TOKENS} for _, beams in DECODINGS]
    buffer = io.BytesIO()
    sample_image().save(buffer, format="PNG")
    requests = [{"image": CHECK_PREFIX + IMAGE, "decode": decode}] * (captions + 1)
    browser = SiteBrowser(out / "web", find_executable("chromium"), find_executable("node"), timeout_s=1200)
    opened = browser.open(["index.html?requests=" + CHECK_PREFIX + "requests.json"] * pages,
                          {IMAGE: buffer.getvalue(), "requests.json": json.dumps(requests).encode()})
    for page in opened:
        if page.status != "done":
            raise SystemExit(f"{out}: the page did not finish: {page.error or page.results}")
    timings = {name: [r["captions"][i]["elapsed_ms"] for page in opened for r in page.results["results"][1:]]
               for i, (name, _) in enumerate(DECODINGS)}
    return {"chromium": browser.version, "ort_web": opened[0].results["ort"],
            "load_ms": _median([page.results["load_ms"] for page in opened]),
            "caption_ms": {name: _median(values) for name, values in timings.items()},
            "tokens": [len(opened[0].results["results"][-1]["captions"][i]["token_ids"]) for i in range(len(DECODINGS))]}


def measure_python(out: Path, image: Path, runs: int) -> dict[str, Any]:
    loads = []
    for _ in range(runs):
        start = time.perf_counter()
        runtime = BlipRuntime(out, threads=1)
        for module in runtime.manifest["modules"]:
            runtime.session(module)
        loads.append((time.perf_counter() - start) * 1000)
    captions: dict[str, list[float]] = {name: [] for name, _ in DECODINGS}
    for run in range(runs + 1):
        for name, beams in DECODINGS:
            start = time.perf_counter()
            runtime.caption([image], beams=beams, max_tokens=TOKENS, min_tokens=TOKENS)
            if run:  # the first is a warm-up, as in the browser
                captions[name].append((time.perf_counter() - start) * 1000)
    return {"load_ms": _median(loads), "caption_ms": {name: _median(v) for name, v in captions.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outputs", nargs="+", type=Path, help="convert blip --backend web outputs")
    parser.add_argument("--pages", type=int, default=3, help="page loads per output")
    parser.add_argument("--captions", type=int, default=3, help="timed captions per page and decoding")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/web"))
    args = parser.parse_args(argv)
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    image = args.out / IMAGE
    sample_image().save(image)
    try:
        for out in args.outputs:
            manifest = json.loads((out / "manifest.json").read_text())
            if not all(m in manifest["modules"] for m in (TEXT_DECODER, TEXT_DECODER_WITH_PAST)):
                raise SystemExit(f"{out}: no captioning decoder")
            passes = sorted({r["pass_name"] for m in manifest["modules"].values() for r in m.get("passes", []) if r["kept"]})
            size = sum((out / "web" / m["file"]).stat().st_size
                       for m in json.loads((out / "web" / "manifest.json").read_text())["models"].values())
            rows.append({"output": str(out), "image_size": manifest["preprocessing"]["image_size"],
                         "passes": passes, "model_mb": round(size / 1e6, 1),
                         "browser": measure_browser(out, args.pages, args.captions),
                         "python": measure_python(out, image, args.captions * args.pages)})
    finally:
        image.unlink()
    results = {"machine": describe(threads=1), "tokens": TOKENS, "rows": rows, "command": "python -m benchmarks.web"}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict[str, Any]) -> str:
    lines = ["| output | passes | MB | browser load ms | Python load ms | greedy: browser / Python ms | "
             "beam 3: browser / Python ms |", "|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        b, p = row["browser"], row["python"]
        cells = []
        for name, _ in DECODINGS:
            browser, python = b["caption_ms"][name], p["caption_ms"][name]
            cells.append(f"{browser:.0f} / {python:.0f} ({browser / python:.1f}x)")
        lines.append(f"| {Path(row['output']).name} ({row['image_size']} px) | {', '.join(row['passes']) or 'none'} | "
                     f"{row['model_mb']} | {b['load_ms']:.0f} | {p['load_ms']:.0f} | {cells[0]} | {cells[1]} |")
    first = results["rows"][0]["browser"] if results["rows"] else {}
    lines += ["", f"One 640 x 480 PNG -> {results['tokens']} tokens, one thread each side; Chromium "
                  f"{first.get('chromium')}, ONNX Runtime Web {first.get('ort_web')} (WASM); "
                  f"{summary_line(results['machine'])}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
