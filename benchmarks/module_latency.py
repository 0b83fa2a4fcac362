"""Per-module latency: PyTorch eager against each ONNX variant, at batch 1 and 8, with FLOP/s.

PyTorch eager runs the export wrapper (each graph's recipe builds it), the very computation the graph
holds, under `torch.inference_mode`; each variant runs on ONNX Runtime's CPU provider with default
graph optimisations. Inputs come from the recipes' own example builders at the sizes below, the
same arrays for every runner. FLOPs are counted from the fp32 graph at those sizes (`benchmarks.flops`),
and from each INT8 graph for the share of them that runs as integer kernels; achieved FLOP/s is
FLOPs / p50, as a fraction of the measured fp32 peak (PyTorch, fp32, fused, fp16) or INT8 peak (INT8).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch

from benchmarks.conversions import FP32, Variant
from benchmarks.flops import FlopCount, FlopCountError, count_flops
from benchmarks.latency import Timing, TimingConfig, time_in_turns
from benchmarks.op_profile import op_time
from benchmarks.peak import ort_session
from plugins.blip.graphs import TEXT_DECODER, TEXT_DECODER_WITH_PAST, TEXT_ENCODER, VISION_ENCODER
from plugins.blip.recipes import RECIPE
from plugins.blip.source import BlipSource

PYTORCH = "pytorch"
PROMPT_TOKENS = 4  # "[DEC] a picture of"
ITM_TEXT_TOKENS = 16  # a caption-length text
PAST_TOKENS = PROMPT_TOKENS + 10  # a step halfway through a 20-token caption
COUNTED_AS = {"int8-fused": "int8-dynamic"}  # variant -> the variant whose graph has its products


@dataclass(frozen=True)
class Cell:
    """One module at one image size; `sizes` fixes its dynamic axes other than batch."""

    module: str
    label: str
    image_size: int
    make_inputs: Callable[..., dict[str, torch.Tensor]]
    make_wrapper: Callable[[BlipSource], torch.nn.Module]
    sizes: dict[str, int] = field(default_factory=dict)
    profile: tuple[str, ...] = ()  # variants whose op-time breakdown to record (benchmarks.op_profile)


def vision_cell(image_size: int, profile: tuple[str, ...] = ()) -> Cell:
    return _cell(VISION_ENCODER, f"vision encoder {image_size}px", image_size, {}, profile)


def _cell(module: str, label: str, image_size: int, sizes: dict[str, int], profile: tuple[str, ...] = ()) -> Cell:
    recipe = RECIPE[module]
    return Cell(module, label, image_size, recipe.make_inputs, recipe.build, sizes, profile)


def text_cells(image_size: int) -> list[Cell]:
    return [
        _cell(TEXT_ENCODER, f"text encoder ITM ({ITM_TEXT_TOKENS} tokens)", image_size, {"text": ITM_TEXT_TOKENS}),
        _cell(TEXT_DECODER, f"decoder first step ({PROMPT_TOKENS}-token prompt)", image_size, {"text": PROMPT_TOKENS}),
        _cell(TEXT_DECODER_WITH_PAST, f"decoder step with past ({PAST_TOKENS} cached)", image_size,
              {"new": 1, "past": PAST_TOKENS}),
    ]


def part_of(cell: Cell, source: BlipSource) -> Any:
    """The transformers model holding the cell's module, or None when the source lacks it."""
    if cell.module == TEXT_ENCODER:
        return source.retrieval
    if cell.module in (TEXT_DECODER, TEXT_DECODER_WITH_PAST):
        return source.captioning
    return source.captioning or source.retrieval


def fraction(gflops: float, peak: dict[str, Any], precision: str) -> float | None:
    reached = peak.get(precision, {}).get("gflops")
    return gflops / reached if reached else None


