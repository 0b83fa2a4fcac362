"""Comparing ONNX graphs with PyTorch on named outputs, case by case."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from converter_core.errors import CheckFailed
from converter_core.export import torch_inputs
from converter_core.gates import check_gates
from converter_core.specs import ModuleReferences, ModuleSpec, ModuleValidation, OutputCheck, Reference

if TYPE_CHECKING:
    import torch

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class ValidationFailed(CheckFailed):
    """An output differs from PyTorch beyond tolerance, or has another shape."""

    def __init__(self, module: str, output: str, case: str, detail: str) -> None:
        self.module, self.output, self.case = module, output, case
        super().__init__(f"{module}: output {output!r} at {case}: {detail}")


class OutputMismatch(ValidationFailed):
    pass


class ShapeMismatch(ValidationFailed):
    pass


def torch_references(wrapper: torch.nn.Module, spec: ModuleSpec, atol: float) -> ModuleReferences:
    import torch

    references = []
    with torch.no_grad():
        for case in spec.cases:
            result = wrapper.eval()(*torch_inputs(spec, case.inputs))
            tensors = result if isinstance(result, (tuple, list)) else (result,)
            if len(tensors) != len(spec.outputs):
                raise CheckFailed(
                    f"{spec.name}: the wrapper returned {len(tensors)} outputs, the spec names {len(spec.outputs)}"
                )
            outputs = {t.name: v.detach().numpy() for t, v in zip(spec.outputs, tensors)}
            references.append(Reference(case, outputs))
    return ModuleReferences(spec, atol, references)


class OrtRunner:
    """An ONNX Runtime session called with a feed dict; `providers` are the ones it really got."""

    def __init__(self, path: Path, providers: Sequence[str | tuple[str, dict]] = ("CPUExecutionProvider",),
                 options: ort.SessionOptions | None = None) -> None:
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
        self.providers: list[str] = self.session.get_providers()
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, inputs)))


def compare(references: ModuleReferences, run: Runner) -> tuple[ModuleValidation, ValidationFailed | None]:
    """Run every reference case and record, per output, the largest differences over all cases.

    The relative difference is |a - b| / max(|b|, atol) so that values near zero do not make it
    meaningless. The first failure is kept as `reason` and as the error `raise_if_failed` raises.
    Where `references.by_gates` (a kept pass quantised the graph), the differences are still
    recorded but the module's gates decide, over all cases at once.
    """
    spec, atol = references.spec, references.atol
    by_gates = references.by_gates and bool(spec.gates)
    checks = {t.name: OutputCheck(t.name, 0.0, 0.0, [], True) for t in spec.outputs}
    first_failure: ValidationFailed | None = None
    outputs_per_case = []
    for reference in references.cases:
        actual = run(reference.case.inputs)
        outputs_per_case.append(actual)
        for name, expected in reference.outputs.items():
            check = checks[name]
            got = actual[name]
            check.shapes.append(list(got.shape))
            if got.shape != expected.shape:
                check.passed = False
                first_failure = first_failure or ShapeMismatch(
                    spec.name, name, reference.case.label, f"shape {list(got.shape)}, PyTorch gives {list(expected.shape)}"
                )
                continue
            diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
            if diff.size == 0:
                continue
            max_abs = float(diff.max()) if np.isfinite(diff).all() else math.inf
            max_rel = float((diff / np.maximum(np.abs(expected), atol)).max()) if max_abs < math.inf else math.inf
            check.max_abs_diff = max(check.max_abs_diff, max_abs)
            check.max_rel_diff = max(check.max_rel_diff, max_rel)
            if not max_abs <= atol and not by_gates:
                check.passed = False
                first_failure = first_failure or OutputMismatch(
                    spec.name, name, reference.case.label,
                    f"max abs diff {max_abs:.3g} > tolerance {atol:g} (shape {list(got.shape)})",
                )
    gate_metrics = None
    if by_gates and first_failure is None:
        report = check_gates(references, outputs_per_case)
        gate_metrics = report.metrics
        if not report.passed:
            failing = next(g for g in spec.gates if not g.holds(report.metrics[f"{g.output}:{g.metric}"]))
            first_failure = OutputMismatch(spec.name, failing.output, f"its {len(references.cases)} cases",
                                           "gate failed: " + "; ".join(report.failures))
    validation = ModuleValidation(
        status="failed" if first_failure else "passed",
        atol=atol,
        cases=[r.case.label for r in references.cases],
        outputs=checks,
        reason=str(first_failure) if first_failure else None,
        gates=gate_metrics,
    )
    return validation, first_failure


def validation_record(validation: ModuleValidation) -> dict[str, Any]:
    """What a backend records of one module's comparison: status, worst difference, tolerance, and
    the gate metrics where the module was judged by its gates."""
    return {
        "status": validation.status,
        "max_abs_diff": max((c.max_abs_diff for c in validation.outputs.values()), default=0.0),
        "atol": validation.atol,
        **({"judged_by_gates": validation.gates} if validation.gates is not None else {}),
    }

