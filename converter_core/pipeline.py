"""The conversion pipeline, as stages: split -> wrap -> export -> passes -> final validation ->
backends -> manifest.

It runs whatever the plugins provide and knows nothing of any model family. Each stage is a small
function that hands the next a typed value from `converter_core.specs`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from converter_core.errors import CheckFailed, InputError, PluginError
from converter_core.export import export_with_torch, require_export_extra
from converter_core.extension import Backend, GraphPass
from converter_core.graph_files import EXTERNAL_DATA_ABOVE, external_data_files, move_graph, remove_graph
from converter_core.manifest import write_manifest
from converter_core.options import resolve_backend_options
from converter_core.output import check_target, sha256_file, staged_directory
from converter_core.plugins import PluginHost, blame, collect_backends, collect_passes, get_plugin_manager
from converter_core.specs import (
    BackendContext,
    BackendRecord,
    BackendValidation,
    ConversionResult,
    ExportedModule,
    ModuleRecord,
    ModuleReferences,
    ModuleSpec,
    ModuleValidation,
    PassReport,
    ShapeCase,
    SplitPlan,
)
from converter_core.validate import (
    NonFiniteWeights,
    Policy,
    ValidationFailed,
    compare_file,
    nonfinite_weights,
    torch_references,
)

OnStage = Callable[[str], None]


@dataclass(frozen=True)
class PassRequest:
    """Apply pass `pass_name` to `modules`, or to every module when `modules` is None."""

    pass_name: str
    modules: tuple[str, ...] | None = None

    def applies_to(self, module: str) -> bool:
        return self.modules is None or module in self.modules


@dataclass
class ConvertOptions:
    output_dir: Path
    backends: tuple[str, ...] = ()
    passes: tuple[PassRequest, ...] = ()
    validate: bool = True
    atol: float | None = None  # None: each module's own tolerance
    require_validation: bool = False
    # KEY / BACKEND.KEY -> value, or BACKEND -> its options object (see converter_core.options).
    backend_options: Mapping[str, Any] = field(default_factory=dict)
    external_data_above: int = EXTERNAL_DATA_ABOVE  # weight bytes above which a graph keeps them in a .data file


@dataclass
class _Plugins:
    """What this run takes from the plugins: the backends with their typed options, and the passes."""

    backends: dict[str, tuple[Backend, str]]
    backend_options: dict[str, Any]
    passes: dict[str, tuple[GraphPass, str]]


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


def _check_options(options: ConvertOptions) -> None:
    if options.atol is not None and not (math.isfinite(options.atol) and options.atol >= 0):
        raise InputError(f"--atol must be a finite number >= 0, got {options.atol}")
    if options.require_validation and not options.validate:
        raise InputError("--require-validation cannot be met with --no-validate: nothing would be validated")


def _select(registered: dict[str, tuple[Any, str]], wanted: list[str], kind: str) -> dict[str, tuple[Any, str]]:
    unknown = [name for name in wanted if name not in registered]
    if unknown:
        available = ", ".join(sorted(registered)) or "none installed"
        raise InputError(f"unknown {kind} {', '.join(map(repr, unknown))}; available: {available}")
    return {name: registered[name] for name in wanted}


def _select_plugins(host: PluginHost, options: ConvertOptions) -> _Plugins:
    backends = _select(collect_backends(host), list(options.backends), "backend")
    passes = _select(collect_passes(host), list(dict.fromkeys(r.pass_name for r in options.passes)), "pass")
    types = {name: backend.options_type for name, (backend, _) in backends.items()}
    return _Plugins(backends, resolve_backend_options(types, options.backend_options), passes)


def _split(host: PluginHost, source: object, options: ConvertOptions) -> SplitPlan:
    plan: SplitPlan | None = host.call_first("converter_split_model", source=source)
    if plan is None:
        raise InputError(f"no installed plugin can split a {type(source).__name__}")
    names = {spec.name for spec in plan.modules}
    for request in options.passes:
        missing = set(request.modules or ()) - names
        if missing:
            raise InputError(f"pass {request.pass_name!r} names unknown modules {sorted(missing)}; modules: {sorted(names)}")
    return plan


def _calibration(plan: SplitPlan, options: ConvertOptions, plugins: _Plugins, on_stage: OnStage
                 ) -> dict[str, list[ShapeCase]]:
    """Calibration inputs for the modules that a pass needing them will be applied to."""
    wanted = [spec.name for spec in plan.modules if any(
        plugins.passes[r.pass_name][0].needs_calibration and r.applies_to(spec.name) for r in options.passes)]
    if not wanted or plan.calibration is None:
        return {}
    on_stage("preparing calibration data")
    return plan.calibration(wanted)


def _export(host: PluginHost, source: object, plan: SplitPlan, spec: ModuleSpec, stage: Path,
            options: ConvertOptions, on_stage: OnStage) -> tuple[ExportedModule, Any]:
    """The module's wrapper (PyTorch's reference) and its exported graph in `stage`."""
    on_stage(f"{spec.name}: wrapping")
    wrapper = host.call_first("converter_wrap_module", source=source, spec=spec)
    if wrapper is None:
        raise PluginError(f"no plugin wraps module {spec.name!r} of a {plan.model_type} model")
    path = stage / f"{spec.name}.onnx"
    on_stage(f"{spec.name}: exporting to ONNX")
    if not host.call_first("converter_export_module", wrapper=wrapper, spec=spec, path=path):
        export_with_torch(wrapper, spec, path, options.external_data_above)
    return ExportedModule(spec, path, external_data_files(path)), wrapper


def _apply_passes(module: ExportedModule, references: ModuleReferences, requests: list[PassRequest],
                  plugins: _Plugins, on_stage: OnStage) -> list[PassReport]:
    """Each requested pass in turn; a kept pass's graph replaces the module's, a reverted one is deleted."""
    reports = []
    for request in requests:
        graph_pass, label = plugins.passes[request.pass_name]
        on_stage(f"{module.spec.name}: pass {graph_pass.name}")
        target = module.path.with_name(f".{module.spec.name}.{graph_pass.name}.onnx")
        with blame(label, f"pass {graph_pass.name} on {module.spec.name}"):
            report = graph_pass.apply(module.path, target, references)
        if report.kept:
            move_graph(target, module.path)
        else:
            remove_graph(target)
        reports.append(report)
    return reports


def _final_validation(module: ExportedModule, references: ModuleReferences, after_pass: str | None,
                      on_stage: OnStage) -> tuple[ModuleValidation, ValidationFailed | None]:
    """The graph as it is on disk now: every weight finite, and its outputs against PyTorch, by the
    tolerance or, after a kept pass that changed the numbers, by the module's gates."""
    on_stage(f"{module.spec.name}: validating against PyTorch")
    validation, failure = compare_file(references, module.path, Policy.of(references))
    bad = nonfinite_weights(module.path)
    if bad:
        listed = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        failure = NonFiniteWeights(module.spec.name, listed, "every weight", "NaN or Inf in the weights")
        validation.failures.insert(0, failure.short)
        validation.status = "failed"
    if failure is not None and after_pass:
        failure = failure.following(after_pass)
    validation.reason = str(failure) if failure else None
    validation.after_pass = after_pass
    validation.sha256 = sha256_file(module.path)
    return validation, failure


