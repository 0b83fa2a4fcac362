"""The `tensorrt` backend: ONNX Runtime's TensorRT execution provider, configured and proven.

`prepare` runs anywhere: it checks each graph for what TensorRT's parser cannot take, then writes
`tensorrt/session.json` with, per module, the provider options to pass as they are:

    opts = json.load(open(OUT / "tensorrt/session.json"))["modules"]["encoder"]["provider_options"]
    ort.InferenceSession(OUT / "encoder.onnx", providers=[
        ("TensorrtExecutionProvider", opts), "CUDAExecutionProvider", "CPUExecutionProvider"])

Those options hold the precision, one optimisation profile built from the module's axis ranges, the
workspace size, and engine and timing cache directories. The caches live outside the output
directory (they belong to a GPU, not to the model files) under a directory named by a hash of what
makes a cache valid, so a changed model, TensorRT, GPU, onnxruntime or option finds an empty cache
instead of a stale engine. The key is taken on the machine that prepares, so convert on the GPU
machine that will serve (scripts/validate_tensorrt_gpu.sh does): a configuration prepared elsewhere
names caches keyed for no GPU, which a GPU machine simply fills anew.

`validate` builds the engines and compares every reference case inside the profile with PyTorch,
where the TensorRT EP really runs (see tensorrt_environment.py); elsewhere it is `skipped`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import onnxruntime as ort

from converter_core.errors import InputError
from converter_core.extension import Backend
from converter_core.output import sha256_file
from converter_core.specs import (
    Availability,
    BackendArtifacts,
    BackendContext,
    BackendValidation,
    ExportedModule,
    ModuleReferences,
    ModuleSpec,
    Reference,
)
from converter_core.validate import OrtRunner, Policy, compare, validation_record
from plugins.backends.axis_ranges import AXIS_RANGES_HELP, Range, axis_ranges, shape_at
from plugins.backends.tensorrt_environment import FALLBACK_PROVIDERS, TRT_EP, TensorrtEnvironment, probe
from plugins.backends.tensorrt_graph_check import check_graph, fp32_nodes, has_qdq, load_graph


@dataclass(frozen=True)
class Tolerance:
    """A TensorRT output passes where |trt - torch| <= max(atol, module atol) + rtol * |torch|."""

    atol: float
    rtol: float
    why: str


# fp32: TensorRT enables TF32 for float32 matmuls and convolutions by default (10-bit mantissa, ~5e-4
# relative per product). fp16: the same mantissa for every tensor, accumulated over the layers.
# int8: quantisation steps of ~1% of a tensor's range; this bound catches a broken engine, not a
# small accuracy loss: judge int8 on a task metric.
TOLERANCES = {
    "fp32": Tolerance(1e-3, 1e-3, "float32 with TF32 matmuls (TensorRT's default)"),
    "fp16": Tolerance(1e-2, 1e-2, "float16 activations, layer norms in float32"),
    "int8": Tolerance(1e-1, 1e-1, "int8 from the graph's Q/DQ scales; catches broken engines only"),
}
DEFAULT_WORKSPACE_GIB = 4.0
Precision = Literal["fp32", "fp16", "int8"]


@dataclass(frozen=True)
class TensorrtOptions:
    precision: Precision = field(default="fp32", metadata={"help": "engine precision; int8 needs a QDQ graph"})
    workspace_gib: float = field(default=DEFAULT_WORKSPACE_GIB, metadata={"help": "TensorRT builder workspace"})
    cache_dir: Path | None = field(default=None, metadata={
        "help": "engine and timing caches (default $XDG_CACHE_HOME/vlm-converter)"})
    axis_ranges: dict[str, tuple[int, int, int]] = field(default_factory=dict, metadata={"help": AXIS_RANGES_HELP})

    def __post_init__(self) -> None:
        if not self.workspace_gib > 0:
            raise ValueError(f"workspace_gib must be > 0, got {self.workspace_gib}")


def _flag(value: bool) -> str:
    # Provider options are strings to ONNX Runtime; it parses "True"/"False" (parse_string.h).
    return "True" if value else "False"


def cache_root(options: TensorrtOptions) -> Path:
    """`cache_dir` option, else $XDG_CACHE_HOME/vlm-converter, else ~/.cache/vlm-converter; then /tensorrt."""
    if options.cache_dir:
        base = options.cache_dir
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vlm-converter"
    return base.absolute() / "tensorrt"


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def machine_facts(environment: TensorrtEnvironment) -> dict[str, str]:
    """What, besides the model and the options, makes an engine or a timing cache valid."""
    return {
        "tensorrt": environment.tensorrt_version or "none",
        "gpu": environment.gpu or "none",
        "onnxruntime": ort.__version__,
    }


def profile_options(spec: ModuleSpec, ranges: dict[str, Range]) -> dict[str, str]:
    """One optimisation profile in the TensorRT EP's format: "input:1x3x384x384,other:1x5" per bound.

    The EP wants every input with a dynamic axis in all three, and nothing else.
    """
    bounds: dict[str, list[str]] = {"min": [], "opt": [], "max": []}
    for tensor in spec.inputs:
        if not any(isinstance(dim, str) for dim in tensor.shape):
            continue
        if ":" in tensor.name or "," in tensor.name:
            raise InputError(
                f"{spec.name}: input {tensor.name!r} contains ':' or ',', which the TensorRT EP's profile "
                "format (name:dims,name:dims) cannot express; rename the input"
            )
        for index, bound in enumerate(bounds):
            dims = shape_at(tensor.shape, {axis: r[index] for axis, r in ranges.items()})
            bounds[bound].append(f"{tensor.name}:{'x'.join(map(str, dims))}")
    if not bounds["min"]:
        return {}
    return {f"trt_profile_{bound}_shapes": ",".join(shapes) for bound, shapes in bounds.items()}


def precision_options(precision: Precision) -> dict[str, str]:
    reduced = precision != "fp32"
    # int8 also enables fp16 so that layers without Q/DQ scales run in fp16 rather than fp32.
    return {
        "trt_fp16_enable": _flag(reduced),
        "trt_int8_enable": _flag(precision == "int8"),
        "trt_layer_norm_fp32_fallback": _flag(reduced),
    }


def provider_options(
    spec: ModuleSpec, ranges: dict[str, Range], model_sha256: str, options: TensorrtOptions,
    environment: TensorrtEnvironment,
) -> tuple[dict[str, str], dict[str, Any]]:
    """The TensorRT EP options for one module on this machine, and what the caches were keyed on."""
    precision = options.precision
    workspace = int(options.workspace_gib * (1 << 30))
    engine = {
        **precision_options(precision),
        "trt_max_workspace_size": str(workspace),
        **profile_options(spec, ranges),
    }
    machine = machine_facts(environment)
    engine_key = cache_key({"model_sha256": model_sha256, **machine, "options": engine})
    # A timing cache holds per-layer kernel timings: valid across models, but specific to the device,
    # TensorRT and the builder flags that change kernels (TensorRT docs, "Timing Cache").
    timing_key = cache_key({**machine, "precision": precision_options(precision)})
    root = cache_root(options)
    engine_dir = root / "engines" / f"{spec.name}-{engine_key}"
    timing_dir = root / "timing" / timing_key
    # The EP creates only the last directory level itself.
    engine_dir.mkdir(parents=True, exist_ok=True)
    timing_dir.mkdir(parents=True, exist_ok=True)
    chosen = {
        **engine,
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(engine_dir),
        "trt_engine_cache_prefix": spec.name,
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(timing_dir),
    }
    return chosen, {"engine": engine_key, "timing": timing_key, **machine, "model_sha256": model_sha256}


def _in_profile(reference: Reference, spec: ModuleSpec, ranges: dict[str, list[int]]) -> bool:
    for tensor in spec.inputs:
        shape = reference.case.inputs[tensor.name].shape
        for dim, size in zip(tensor.shape, shape):
            if isinstance(dim, str) and not ranges[dim][0] <= size <= ranges[dim][2]:
                return False
    return True


class TensorrtBackend(Backend):
    name = "tensorrt"
    description = "ONNX Runtime's TensorRT EP: precision, optimisation profiles and engine caches, proven on a GPU"
    options_type = TensorrtOptions

    def availability(self) -> Availability:
        environment = probe()
        return Availability(environment.available, environment.reason())

    def prepare(self, modules: list[ExportedModule], out_dir: Path, options: TensorrtOptions,
                context: BackendContext) -> BackendArtifacts:
        precision = options.precision
        environment = probe()
        target = out_dir / "tensorrt"
        target.mkdir(exist_ok=True)
        configs: dict[str, Any] = {}
        prechecks: dict[str, Any] = {}
        for module in modules:
            spec = module.spec
            # The pre-check comes first, so that what TensorRT cannot take is on record before any build.
            graph = load_graph(module.path)
            check = check_graph(graph, spec.name)
            prechecks[spec.name] = check.to_json()
            if precision == "int8" and not has_qdq(graph):
                raise InputError(
                    f"backend tensorrt: precision int8 needs a quantised graph with QuantizeLinear/DequantizeLinear "
                    f"nodes, and {spec.name} has none; apply a static int8 pass first, or use fp16"
                )
            ranges = axis_ranges(spec, options.axis_ranges, self.name)
            chosen, keys = provider_options(
                spec, {axis: r for axis, (r, _) in ranges.items()}, sha256_file(module.path), options, environment
            )
            configs[spec.name] = {
                "model": os.path.relpath(module.path, out_dir),
                "axis_ranges": {axis: {"min": r[0], "opt": r[1], "max": r[2], "from": origin}
                                for axis, (r, origin) in ranges.items()},
                "provider_options": chosen,
                "cache_keys": keys,
                "fp32_nodes": fp32_nodes(graph) if precision != "fp32" else [],
                "precheck": check.summary(),
                "whole_graph_in_tensorrt": check.whole_graph,
            }
        tolerance = TOLERANCES[precision]
        config = {
            "execution_providers": [TRT_EP, *FALLBACK_PROVIDERS],
            "precision": precision,
            "tolerance": {"atol": tolerance.atol, "rtol": tolerance.rtol, "why": tolerance.why},
            "cache_root": str(cache_root(options)),
            "prepared_on": machine_facts(environment),
            "modules": configs,
            "precheck_file": "tensorrt/precheck.json",
        }
        (target / "precheck.json").write_text(json.dumps(prechecks, indent=2) + "\n")
        (target / "session.json").write_text(json.dumps(config, indent=2) + "\n")
        return BackendArtifacts(self.name, ["tensorrt/session.json", "tensorrt/precheck.json"], config)

    def validate(
        self, artifacts: BackendArtifacts, out_dir: Path, references: dict[str, ModuleReferences],
        context: BackendContext,
    ) -> BackendValidation:
        environment = probe()
        details: dict[str, Any] = {"providers_present": list(environment.providers), "modules": {}}
        if not environment.available:
            return BackendValidation("skipped", environment.reason(), details)
        config = artifacts.config
        tolerance = TOLERANCES[config["precision"]]
        details.update(gpu=environment.gpu, tensorrt=environment.tensorrt_version, precision=config["precision"])
        failures: list[str] = []
        unchecked: list[str] = []
        for name, module in config["modules"].items():
            record: dict[str, Any] = {}
            details["modules"][name] = record
            if name not in references:
                unchecked.append(f"{name}: no PyTorch references")
                continue
            module_refs = references[name]
            ranges = {axis: [r["min"], r["opt"], r["max"]] for axis, r in module["axis_ranges"].items()}
            cases, outside = [], []
            for reference in module_refs.cases:
                (cases if _in_profile(reference, module_refs.spec, ranges) else outside).append(reference)
            record["cases"] = [r.case.label for r in cases]
            record["outside_profile"] = [r.case.label for r in outside]
            if not cases:
                unchecked.append(f"{name}: no reference case lies inside its optimisation profile")
                continue
            started = time.perf_counter()
            try:  # creating the session builds the engines (or loads them from the cache)
                run = OrtRunner(out_dir / module["model"], [(TRT_EP, module["provider_options"]), *FALLBACK_PROVIDERS])
            except Exception as exc:  # an engine that does not build is this backend's failure, named
                failures.append(f"{name}: the TensorRT session could not be created: {type(exc).__name__}: {exc}")
                continue
            record["session_seconds"] = round(time.perf_counter() - started, 2)
            record["providers"] = run.providers
            if run.providers[0] != TRT_EP:
                failures.append(f"{name}: the session fell back to {', '.join(run.providers)}")
                continue
            # A module that a kept INT8/fp16 pass changed is judged by its gates, as everywhere else;
            # the others by the tolerance of this precision.
            in_profile = replace(module_refs, cases=cases)
            validation, failure = compare(in_profile, run, Policy.of(in_profile, atol=tolerance.atol,
                                                                     rtol=tolerance.rtol))
            record.update(validation_record(validation))
            record["outputs"] = {check.name: {"max_abs_diff": check.max_abs_diff, "max_rel_diff": check.max_rel_diff,
                                              "passed": check.passed} for check in validation.outputs.values()}
            if failure:
                failures.append(str(failure))
        if failures:
            return BackendValidation("failed", "; ".join(failures), details)
        if unchecked:
            return BackendValidation("skipped", "; ".join(unchecked), details)
        return BackendValidation(
            "passed",
            f"every module matches PyTorch on {TRT_EP} ({config['precision']}, atol {tolerance.atol:g}, "
            f"rtol {tolerance.rtol:g}) on {environment.gpu}",
            details,
        )
