"""The conversion pipeline: split -> wrap -> export -> validate -> passes -> backends -> manifest.

It runs whatever the plugins provide and knows nothing of any model family.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from converter_core.errors import CheckFailed, InputError, PluginError
from converter_core.export import export_with_torch
from converter_core.extension import Backend, GraphPass
from converter_core.manifest import write_manifest
from converter_core.output import check_target, sha256_file, staged_directory
from converter_core.plugins import PluginHost, collect_backends, collect_passes, get_plugin_manager
from converter_core.specs import (
    Availability,
    BackendArtifacts,
    BackendValidation,
    ExportedModule,
    ModuleSpec,
    ModuleValidation,
    ModuleReferences,
    PassReport,
    SplitPlan,
)
from converter_core.validate import OrtRunner, compare, torch_references


@dataclass(frozen=True)
class PassRequest:
    """Apply pass `pass_name` to `modules`, or to every module when `modules` is None."""

    pass_name: str
    modules: tuple[str, ...] | None = None


@dataclass
class ConvertOptions:
    output_dir: Path
    backends: tuple[str, ...] = ()
    passes: tuple[PassRequest, ...] = ()
    validate: bool = True
    atol: float | None = None  # None: each module's own tolerance
    require_validation: bool = False
    backend_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModuleRecord:
    spec: ModuleSpec
    file: str
    sha256: str
    validation: ModuleValidation
    passes: list[PassReport] = field(default_factory=list)


@dataclass
class BackendRecord:
    name: str
    plugin: str
    availability: Availability
    artifacts: BackendArtifacts
    validation: BackendValidation


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


def parse_pass_policy(text: str) -> tuple[PassRequest, ...]:
    """`int8-dynamic` (every module), or `vision_encoder=fusion+int8-static,text_decoder=int8-dynamic`."""
    requests: list[PassRequest] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        module, sep, names = item.rpartition("=") if "=" in item else ("", "", item)
        if sep and not module:
            raise InputError(f"bad pass policy {item!r}: expected MODULE=PASS or PASS")
        for name in filter(None, names.split("+")):
            requests.append(PassRequest(name.strip(), (module.strip(),) if module else None))
    return tuple(requests)


def _select(registered: dict[str, tuple[Any, str]], wanted: list[str], kind: str) -> dict[str, tuple[Any, str]]:
    unknown = [name for name in wanted if name not in registered]
    if unknown:
        available = ", ".join(sorted(registered)) or "none installed"
        raise InputError(f"unknown {kind} {', '.join(map(repr, unknown))}; available: {available}")
    return {name: registered[name] for name in wanted}


def convert(
    source: object,
    options: ConvertOptions,
    host: PluginHost | None = None,
    on_stage: Callable[[str], None] = lambda stage: None,
) -> ConversionResult:
    """Convert `source` into `options.output_dir`, written atomically with its manifest.

    A check that fails does not stop the run: the output is written with the failure recorded and
    `ConversionResult.failures` says what failed. Bad input and broken plugins raise.
    """
    host = host or get_plugin_manager()
    check_target(options.output_dir)
    backends: dict[str, tuple[Backend, str]] = _select(collect_backends(host), list(options.backends), "backend")
    passes: dict[str, tuple[GraphPass, str]] = _select(
        collect_passes(host), list(dict.fromkeys(r.pass_name for r in options.passes)), "pass"
    )

    on_stage("splitting the model")
    plan: SplitPlan | None = host.hook.converter_split_model(source=source)
    if plan is None:
        raise InputError(f"no installed plugin can split a {type(source).__name__}")
    names = {spec.name for spec in plan.modules}
    for request in options.passes:
        missing = set(request.modules or ()) - names
        if missing:
            raise InputError(f"pass {request.pass_name!r} names unknown modules {sorted(missing)}; modules: {sorted(names)}")

    failures: list[CheckFailed] = []
    modules: dict[str, ModuleRecord] = {}
    exported: list[ExportedModule] = []
    references: dict[str, ModuleReferences] = {}
    backend_records: dict[str, BackendRecord] = {}
    with staged_directory(options.output_dir) as stage:
        for spec in plan.modules:
            on_stage(f"{spec.name}: wrapping")
            wrapper = host.hook.converter_wrap_module(source=source, spec=spec)
            if wrapper is None:
                raise PluginError(f"no plugin wraps module {spec.name!r} of a {plan.model_type} model")
            path = stage / f"{spec.name}.onnx"
            on_stage(f"{spec.name}: exporting to ONNX")
            if not host.hook.converter_export_module(wrapper=wrapper, spec=spec, path=path):
                export_with_torch(wrapper, spec, path)
            atol = options.atol if options.atol is not None else spec.atol
            if options.validate or options.passes:
                on_stage(f"{spec.name}: running PyTorch on {len(spec.cases)} shape cases")
                references[spec.name] = torch_references(wrapper, spec, atol)
            if options.validate:
                on_stage(f"{spec.name}: validating against PyTorch")
                validation, failure = compare(references[spec.name], OrtRunner(path))
                if failure:
                    failures.append(failure)
            else:
                validation = ModuleValidation("skipped", atol, [], reason="--no-validate")
            reports = []
            for request in options.passes:
                if request.modules is not None and spec.name not in request.modules:
                    continue
                graph_pass = passes[request.pass_name][0]
                on_stage(f"{spec.name}: pass {graph_pass.name}")
                target = stage / f".{spec.name}.{graph_pass.name}.onnx"
                report = graph_pass.apply(path, target, references[spec.name])
                if report.kept:
                    os.replace(target, path)
                elif target.exists():
                    target.unlink()
                reports.append(report)
            if any(r.kept and r.changes_numbers for r in reports):
                # Backends now check the quantised graph by the gates its pass met, not by atol.
                references[spec.name] = replace(references[spec.name], by_gates=True)
            modules[spec.name] = ModuleRecord(spec, path.name, sha256_file(path), validation, reports)
            exported.append(ExportedModule(spec, path))
            del wrapper

        for name, (backend, plugin) in backends.items():
            on_stage(f"backend {name}: preparing")
            availability = backend.availability()
            artifacts = backend.prepare(exported, stage, dict(options.backend_options))
            if not options.validate:
                result = BackendValidation("skipped", "--no-validate")
            else:
                on_stage(f"backend {name}: validating")
                result = backend.validate(artifacts, stage, references)
            if result.status == "failed":
                failures.append(CheckFailed(f"backend {name}: {result.reason}"))
            elif result.status == "skipped" and options.require_validation:
                failures.append(CheckFailed(f"backend {name} was not validated ({result.reason}) and --require-validation is set"))
            backend_records[name] = BackendRecord(name, plugin, availability, artifacts, result)

        for relative, content in plan.assets.items():
            target = stage / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        result = ConversionResult(options.output_dir, plan, modules, backend_records, failures)
        on_stage("writing the manifest")
        write_manifest(stage, result)
    return result