def _convert_module(host: PluginHost, source: object, plan: SplitPlan, spec: ModuleSpec, stage: Path,
                    options: ConvertOptions, plugins: _Plugins, calibration: list[ShapeCase],
                    on_stage: OnStage) -> tuple[ModuleRecord, ExportedModule, ModuleReferences | None, CheckFailed | None]:
    module, wrapper = _export(host, source, plan, spec, stage, options, on_stage)
    requests = [r for r in options.passes if r.applies_to(spec.name)]
    references = None
    if options.validate or requests:
        on_stage(f"{spec.name}: running PyTorch on {len(spec.cases)} shape cases")
        atol = options.atol if options.atol is not None else spec.atol
        references = torch_references(wrapper, spec, atol)
        references.calibration = calibration
    del wrapper  # the module's weights can go before the next module's are loaded
    export_validation = export_failure = None
    if options.validate and requests:
        export_validation, export_failure = _final_validation(module, references, None, on_stage)
    reports = _apply_passes(module, references, requests, plugins, on_stage) if requests else []
    kept = [r for r in reports if r.kept]
    if any(r.changes_numbers for r in kept):
        # From here on the graph is judged by the gates its pass met, not by atol.
        references = replace(references, by_gates=True)
    module = replace(module, data_files=external_data_files(module.path))
    failure = None
    if not options.validate:
        validation = ModuleValidation("skipped", options.atol if options.atol is not None else spec.atol, [],
                                      reason="--no-validate")
    elif export_validation is not None and not kept:
        validation, failure = export_validation, export_failure  # no pass changed the file: these bytes
    else:
        validation, failure = _final_validation(module, references, kept[-1].pass_name if kept else None, on_stage)
    record = ModuleRecord(spec, module.path.name, sha256_file(module.path), validation, reports,
                          {name: sha256_file(stage / name) for name in module.data_files},
                          export_validation if kept else None)
    return record, module, references, failure


