"""Accuracy gates: how much a rewritten graph (quantised, fp16, simplified) may differ from PyTorch.

A model plugin says, per module, which outputs matter and by which metric (`ModuleSpec.gates`);
`converter_core.validate.compare` evaluates them on the graph's outputs for the reference cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from converter_core.specs import HIGHER_IS_BETTER, Gate, Metric, ModuleReferences

__all__ = ["Gate", "GateReport", "check_gates", "measure"]


def measure(metric: Metric, expected: np.ndarray, actual: np.ndarray) -> float:
    expected = expected.astype(np.float64)
    actual = actual.astype(np.float64)
    if expected.shape != actual.shape:
        return -np.inf if HIGHER_IS_BETTER[metric] else np.inf
    if metric == "max_abs":
        return float(np.abs(expected - actual).max()) if expected.size else 0.0
    if metric == "argmax_agreement":
        return float((expected.argmax(-1) == actual.argmax(-1)).mean())
    rows_a = expected.reshape(-1, expected.shape[-1]) if expected.ndim > 1 else expected.reshape(1, -1)
    rows_b = actual.reshape(rows_a.shape)
    norms = np.linalg.norm(rows_a, axis=1) * np.linalg.norm(rows_b, axis=1)
    cosine = (rows_a * rows_b).sum(axis=1) / np.maximum(norms, 1e-12)
    return float(cosine.min())


@dataclass
class GateReport:
    metrics: dict[str, float] = field(default_factory=dict)  # "output:metric" -> worst value over cases
    failed: list[tuple[Gate, str]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failed


def check_gates(gates: Sequence[Gate], references: ModuleReferences,
                outputs_per_case: list[dict[str, np.ndarray]]) -> GateReport:
    """Evaluate `gates` on the graph's outputs for each reference case (same order). A NaN metric
    (NaN in an output) fails its gate."""
    report = GateReport()
    for gate in gates:
        key = f"{gate.output}:{gate.metric}"
        values = [measure(gate.metric, ref.outputs[gate.output], got[gate.output])
                  for ref, got in zip(references.cases, outputs_per_case)]
        worst = float("nan") if any(np.isnan(values)) else (min(values) if HIGHER_IS_BETTER[gate.metric] else max(values))
        report.metrics[key] = worst
        if not gate.holds(worst):
            op = ">=" if HIGHER_IS_BETTER[gate.metric] else "<="
            report.failed.append((gate, f"{key} = {worst:.6g}, needs {op} {gate.threshold:g}"))
    return report
