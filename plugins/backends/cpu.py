"""The `cpu` backend: ONNX Runtime on the best CPU execution provider this install has.

oneDNN is reached in two ways: the DNNL EP of a self-built onnxruntime, or the OpenVINO EP of the
`onnxruntime-openvino` wheel (its CPU plugin runs on oneDNN). Both wheels ship the same `onnxruntime`
package, so whichever was installed last is the one Python imports: we report the active distribution
and the EP, never assume.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort

from converter_core.extension import Backend
from converter_core.specs import (
    Availability,
    BackendArtifacts,
    BackendContext,
    BackendValidation,
    ExportedModule,
    ModuleReferences,
)
from converter_core.validate import compare_file, validation_record

ONNXRUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-openvino", "onnxruntime-gpu", "onnxruntime-training")
PREFERRED_PROVIDERS = ("DnnlExecutionProvider", "OpenVINOExecutionProvider", "CPUExecutionProvider")


def active_onnxruntime_distribution() -> str:
    """The installed distribution whose files are the `onnxruntime` package Python imports."""
    imported = Path(ort.__file__).resolve().parent
    for name in ONNXRUNTIME_DISTRIBUTIONS:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        init = next((f for f in dist.files or () if str(f).replace(os.sep, "/") == "onnxruntime/__init__.py"), None)
        if init is not None and Path(dist.locate_file(init)).resolve().parent == imported:
            return f"{name} {dist.version}"
    return f"unknown distribution (onnxruntime {ort.__version__})"


def cpu_provider() -> tuple[str, dict[str, str]]:
    available = ort.get_available_providers()
    for provider in PREFERRED_PROVIDERS:
        if provider in available:
            return provider, ({"device_type": "CPU"} if provider == "OpenVINOExecutionProvider" else {})
    return "CPUExecutionProvider", {}


def optimization_level(provider: str) -> str:
    # EXTENDED, not ALL: the saved graph must stay portable across CPUs (ALL adds layout
    # transformations for the instruction set of the machine that saved it). EXTENDED fuses into
    # ORT's own contrib ops, which only the default CPU EP runs: for oneDNN EPs keep to BASIC.
    return "ORT_ENABLE_EXTENDED" if provider == "CPUExecutionProvider" else "ORT_ENABLE_BASIC"


def session_options(threads: int | None, level: str = "ORT_ENABLE_EXTENDED") -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.intra_op_num_threads = threads or 0
    return options


@dataclass(frozen=True)
class CpuOptions:
    threads: int = field(default=0, metadata={"help": "intra-op threads; 0 lets ONNX Runtime choose"})

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")


def save_optimized(source: ExportedModule, target: Path, options: ort.SessionOptions) -> None:
    """ONNX Runtime's optimised graph of `source` at `target`, its weights in `target.data` where the
    source keeps them outside the graph."""
    options.optimized_model_filepath = str(target)
    if source.data_files:
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         target.name + ".data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    # Optimising with the default CPU EP keeps the saved graph loadable by every CPU EP.
    ort.InferenceSession(str(source.path), sess_options=options, providers=["CPUExecutionProvider"])


class CpuBackend(Backend):
    name = "cpu"
    description = "ONNX Runtime on CPU: oneDNN (DNNL or OpenVINO EP) where installed, else the default CPU EP"
    options_type = CpuOptions

    def availability(self) -> Availability:
        provider, _ = cpu_provider()
        note = "" if provider != "CPUExecutionProvider" else " (no oneDNN EP in this onnxruntime)"
        return Availability(True, f"{provider} from {active_onnxruntime_distribution()}{note}")

    def prepare(self, modules: list[ExportedModule], out_dir: Path, options: CpuOptions,
                context: BackendContext) -> BackendArtifacts:
        provider, provider_options = cpu_provider()
        target = out_dir / "cpu"
        target.mkdir(exist_ok=True)
        files = []
        for module in modules:
            optimized = target / module.path.name
            save_optimized(module, optimized, session_options(options.threads, optimization_level(provider)))
            files.append(str(optimized.relative_to(out_dir)))
            if module.data_files:
                files.append(str(optimized.with_name(optimized.name + ".data").relative_to(out_dir)))
        config = {
            "provider": provider,
            "provider_options": provider_options,
            "onnxruntime": active_onnxruntime_distribution(),
            "graph_optimization_level": optimization_level(provider),
            "intra_op_num_threads": options.threads,
            "models": {m.spec.name: str((target / m.path.name).relative_to(out_dir)) for m in modules},
        }
        (target / "session.json").write_text(json.dumps(config, indent=2) + "\n")
        files.append("cpu/session.json")
        return BackendArtifacts(self.name, files, config)

    def validate(
        self, artifacts: BackendArtifacts, out_dir: Path, references: dict[str, ModuleReferences],
        context: BackendContext,
    ) -> BackendValidation:
        provider = artifacts.config["provider"]
        providers = [(provider, artifacts.config["provider_options"])]
        if provider != "CPUExecutionProvider":
            providers.append(("CPUExecutionProvider", {}))
        details: dict[str, Any] = {"provider": provider, "modules": {}}
        failures = []
        for module, relative in artifacts.config["models"].items():
            config = artifacts.config
            options = session_options(config["intra_op_num_threads"], config["graph_optimization_level"])
            validation, failure = compare_file(references[module], out_dir / relative, providers=providers,
                                               options=options)
            if validation.providers and validation.providers[0] != provider:
                # ORT falls back to the CPU EP silently when an EP cannot be created.
                failures.append(f"{module}: session runs on {validation.providers}, not on {provider}")
            details["modules"][module] = {"providers": validation.providers, **validation_record(validation)}
            if failure:
                failures.append(str(failure))
        if failures:
            return BackendValidation("failed", "; ".join(failures), details)
        gated = sorted(name for name, module in details["modules"].items() if "judged_by_gates" in module)
        how = f" (quantised, so judged by their gates: {', '.join(gated)})" if gated else ""
        return BackendValidation("passed", f"every module matches PyTorch on {provider}{how}", details)
