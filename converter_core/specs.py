"""The plain typed values the pipeline stages hand each other.

source model -> SplitPlan(ModuleSpec...) -> wrappers -> ExportedModule -> PassReport -> final
ModuleValidation -> BackendArtifacts -> BackendValidation -> ConversionResult -> manifest. Each value is
written once by one stage and only read downstream. Arrays are numpy so that everything after the
wrapper stage can be read without torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from converter_core.errors import CheckFailed

Status = Literal["passed", "failed", "skipped"]
Metric = Literal["cosine", "max_abs", "argmax_agreement"]
HIGHER_IS_BETTER = {"cosine": True, "argmax_agreement": True, "max_abs": False}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. A `str` entry in `shape` names a dynamic axis ("batch", "text")."""

    name: str
    dtype: str  # numpy dtype name: "float32", "int64"
    shape: tuple[int | str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Gate:
    """`metric` of output `output` against PyTorch must reach `threshold`.

    cosine: the smallest cosine similarity between a row of PyTorch's output and the same row of
    the graph's (a row is one sample, or one token's vector where the output is a sequence), >=.
    argmax_agreement: the fraction of positions whose argmax over the last axis agrees, >=.
    max_abs: the largest absolute difference, <=.
    """

    output: str
    metric: Metric
    threshold: float

    def holds(self, value: float) -> bool:
        return value >= self.threshold if HIGHER_IS_BETTER[self.metric] else value <= self.threshold


@dataclass
class ShapeCase:
    """Inputs for one validation run; `label` says which sizes it tries, e.g. "batch=1 text=5"."""

    label: str
    inputs: dict[str, np.ndarray]


@dataclass
class ModuleSpec:
    """One graph to export: what a model plugin says about it, readable without knowing the model.

    `example` is what the exporter traces with: every dynamic axis at size >= 2, since torch.export
    specialises sizes 0 and 1. `cases` are the shape combinations validation tries (at least three,
    sizes the export did not see among them).
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    example: ShapeCase
    cases: list[ShapeCase]
    atol: float = 1e-4
    opset: int = 18
    description: str = ""
    # (min, opt, max) per dynamic axis name: the sizes the model is meant to serve. Backends that
    # compile for a shape range (TensorRT optimisation profiles) read it.
    axis_ranges: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    # What a rewritten graph (quantised, fp16) must keep; see converter_core.gates.
    gates: tuple[Gate, ...] = ()


@dataclass
class SourceInfo:
    path: str | None
    format: str
    sha256: str | None


@dataclass
class SplitPlan:
    """What a model plugin makes of a source model: the modules to export and why others are not.

    `metadata` is JSON-ready and goes into the manifest as it is (a captioning model puts its
    preprocessing, special tokens and generation defaults there). `assets` are extra files, by
    relative path, that the output directory needs to be usable (tokenizer files). `inputs` are the
    files the source was read from: a run never writes over or deletes them.

    `calibration`, when the source can offer realistic inputs for static quantisation, makes them
    for the named modules; the pipeline calls it only when a requested pass `needs_calibration`.
    """

    model_type: str
    source: SourceInfo
    modules: list[ModuleSpec]
    not_exported: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    assets: dict[str, bytes] = field(default_factory=dict)
    inputs: tuple[Path, ...] = ()
    calibration: Callable[[Sequence[str]], dict[str, list[ShapeCase]]] | None = None


@dataclass
class ExportedModule:
    """A graph on disk: `path`, and the external-data files beside it that hold its weights (names
    relative to `path`'s folder; empty when the weights are inside the graph file)."""

    spec: ModuleSpec
    path: Path
    data_files: tuple[str, ...] = ()


@dataclass
class OutputCheck:
    """How one named output of one module compared with PyTorch over every case tried."""

    name: str
    max_abs_diff: float
    max_rel_diff: float
    shapes: list[list[int]]
    passed: bool


@dataclass
class ModuleValidation:
    """One graph file compared with PyTorch. `sha256` is the file that was compared and `after_pass`
    the pass that wrote it (None: the export itself), so a record always says what it proves."""

    status: Status
    atol: float
    cases: list[str]
    outputs: dict[str, OutputCheck] = field(default_factory=dict)
    reason: str | None = None
    gates: dict[str, float] | None = None  # "output:metric" -> worst value, where judged by gates
    rtol: float = 0.0
    failures: list[str] = field(default_factory=list)
    sha256: str | None = None
    after_pass: str | None = None
    providers: list[str] = field(default_factory=list)  # ONNX Runtime execution providers it ran on

    @property
    def max_abs_diff(self) -> float:
        return max((check.max_abs_diff for check in self.outputs.values()), default=0.0)


@dataclass
class Reference:
    """PyTorch's answer for one case: the inputs and the outputs by name."""

    case: ShapeCase
    outputs: dict[str, np.ndarray]


@dataclass
class ModuleReferences:
    """PyTorch's answers for every validation case of one module, and the tolerance that applies."""

    spec: ModuleSpec
    atol: float
    cases: list[Reference]
    # True once a kept pass changed the numbers on purpose (quantisation, fp16): the graph is then
    # judged against PyTorch by `spec.gates`, as that pass was, and no longer by `atol`.
    by_gates: bool = False
    # Realistic inputs for passes that `needs_calibration`, from the split plan; empty otherwise.
    calibration: list[ShapeCase] = field(default_factory=list)


@dataclass
class GraphSnapshot:
    """A graph as a pass report records it: size, ONNX Runtime CPU latency, accuracy against PyTorch."""

    nodes: int
    bytes: int
    weight_bytes: int
    op_types: dict[str, int]
    latency_ms: float | None
    threads: int | str
    metrics: dict[str, float] = field(default_factory=dict)  # gate metrics, "output:metric" -> worst value
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    latency_error: str | None = None  # why the latency is unknown


@dataclass
class PassReport:
    """What one graph pass did to one module; `kept` False means the input graph was kept instead."""

    pass_name: str
    module: str
    kept: bool
    reason: str
    before: GraphSnapshot | None = None
    after: GraphSnapshot | None = None
    details: dict[str, Any] = field(default_factory=dict)
    # The pass changes the numbers on purpose (quantisation, fp16) and was judged by the module's
    # gates; False: it claims to keep them within the validation tolerance (fusion, onnxsim).
    changes_numbers: bool = False


@dataclass
class Availability:
    available: bool
    reason: str  # why not, or what it will run on


@dataclass
class BackendContext:
    """What a backend may know of the model besides its graphs: the family, the split plan's manifest
    metadata, and the family's task layer for this backend (`converter_backend_tasks`), if any."""

    model_type: str
    metadata: dict[str, Any] = field(default_factory=dict)
    tasks: object | None = None


@dataclass
class BackendArtifacts:
    """What a backend wrote into the output directory, relative paths, and its configuration."""

    backend: str
    files: list[str]
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class BackendValidation:
    """`skipped` always carries the reason; a check that did not run is never `passed`."""

    status: Status
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModuleRecord:
    """One graph of the output as the manifest records it: its file, and its final validation."""

    spec: ModuleSpec
    file: str
    sha256: str
    validation: ModuleValidation
    passes: list[PassReport] = field(default_factory=list)
    data_files: dict[str, str] = field(default_factory=dict)  # external-data file -> sha256
    export_validation: ModuleValidation | None = None  # of the exported graph, where a pass then changed it


@dataclass
class BackendRecord:
    name: str
    plugin: str
    availability: Availability
    artifacts: BackendArtifacts
    validation: BackendValidation
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ConversionResult:
    output_dir: Path
    plan: SplitPlan
    modules: dict[str, ModuleRecord]
    backends: dict[str, BackendRecord]
    failures: list[CheckFailed]

    @property
    def exit_code(self) -> int:
        return 1 if self.failures else 0
