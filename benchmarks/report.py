"""The run's outputs: `results.json` (everything), `results.md` (the tables) and `results.png` (the chart)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.chart import draw_chart
from benchmarks.machine import summary_line
from converter_core.manifest import json_safe

VARIANT_TITLES = {"pytorch": "PyTorch eager", "fp32": "ORT fp32", "fp32-fused": "ORT fp32 fused",
                  "int8-dynamic": "ORT INT8 dynamic", "int8-fused": "ORT INT8 fused",
                  "int8-static": "ORT INT8 static", "fp16": "ORT fp16"}
GRAPHS = ("fp32", "fp32-fused", "int8-dynamic", "int8-fused", "int8-static", "fp16")
REASON_CHARS = 160


def write(results: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    results.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    paths = [out / "results.json", out / "results.md", out / "results.png"]
    paths[0].write_text(json.dumps(json_safe(results), indent=2) + "\n")
    paths[1].write_text(markdown(results))
    draw_chart(results, paths[2])
    return paths


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "/").replace("\n", " ") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _short(text: str, limit: int = REASON_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _percent(value: float | None) -> str:
    return f"{value:.0%}" if value is not None else "n/a"


def ms(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def module_cell(entry: dict[str, Any]) -> str:
    if "p50_ms" not in entry:
        return _short(entry.get("not_run", "not run"), 90)
    text = f"{ms(entry['p50_ms'])} / {ms(entry['p90_ms'])}"
    if "speedup_vs_pytorch" in entry and "pass_kept" in entry:
        text += f" · {entry['speedup_vs_pytorch']:.2f}x"
    text += f" · {_percent(entry.get('fraction_of_peak'))}"
    flops = entry.get("flops", {})
    if entry.get("peak_precision") == "int8" and flops.get("total"):
        text += f" ({flops['integer'] / flops['total']:.0%} int)"
    if entry.get("pass_kept") is False:
        text += " **pass reverted: the fp32 graph**"
    return text


def caption_cell(entry: dict[str, Any]) -> str:
    if "p50_ms" not in entry:
        return _short(entry.get("not_run", "not run"), 90)
    text = f"{ms(entry['p50_ms'])} / {ms(entry['p90_ms'])}"
    if "speedup_vs_pytorch" in entry:
        text += f" · {entry['speedup_vs_pytorch']:.2f}x"
    if "tokens" in entry:
        text += f" · {entry['tokens']} tokens, {entry['tokens_equal_to_pytorch']} as PyTorch's"
    if entry.get("modules_with_pass_reverted"):
        text += f" (pass reverted on {', '.join(entry['modules_with_pass_reverted'])})"
    return text


def _target_rows(targets: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for t in targets:
        if t["met"] is None:
            rows.append([t["target"], "-", "not measured", "-", t.get("note", "")])
            continue
        unit = t.get("unit", "")
        measured = f"{t['measured']:.0%}" if not unit else f"{t['measured']:.2f}{unit}"
        required = f"{t['required']:.0%}" if not unit else f"{t['required']:g}{unit}"
        others = ", ".join(f"{case}: {value:.0%}" if not unit else f"{case}: {value:.2f}{unit}"
                           for case, value in t["cases"].items())
        verdict = "yes" if t["met"] else f"no, {t['short_by']}"
        rows.append([t["target"], required, f"{measured} ({t['best_case']}; all: {others})", verdict,
                     t.get("why", "") if not t["met"] else ""])
    return rows


def markdown(results: dict[str, Any]) -> str:
    machine, model = results["machine"], results["model"]
    who = f"`{model['preset']}` preset, random weights" if model.get("preset") else ", ".join(model["checkpoint"])
    load = f"{machine.get('load_average_at_start')} -> {machine.get('load_average_at_end')}"
    parts = [
        f"## BLIP ({who}), {model['image_size']} px: conversion speed on this machine ({results['mode']} run)",
        "",
        f"Machine: {summary_line(machine)}. `{results['command']}`, {results.get('created', '')}, "
        f"wall time {results.get('wall_seconds', 0):.0f} s, load average (1/5/15 min) {load}.",
        "",
        "### Targets",
        "",
        _table(["target", "required", "measured (best case)", "met", "why, where missed"],
               _target_rows(results.get("targets", []))),
        "",
        f"### Matrix-multiply peak ({machine['threads']} thread{'s' if machine['threads'] != 1 else ''}, "
        "measured in this run)",
        "",
    ]
    peak = results["peak"]
    per_kernel = [[kernel, precision, f"{gflops:.0f}"] for precision, found in peak["peak"].items()
                  for kernel, gflops in found["per_kernel_gflops"].items()]
    parts += [_table(["kernel", "precision", "best GFLOP/s (GOP/s for INT8)"], per_kernel), ""]
    ratio = peak.get("int8_over_fp32")
    parts += [f"Peaks: fp32 {peak['peak']['fp32']['gflops']:.0f} GFLOP/s, INT8 {peak['peak']['int8']['gflops']:.0f} "
              f"GOP/s; INT8 / fp32 = {ratio:.1f}." if ratio else "", ""]

    variants = ["pytorch", *GRAPHS]
    rows = []
    for row in results["modules"]:
        if "results" not in row:
            rows.append([row["label"], str(row["batch"]), "-", *([f"not measured: {row['not_measured']}"] +
                                                                 [""] * (len(variants) - 1))])
            continue
        rows.append([row["label"], str(row["batch"]), f"{row['gflops']:.3g}" if row["gflops"] else "?",
                     *(module_cell(row["results"].get(name, {"not_run": "-"})) for name in variants)])
    parts += [
        "### Per module",
        "",
        "p50 / p90 ms · speedup over PyTorch eager · achieved FLOP/s as a share of the fp32 peak (INT8: of the "
        "INT8 peak, with the integer share of the FLOPs). GFLOP: matrix products counted from the graph.",
        "",
        _table(["module", "batch", "GFLOP", *(VARIANT_TITLES[name] for name in variants)], rows),
        "",
    ]
    profiles = [(row, name, p) for row in results["modules"] for name, p in row.get("profile", {}).items()]
    if profiles:
        parts += ["Where the time goes (ONNX Runtime profile, kernel time of one run):", ""]
        prow = []
        for row, name, p in profiles:
            top = ", ".join(f"{op} {ms / p['kernel_ms']:.0%}" for op, ms in list(p["by_op_ms"].items())[:5])
            rate = row["gflops"] / (p["product_ms"] / 1000) if p["product_ms"] else 0
            prow.append([f"{row['label']}, batch {row['batch']}", VARIANT_TITLES[name], f"{p['kernel_ms']:.3g}",
                         _percent(p["product_share"]), f"{rate:.0f}", top])
        parts += [_table(["module", "graph", "kernel ms", "matrix products' share", "products' GFLOP/s",
                          "largest op types"], prow), ""]

    runtimes = [name for name in GRAPHS if any(f"runtime-{name}" in row.get("results", {})
                                               for row in results["captioning"])]
    caption_names = ["pytorch-generate", *(f"runtime-{name}" for name in runtimes)]
    crow = [[row["decoding"], *(caption_cell(row["results"].get(name, {"not_run": "-"})) for name in caption_names)]
            for row in results["captioning"] if "results" in row]
    vision = results.get("captioning_vision", {})
    if vision:
        crow.append(["image -> embeddings only", *(caption_cell(vision.get(name.replace("-generate", ""),
                                                                           {"not_run": "-"}))
                                                   for name in caption_names)])
    parts += [
        "### End-to-end captioning",
        "",
        "One 640x480 image -> exactly 20 new tokens after the prompt, batch 1, preprocessing included; p50 / p90 ms "
        "· speedup over `generate` · tokens equal to `generate`'s. The last row is preprocessing and the vision "
        "encoder alone, which bounds what any decoder can gain.",
        "",
        _table(["decoding", "PyTorch generate",
                *(f"runtime {VARIANT_TITLES[name].removeprefix('ORT ')}" for name in runtimes)], crow),
        "",
    ]

    size_names = list(GRAPHS)
    srow = []
    for row in results["sizes"]:
        cells = []
        for name in size_names:
            entry = row.get(name)
            cells.append("-" if entry is None else f"{entry['bytes'] / 1e6:.1f}" +
                         (" (reverted)" if entry.get("pass_kept") is False else ""))
        srow.append([f"{row['module']} {row['image_size']}px", f"{row['pytorch_bytes'] / 1e6:.1f}", *cells])
    parts += ["### Model sizes (MB)", "",
              _table(["module", "PyTorch parameters", *(VARIANT_TITLES[n] for n in size_names)], srow), ""]

    conversion = results["conversion"]
    validation = ", ".join(f"{m} {s}" for m, s in conversion.get("validation", {}).items())
    parts += ["### Full conversion", "",
              f"`{' '.join(conversion['command'][:-2])}` with validation against PyTorch: "
              f"{conversion['seconds']:.0f} s, peak RSS {conversion['peak_rss_mb']:.0f} MB, exit code "
              f"{conversion['exit_code']}" + (f" (validation: {validation})" if validation else "")
              + (f"; error: {_short(conversion['error'])}" if conversion.get("error") else "") + ".", ""]

    prow = []
    for label, variant in results["variants"].items():
        for module, reports in variant["passes"].items():
            for r in reports:
                prow.append([label, module, "kept" if r["kept"] else "**reverted**",
                             str(len(r["excluded_nodes"])), _short(r["reason"])])
    parts += ["### What the passes did (from each conversion's manifest)", "",
              _table(["variant", "module", "pass", "nodes left float", "reason"], prow), ""]
    return "\n".join(parts)
