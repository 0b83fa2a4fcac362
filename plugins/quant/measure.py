"""What a pass changes, measured the same way for every pass: graph size, ORT CPU latency, accuracy.

Latency is the median of a few runs on the module's example inputs (the sizes the exporter traced
with) on ONNX Runtime's CPU execution provider with its default graph optimisations: what a user who
loads the file gets. Accuracy is `converter_core.validate.compare` over the PyTorch reference cases:
the module's gates, and the tolerance for rewrites that claim to keep the numbers.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from converter_core.graph_files import external_data_files
from converter_core.specs import GraphSnapshot, ModuleReferences, ModuleValidation
from converter_core.validate import Policy, compare_file


@dataclass(frozen=True)
class LatencyConfig:
    runs: int = 7
    warmup: int = 2
    min_seconds: float = 0.5
    threads: int = 0  # intra-op threads; 0 lets ONNX Runtime choose (one per physical core)


MAX_TURNS = 2000


@dataclass
class Accuracy:
    """How a graph answers the PyTorch reference cases, as a pass reads it off its validation: gate
    metrics (worst case), max abs diff per output, and every failure."""

    passed: bool
    metrics: dict[str, float] = field(default_factory=dict)  # "output:metric" -> worst value over cases
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, validation: ModuleValidation) -> Accuracy:
        return cls(validation.status == "passed", dict(validation.gates or {}),
                   {check.name: check.max_abs_diff for check in validation.outputs.values()},
                   list(validation.failures))

    def summary(self) -> str:
        return ", ".join(f"{key} {value:.6g}" for key, value in self.metrics.items()) or "no gates"


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    return int(np.prod(tensor.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the weights: initializers and Constant nodes' tensors (not metadata or names)."""
    total = sum(tensor_bytes(t) for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            total += sum(tensor_bytes(a.t) for a in node.attribute if a.type == onnx.AttributeProto.TENSOR)
    return total


def graph_stats(path: Path) -> dict[str, Any]:
    model = onnx.load(str(path))
    return {
        "nodes": len(model.graph.node),
        "bytes": sum((path.parent / name).stat().st_size for name in (path.name, *external_data_files(path))),
        "weight_bytes": weight_bytes(model),
        "op_types": dict(Counter(node.op_type for node in model.graph.node).most_common()),
    }


def session(path: Path | bytes, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # the rewritten graphs make ORT warn about things we measure anyway
    return ort.InferenceSession(str(path) if isinstance(path, Path) else path, options, providers=["CPUExecutionProvider"])


def paired_latency_ms(paths: list[Path], inputs: dict[str, np.ndarray], config: LatencyConfig) -> list[float | str]:
    """Median wall time of one run of each graph, in milliseconds, or why it could not run.

    The graphs run in turns (a, b, a, b, ...) so that load from other processes falls on all of
    them alike; at least `runs` turns and `min_seconds` in all, which matters for sub-millisecond graphs.
    """
    runners: list[ort.InferenceSession | None] = []
    results: list[float | str] = []
    for path in paths:
        try:
            runner = session(path, config.threads)
            for _ in range(config.warmup):
                runner.run(None, inputs)
            runners.append(runner)
            results.append(0.0)
        except Exception as exc:  # the accuracy check says why in full; latency is then unknown
            runners.append(None)
            results.append(f"does not run: {type(exc).__name__}")
    times: list[list[float]] = [[] for _ in paths]
    started = time.perf_counter()
    for turn in range(MAX_TURNS):
        if turn >= config.runs and time.perf_counter() - started >= config.min_seconds:
            break
        for runner, spent in zip(runners, times):
            if runner is not None:
                start = time.perf_counter()
                runner.run(None, inputs)
                spent.append(time.perf_counter() - start)
    return [float(np.median(spent) * 1000) if spent else result for result, spent in zip(results, times)]


def accuracy(path: Path, references: ModuleReferences, keeps_numbers: bool = False) -> Accuracy:
    """Run `path` on every reference case and judge it by the module's gates; a rewrite that
    `keeps_numbers` (or a module without gates) must also stay within the validation tolerance."""
    validation, _ = compare_file(references, path, Policy.of(references, keeps_numbers=keeps_numbers))
    return Accuracy.of(validation)


def snapshot(path: Path, latency: float | str, threads: int, result: Accuracy) -> GraphSnapshot:
    """A graph's entry in a pass report: size, latency, and its accuracy."""
    stats = graph_stats(path)
    return GraphSnapshot(
        nodes=stats["nodes"], bytes=stats["bytes"], weight_bytes=stats["weight_bytes"], op_types=stats["op_types"],
        latency_ms=latency if isinstance(latency, float) else None,
        latency_error=None if isinstance(latency, float) else latency,
        threads=threads or "onnxruntime default", metrics=result.metrics, max_abs_diff=result.max_abs_diff,
    )


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the prints and log lines of onnxruntime's and onnxsim's tools (advice we act on ourselves)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)
