"""The one comparison engine: ONNX graphs against PyTorch, output by output, case by case.

The pipeline, every pass and every backend judge a graph here, under a `Policy`: differences within
`atol + rtol * |PyTorch|` (a graph that claims to keep the numbers), the module's gates (a graph
that a quantising pass changed on purpose), or both. Differences are always recorded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from converter_core.errors import CheckFailed, raise_if_environment
from converter_core.gates import check_gates
from converter_core.specs import Gate, ModuleReferences, ModuleSpec, ModuleValidation, OutputCheck, Reference

if TYPE_CHECKING:
    import torch

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class ValidationFailed(CheckFailed):
    """An output differs from PyTorch beyond tolerance, or has another shape."""

    def __init__(self, module: str, output: str, case: str, detail: str, after_pass: str | None = None) -> None:
        self.module, self.output, self.case, self.detail, self.after_pass = module, output, case, detail, after_pass
        following = f" after pass {after_pass}" if after_pass else ""
        super().__init__(f"{module}{following}: output {output!r} at {case}: {detail}")

    def following(self, pass_name: str) -> ValidationFailed:
        """The same failure, saying that the graph it is about was written by `pass_name`."""
        return type(self)(self.module, self.output, self.case, self.detail, pass_name)

    @property
    def short(self) -> str:
        """The failure without the module's name, as a list of one module's problems says it."""
        return f"{self.output} at {self.case}: {self.detail}"


class OutputMismatch(ValidationFailed):
    pass


class ShapeMismatch(ValidationFailed):
    pass


class GraphUnusable(ValidationFailed):
    """ONNX Runtime cannot load or run the graph at all."""

    @property
    def short(self) -> str:
        return self.detail


GATE_FAILED = "gate failed: "


class GateFailed(ValidationFailed):
    """A gate metric over all cases misses its threshold (`detail` says which and by how much)."""

    @property
    def short(self) -> str:
        return self.detail.removeprefix(GATE_FAILED)


class NonFiniteWeights(ValidationFailed):
    """A weight of the graph holds NaN or Inf (`output` names the tensors)."""


@dataclass(frozen=True)
class Policy:
    """How a graph is judged: every output within `atol + rtol * |PyTorch|` (when `tolerance`), and
    every one of `gates` (over all cases at once)."""

    atol: float
    rtol: float = 0.0
    gates: tuple[Gate, ...] = ()
    tolerance: bool = True

    @classmethod
    def of(cls, references: ModuleReferences, *, keeps_numbers: bool | None = None,
           atol: float | None = None, rtol: float = 0.0) -> Policy:
        """The policy for `references`: by the gates once a kept pass changed the numbers (or for a
        rewrite that may: `keeps_numbers=False`), else by the tolerance. A rewrite that claims to keep
        the numbers (`keeps_numbers=True`) must meet both. A module without gates is always held to
        the tolerance. `atol` raises the module's tolerance (a backend's own numerics)."""
        gates, tolerance_atol = references.spec.gates, max(references.atol, atol or 0.0)
        if keeps_numbers is None:  # a graph on its way out: as the last kept pass left it
            by_gates = references.by_gates and bool(gates)
            return cls(tolerance_atol, rtol, gates if by_gates else (), tolerance=not by_gates)
        if keeps_numbers:
            return cls(tolerance_atol, rtol, gates, tolerance=True)
        return cls(tolerance_atol, rtol, gates, tolerance=not gates)


def torch_references(wrapper: torch.nn.Module, spec: ModuleSpec, atol: float) -> ModuleReferences:
    import torch

    from converter_core.export import torch_inputs

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


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


def _differences(got: np.ndarray, expected: np.ndarray, policy: Policy) -> tuple[float, float, bool]:
    """Largest absolute and relative difference, and whether every element is within tolerance.

    The relative difference is |a - b| / max(|b|, atol), so that values near zero do not make it
    meaningless. Any NaN or inf in the difference is an infinite difference."""
    expected64 = expected.astype(np.float64)
    diff = np.abs(got.astype(np.float64) - expected64)
    if diff.size == 0:
        return 0.0, 0.0, True
    if not np.isfinite(diff).all():
        return math.inf, math.inf, False
    within = bool((diff <= policy.atol + policy.rtol * np.abs(expected64)).all())
    return float(diff.max()), float((diff / np.maximum(np.abs(expected64), policy.atol)).max()), within


def _check_output(check: OutputCheck, got: np.ndarray, expected: np.ndarray, policy: Policy, module: str,
                  case: str) -> list[ValidationFailed]:
    """Record one output of one case in `check`; the failure it is, if any."""
    check.shapes.append(list(got.shape))
    if got.shape != expected.shape:
        check.passed = False
        return [ShapeMismatch(module, check.name, case, f"shape {list(got.shape)}, PyTorch gives {list(expected.shape)}")]
    max_abs, max_rel, within = _differences(got, expected, policy)
    check.max_abs_diff = max(check.max_abs_diff, max_abs)
    check.max_rel_diff = max(check.max_rel_diff, max_rel)
    if not policy.tolerance or within:
        return []
    check.passed = False
    rtol = f" + rtol {policy.rtol:g} * |PyTorch|" if policy.rtol else ""
    return [OutputMismatch(module, check.name, case,
                           f"max abs diff {max_abs:.3g} > tolerance {policy.atol:g}{rtol} (shape {list(got.shape)})")]


def compare(references: ModuleReferences, run: Runner, policy: Policy | None = None,
            ) -> tuple[ModuleValidation, ValidationFailed | None]:
    """Run every reference case, record per output the largest differences, and judge by `policy`
    (default: `Policy.of(references)`). Returns the record and the first failure, if any."""
    policy = policy or Policy.of(references)
    spec = references.spec
    checks = {t.name: OutputCheck(t.name, 0.0, 0.0, [], True) for t in spec.outputs}
    failures: list[ValidationFailed] = []
    outputs_per_case = []
    for reference in references.cases:
        try:
            actual = run(reference.case.inputs)
        except Exception as exc:  # an op without a kernel, a broken rewrite: the graph is unusable
            raise_if_environment(exc)
            failures.append(GraphUnusable(spec.name, "*", reference.case.label, f"ONNX Runtime fails: {_first_line(exc)}"))
            break
        outputs_per_case.append(actual)
        for name, expected in reference.outputs.items():
            failures += _check_output(checks[name], actual[name], expected, policy, spec.name, reference.case.label)
    gate_metrics = None
    if policy.gates and len(outputs_per_case) == len(references.cases) and not any(
            isinstance(f, ShapeMismatch) for f in failures):
        report = check_gates(policy.gates, references, outputs_per_case)
        gate_metrics = report.metrics
        for gate, message in report.failed:
            failures.append(GateFailed(spec.name, gate.output, f"its {len(references.cases)} cases", GATE_FAILED + message))
    validation = ModuleValidation(
        status="failed" if failures else "passed",
        atol=policy.atol,
        rtol=policy.rtol,
        cases=[r.case.label for r in references.cases],
        outputs=checks,
        reason=str(failures[0]) if failures else None,
        gates=gate_metrics,
        failures=[f.short for f in failures],
    )
    return validation, failures[0] if failures else None


def compare_file(references: ModuleReferences, path: Path, policy: Policy | None = None,
                 providers: Sequence[str | tuple[str, dict]] = ("CPUExecutionProvider",),
                 options: ort.SessionOptions | None = None) -> tuple[ModuleValidation, ValidationFailed | None]:
    """`compare` on the graph file at `path`; a file ONNX Runtime cannot load is a failed validation."""
    try:
        run = OrtRunner(path, providers, options)
    except Exception as exc:  # unloadable: the record says so instead of the run crashing
        failure = GraphUnusable(references.spec.name, "*", "load", f"ONNX Runtime cannot load {path.name}: "
                                f"{_first_line(exc)}")
        policy = policy or Policy.of(references)
        return ModuleValidation("failed", policy.atol, [], reason=str(failure), rtol=policy.rtol,
                                failures=[failure.short]), failure
    validation, failure = compare(references, run, policy)
    validation.providers = run.providers
    return validation, failure


def validation_record(validation: ModuleValidation) -> dict[str, Any]:
    """What a backend records of one module's comparison: status, worst difference, tolerance, and
    the gate metrics where the module was judged by its gates."""
    return {
        "status": validation.status,
        "max_abs_diff": validation.max_abs_diff,
        "atol": validation.atol,
        **({"rtol": validation.rtol} if validation.rtol else {}),
        **({"judged_by_gates": validation.gates} if validation.gates is not None else {}),
    }


def nonfinite_weights(path: Path) -> list[str]:
    """Names of the graph's weights (initializers, Constant tensors) that hold a NaN or an Inf.

    Validation inputs reach only part of a model (a position-embedding row beyond the lengths tried
    is never read), so every weight is checked, external data included."""
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception:  # noqa: BLE001 - not a graph: its validation has already failed on loading it
        return []
    tensors = [(t.name, t) for t in model.graph.initializer]
    for node in model.graph.node:
        tensors += [(f"{node.name or node.op_type}.{a.name}", a.t) for a in node.attribute
                    if a.type == onnx.AttributeProto.TENSOR]
    bad = []
    for name, tensor in tensors:
        if tensor.data_type not in FLOAT_TYPES:
            continue
        if not np.isfinite(np.asarray(numpy_helper.to_array(tensor), dtype=np.float32)).all():
            bad.append(name)
    return bad


FLOAT_TYPES = {1, 10, 11, 16}  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16
