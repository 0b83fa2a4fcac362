"""The results as one PNG, drawn with Pillow (no plotting library): speedups over PyTorch.

Top: each module's p50 speedup over PyTorch eager, per batch size and variant. Bottom: end-to-end
captioning speedup over `generate`. Dashed lines mark 1x and the issue's targets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

COLOURS = {"fp32": (52, 101, 164), "fp32-fused": (114, 159, 207), "int8-dynamic": (204, 102, 0),
           "int8-fused": (240, 160, 60), "int8-static": (115, 162, 52), "fp16": (150, 100, 170)}
WIDTH, LEFT, RIGHT, BAR, GAP = 1160, 330, 60, 11, 10


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _threads(results: dict[str, Any]) -> str:
    threads = results["machine"]["threads"]
    return f"{threads} thread{'s' if threads != 1 else ''}"


def _groups(results: dict[str, Any]) -> tuple[list[tuple[str, dict[str, float]]], list[tuple[str, dict[str, float]]]]:
    modules = []
    for row in results["modules"]:
        if "results" in row:
            bars = {name: entry["speedup_vs_pytorch"] for name, entry in row["results"].items()
                    if name in COLOURS and "speedup_vs_pytorch" in entry}
            modules.append((f"{row['label']}, batch {row['batch']}", bars))
    captions = []
    for row in results.get("captioning", []):
        if "results" in row:
            bars = {name.removeprefix("runtime-"): entry["speedup_vs_pytorch"] for name, entry in row["results"].items()
                    if "speedup_vs_pytorch" in entry}
            captions.append((f"caption, {row['decoding']}, {row['new_tokens']} tokens", bars))
    return modules, captions


def _panel(draw: ImageDraw.ImageDraw, top: int, title: str, groups: list[tuple[str, dict[str, float]]],
           marks: tuple[float, ...], scale: float, fonts: tuple[Any, Any]) -> int:
    font, small = fonts
    draw.text((20, top), title, fill="black", font=font)
    top += 28
    plot_width = WIDTH - LEFT - RIGHT
    start = top
    for label, bars in groups:
        draw.text((20, top + max(len(bars), 1) * BAR / 2 - 7), label, fill="black", font=small)
        for name, value in bars.items():
            length = min(value, scale) / scale * plot_width
            draw.rectangle([LEFT, top, LEFT + length, top + BAR - 2], fill=COLOURS.get(name, (120, 120, 120)))
            draw.text((LEFT + length + 4, top - 2), f"{value:.2f}x", fill="black", font=small)
            top += BAR
        top += GAP
    for mark in (1.0, *marks):
        x = LEFT + mark / scale * plot_width
        for y in range(start - 4, top, 8):
            draw.line([x, y, x, y + 4], fill=(90, 90, 90) if mark == 1.0 else (200, 0, 0), width=1)
        draw.text((x - 8, top), f"{mark:g}x", fill="black", font=small)
    return top + 26


def draw_chart(results: dict[str, Any], path: Path) -> Path:
    modules, captions = _groups(results)
    values = [v for _, bars in (*modules, *captions) for v in bars.values()] or [1.0]
    scale = max(max(values), 5.0) * 1.12
    height = 84 + 2 * (28 + 26) + sum(len(b) * BAR + GAP for _, b in (*modules, *captions)) + 30
    image = Image.new("RGB", (WIDTH, height), "white")
    draw = ImageDraw.Draw(image)
    fonts = (_font(16), _font(12))
    model = results.get("model", {})
    who = model.get("preset") or ", ".join(model.get("checkpoint") or [])
    draw.text((20, 12), f"BLIP {who} conversion: speedup over PyTorch (p50), {_threads(results)}",
              fill="black", font=_font(18))
    draw.text((20, 36), results["machine"]["cpu"], fill=(80, 80, 80), font=fonts[1])
    x = 20
    for name, colour in COLOURS.items():  # legend
        draw.rectangle([x, 58, x + 14, 70], fill=colour)
        draw.text((x + 18, 56), f"ONNX Runtime {name}", fill="black", font=fonts[1])
        x += 210
    top = _panel(draw, 84, "per module vs PyTorch eager (red: INT8 vision target 4x)", modules, (4.0,), scale, fonts)
    _panel(draw, top, "end-to-end captioning vs PyTorch generate (red: targets 2x fp32, 5x INT8)", captions,
           (2.0, 5.0), scale, fonts)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