def _write_assets(stage: Path, plan: SplitPlan) -> None:
    for relative, content in plan.assets.items():
        target = stage / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)


def _run_backend(host: PluginHost, name: str, plugins: _Plugins, plan: SplitPlan, modules: list[ExportedModule],
                 stage: Path, references: dict[str, ModuleReferences], options: ConvertOptions,
                 on_stage: OnStage) -> BackendRecord:
    backend, label = plugins.backends[name]
    tasks = host.call_first("converter_backend_tasks", backend=name, model_type=plan.model_type)
    context = BackendContext(plan.model_type, plan.metadata, tasks)
    with blame(label, f"backend {name}"):
        on_stage(f"backend {name}: preparing")
        availability = backend.availability()
        artifacts = backend.prepare(modules, stage, plugins.backend_options[name], context)
        if not options.validate:
            result = BackendValidation("skipped", "--no-validate")
        else:
            on_stage(f"backend {name}: validating")
            result = backend.validate(artifacts, stage, references, context)
    return BackendRecord(name, label, availability, artifacts, result, _options_json(plugins.backend_options[name]))


def _options_json(options: Any) -> dict[str, Any]:
    import dataclasses

    return {key: str(value) if isinstance(value, Path) else value for key, value in dataclasses.asdict(options).items()}


def _backend_failures(record: BackendRecord, options: ConvertOptions) -> list[CheckFailed]:
    if record.validation.status == "failed":
        return [CheckFailed(f"backend {record.name}: {record.validation.reason}")]
    if record.validation.status == "skipped" and options.require_validation:
        return [CheckFailed(f"backend {record.name} was not validated ({record.validation.reason}) "
                            "and --require-validation is set")]
    return []


def convert(
    source: object,
    options: ConvertOptions,
    host: PluginHost | None = None,
    on_stage: OnStage = lambda stage: None,
) -> ConversionResult:
    """Convert `source` into `options.output_dir`, written atomically with its manifest.

    A check that fails does not stop the run: the output is written with the failure recorded and
    `ConversionResult.failures` says what failed. Bad input and broken plugins raise.
    """
    host = host or get_plugin_manager()
    _check_options(options)
    check_target(options.output_dir)
    plugins = _select_plugins(host, options)
    require_export_extra()
    on_stage("splitting the model")
    plan = _split(host, source, options)
    check_target(options.output_dir, plan.inputs)
    with staged_directory(options.output_dir, plan.inputs) as stage:
        calibration = _calibration(plan, options, plugins, on_stage)
        result = ConversionResult(options.output_dir, plan, {}, {}, [])
        exported, references = [], {}
        for spec in plan.modules:
            record, module, module_references, failure = _convert_module(
                host, source, plan, spec, stage, options, plugins, calibration.get(spec.name, []), on_stage)
            result.modules[spec.name] = record
            exported.append(module)
            if module_references is not None:
                references[spec.name] = module_references
            if failure is not None:
                result.failures.append(failure)
        _write_assets(stage, plan)
        # Written before the backends run, so that their validation can load the output as a user
        # would (a runtime reads the manifest); written again with their records at the end.
        write_manifest(stage, result)
        for name in plugins.backends:
            record = _run_backend(host, name, plugins, plan, exported, stage, references, options, on_stage)
            result.backends[name] = record
            result.failures += _backend_failures(record, options)
        on_stage("writing the manifest")
        write_manifest(stage, result)
    return result