def measure_cell(cell: Cell, source: BlipSource, variants: dict[str, Variant], batches: tuple[int, ...],
                 threads: int, timing: TimingConfig, peak: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per batch size: every runner's p50/p90, FLOPs and achieved FLOP/s."""
    if part_of(cell, source) is None:
        reason = source.absent.get(cell.module, "the source has no such part")
        return [{"module": cell.module, "label": cell.label, "image_size": cell.image_size, "batch": batch,
                 "not_measured": reason} for batch in batches]
    wrapper = cell.make_wrapper(source).eval()
    config = part_of(cell, source).config
    inputs = {batch: cell.make_inputs(config, batch=batch, image_size=cell.image_size, seed=0, **cell.sizes)
              for batch in batches}
    shapes = {batch: {name: tuple(t.shape) for name, t in tensors.items()} for batch, tensors in inputs.items()}
    graphs: dict[str, Path] = {}
    notes: dict[str, str] = {}
    for name, variant in variants.items():
        graph = variant.graph(cell.module)
        if graph is None:
            notes[name] = "not in this conversion"
        elif name == "fp16" and variant.kept(cell.module) is False:
            reason = _reverted_reason(variant, cell.module)
            notes[name] = f"not run on this backend: the fp16 pass was reverted ({reason})"
        else:
            graphs[name] = graph
    # The products are the fp32 graph's for PyTorch and for the graphs that keep the computation
    # (fused, fp16: contrib ops such as Attention hide them from shape inference); the INT8 graphs are
    # counted themselves, for the share of their products that runs as integer kernels; int8-fused's
    # QAttention hides its products too, and it quantises the same ones as int8-dynamic (the weights'
    # products; the attention products stay float in both), so it takes int8-dynamic's count.
    counted = [name for name in graphs if name == FP32 or (name.startswith("int8") and name not in COUNTED_AS)]
    flops: dict[str, dict[int, FlopCount] | str] = {}
    for name in counted:  # one graph in memory at a time: base-size graphs are large
        model = onnx.load(str(graphs[name]))
        try:
            flops[name] = {batch: count_flops(model, shapes[batch]) for batch in batches}
        except FlopCountError as exc:  # the timings still stand; the fraction of peak is then unknown
            flops[name] = str(exc)
        del model
    for name, counterpart in COUNTED_AS.items():
        if name in graphs:
            flops[name] = flops.get(counterpart, f"no {counterpart} graph to count")
    for name in (PYTORCH, *graphs):
        flops.setdefault(name, flops.get(FP32, "no fp32 graph to count"))
    sessions = {name: ort_session(str(graph), threads) for name, graph in graphs.items()}

    rows = []
    for batch in batches:
        tensors = inputs[batch]
        feeds = {name: tensor.numpy() for name, tensor in tensors.items()}
        runners: dict[str, Callable[[], object]] = {PYTORCH: lambda t=tensors: wrapper(*t.values())}
        for name, session in sessions.items():
            runners[name] = lambda s=session, f=feeds: s.run(None, f)
        with torch.inference_mode():
            timings = time_in_turns(runners, timing)
        results: dict[str, Any] = {}
        for name in (PYTORCH, *variants):
            measured = timings.get(name)
            if name in notes:
                results[name] = {"not_run": notes[name]}
            elif not isinstance(measured, Timing):
                results[name] = {"not_run": f"not run on this backend: {measured}"}
            elif isinstance(flops[name], str):
                results[name] = {**measured.to_json(), "flops_error": flops[name]}
            else:
                count = flops[name][batch]
                precision = "int8" if name.startswith("int8") else "fp32"
                gflops = count.total / (measured.p50_ms / 1000) / 1e9
                results[name] = {**measured.to_json(), "gflops_per_s": round(gflops, 2),
                                 "fraction_of_peak": fraction(gflops, peak, precision), "peak_precision": precision,
                                 "flops": count.to_json()}
            if name != PYTORCH and "p50_ms" in results[name]:
                results[name]["pass_kept"] = variants[name].kept(cell.module)
        eager = results[PYTORCH].get("p50_ms")
        for entry in results.values():
            if eager and entry.get("p50_ms"):
                entry["speedup_vs_pytorch"] = round(eager / entry["p50_ms"], 3)
        row = {"module": cell.module, "label": cell.label, "image_size": cell.image_size, "batch": batch,
               "input_shapes": {k: list(v) for k, v in shapes[batch].items()},
               "gflops": flops[FP32][batch].total / 1e9 if isinstance(flops[FP32], dict) else None,
               "results": results}
        profiled = [name for name in cell.profile if name in graphs]
        if profiled:
            row["profile"] = {name: op_time(graphs[name], feeds, threads) for name in profiled}
        rows.append(row)
    return rows


def _reverted_reason(variant: Variant, module: str) -> str:
    return "; ".join(r["reason"] for r in variant.manifest["modules"][module]["passes"] if not r["kept"])


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct parameters and buffers a wrapper holds (tied weights once)."""
    seen: dict[int, int] = {}
    for tensor in (*module.parameters(), *module.buffers()):
        seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def model_sizes(cells: list[Cell], sources: dict[int, BlipSource],
                variants: dict[int, dict[str, Variant]]) -> list[dict[str, Any]]:
    """Per module: PyTorch parameter bytes and each variant's ONNX file bytes."""
    rows = []
    for cell in cells:
        source = sources[cell.image_size]
        if part_of(cell, source) is None:
            continue
        row: dict[str, Any] = {"module": cell.module, "image_size": cell.image_size,
                               "pytorch_bytes": parameter_bytes(cell.make_wrapper(source))}
        for name, variant in variants[cell.image_size].items():
            graph = variant.graph(cell.module)
            if graph is not None:
                row[name] = {"bytes": graph.stat().st_size, "pass_kept": variant.kept(cell.module)}
        rows.append(row)
    return rows
