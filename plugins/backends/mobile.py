"""The `mobile` backend: fixed-shape ORT-format models for ONNX Runtime Mobile.

`prepare` writes into OUT/mobile/:
- `<module>.ort`: the module with every dynamic axis fixed (batch 1; the other axes at the option
  `fixed_sizes` ({axis: N}, or `--backend-option mobile.fixed_sizes.AXIS=N`), else the `opt` size
  of the axis range), shapes re-inferred, converted to the ORT format by onnxruntime's own
  converter (Fixed optimisation style unless the option `ort_optimization_style` says Runtime; ARM
  target, so no x86-only layouts);
- `required_operators.config`: the operators those models need, for a reduced ORT Mobile build
  (`build.sh --minimal_build --include_ops_by_config mobile/required_operators.config`);
- `usability.json` and `usability.md`: how much of each graph NNAPI and CoreML would take;
- `mobile.json`: the configuration the manifest records.

How `validate` proves the `.ort` files. The core gives PyTorch's outputs only for the spec's own
shape cases, and a fixed-shape model runs at one shape only. So per module:
1. every PyTorch case whose shapes are the fixed shapes is compared with PyTorch (`reference:
   "pytorch"`);
2. if there is none, the reference is the exported float ONNX graph run on the CPU EP at the fixed
   shape, on the inputs of the first PyTorch case tiled or cropped along the dynamic axes (so token
   ids stay valid ids); the record says `reference: "exported-onnx"`. That graph is the one the core
   compared with PyTorch at the spec's shapes; this step proves fixing, optimising and converting it
   changed nothing. It is evidence at one remove, and labelled as such everywhere it is reported.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort

from converter_core.errors import InputError
from converter_core.extension import Backend
from converter_core.specs import (
    Availability,
    BackendArtifacts,
    BackendContext,
    BackendValidation,
    ExportedModule,
    ModuleReferences,
    ModuleSpec,
    Reference,
    ShapeCase,
)
from converter_core.validate import OrtRunner, compare_file, validation_record
from plugins.backends.axis_ranges import AXIS_RANGES_HELP, axis_range, input_axes, shape_at
from plugins.backends.mobile_usability import check_usability, usability_markdown

BATCH_AXIS = "batch"


@dataclass(frozen=True)
class MobileOptions:
    fixed_sizes: dict[str, int] = field(default_factory=dict, metadata={
        "help": "AXIS -> N: the size each dynamic axis is fixed to (default: batch 1, else the axis range's opt)"})
    axis_ranges: dict[str, tuple[int, int, int]] = field(default_factory=dict, metadata={"help": AXIS_RANGES_HELP})
    ort_optimization_style: Literal["Fixed", "Runtime"] = field(default="Fixed", metadata={
        "help": "ORT-format optimisation style (onnxruntime's convert_onnx_models_to_ort)"})


@contextlib.contextmanager
def quiet_converter():
    """The converter prints progress and logs at INFO; the manifest records what matters."""
    logger = logging.getLogger("ort_format_model.utils")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as log:
            yield log
    finally:
        logger.setLevel(level)


def fixed_sizes(spec: ModuleSpec, options: MobileOptions) -> dict[str, tuple[int, str]]:
    """The size of every dynamic input axis in the mobile model, and where it came from."""
    sizes: dict[str, tuple[int, str]] = {}
    for axis in input_axes(spec):
        if axis in options.fixed_sizes:
            size, origin = options.fixed_sizes[axis], "option fixed_sizes"
        elif axis == BATCH_AXIS:
            size, origin = 1, "one request at a time on a device"
        elif axis in options.axis_ranges or axis in spec.axis_ranges:
            (_, size, _), where = axis_range(spec, axis, options.axis_ranges, "mobile")
            origin = f"opt of the axis range ({where})"
        else:
            raise InputError(
                f"backend mobile: module {spec.name!r} has no size for its dynamic axis {axis!r}; give it in the "
                f"model plugin's ModuleSpec.axis_ranges or with --backend-option fixed_sizes.{axis}=N"
            )
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise InputError(
                f"backend mobile: {spec.name}: size of axis {axis!r} is {size!r}; expected an integer >= 1"
            )
        sizes[axis] = (size, origin)
    return sizes


def write_fixed_graph(module: ExportedModule, shapes: dict[str, list[int]], target: Path) -> None:
    """The module's graph with its inputs fixed to `shapes`, the fixed sizes propagated by shape inference."""
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed

    model = onnx.load(str(module.path))
    try:
        for name, shape in shapes.items():
            make_input_shape_fixed(model.graph, name, shape)
        fix_output_shapes(model)
    except ValueError as exc:
        raise InputError(f"backend mobile: {module.spec.name}: cannot fix the input shapes {shapes}: {exc}") from exc
    onnx.save(model, str(target))


def fit(array: np.ndarray, shape: list[int]) -> np.ndarray:
    """`array` tiled or cropped along each axis to `shape`: real values, valid token ids included."""
    for axis, size in enumerate(shape):
        if array.shape[axis] != size:
            array = np.take(array, np.arange(size) % array.shape[axis], axis=axis)
    return np.ascontiguousarray(array)


class MobileBackend(Backend):
    name = "mobile"
    description = "ONNX Runtime Mobile: fixed-shape .ort models, a reduced-build operator config, NNAPI/CoreML report"
    options_type = MobileOptions

    def availability(self) -> Availability:
        try:
            from onnxruntime.tools import convert_onnx_models_to_ort  # noqa: F401
        except ImportError as exc:
            return Availability(False, f"onnxruntime {ort.__version__} has no ORT-format converter: {exc}")
        return Availability(
            True,
            f"ORT-format conversion with onnxruntime {ort.__version__}; .ort files validated here on the CPU EP "
            "(NNAPI and CoreML run on devices only: see mobile/usability.md)",
        )

    def prepare(self, modules: list[ExportedModule], out_dir: Path, options: MobileOptions,
                context: BackendContext) -> BackendArtifacts:
        from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

        style = options.ort_optimization_style
        target = out_dir / "mobile"
        target.mkdir(exist_ok=True)
        configs: dict[str, Any] = {}
        usability: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(prefix=".mobile-", dir=out_dir) as scratch:
            for module in modules:
                spec = module.spec
                sizes = fixed_sizes(spec, options)
                shapes = {t.name: shape_at(t.shape, {a: s for a, (s, _) in sizes.items()}) for t in spec.inputs}
                fixed = Path(scratch) / f"{spec.name}.onnx"
                write_fixed_graph(module, shapes, fixed)
                try:
                    usability[spec.name] = check_usability(fixed)
                except Exception as exc:  # the report is advice; a checker that breaks must not stop the conversion
                    usability[spec.name] = {"error": f"{type(exc).__name__}: {exc}"}
                configs[spec.name] = {
                    "source_model": os.path.relpath(module.path, out_dir),
                    "inputs": shapes,
                    "sizes": {axis: {"size": size, "from": origin} for axis, (size, origin) in sizes.items()},
                }
            with quiet_converter() as log:
                try:
                    convert_onnx_models_to_ort(
                        Path(scratch), output_dir=target,
                        optimization_styles=[OptimizationStyle[style]], target_platform="arm",
                    )
                except Exception as exc:
                    raise InputError(
                        f"backend mobile: the ORT-format conversion failed: {exc}\n{log.getvalue()[-2000:]}"
                    ) from exc
        # The converter names its output <model><suffix>: ".ort" at its default level and the Fixed style.
        level = os.getenv("ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL", "all")
        suffix = ("" if level == "all" else f".{level}") + (".with_runtime_opt" if style == "Runtime" else "") + ".ort"
        files = []
        for name, config in configs.items():
            converted = target / f"{name}{suffix}"
            if not converted.is_file():
                raise InputError(f"backend mobile: the ORT-format converter wrote no {converted.name}")
            config["file"] = str(converted.relative_to(out_dir))
            session = ort.InferenceSession(str(converted), providers=["CPUExecutionProvider"])
            config["outputs"] = {o.name: o.shape for o in session.get_outputs()}
            config["usability"] = usability[name].get("recommendation", usability[name].get("error"))
            files.append(config["file"])
        operator_configs = sorted(target.glob("required_operators*.config"))
        if not operator_configs:
            raise InputError("backend mobile: the ORT-format converter wrote no required_operators config")
        for path in operator_configs:
            # Its comments name the models by the staging directory's absolute path, gone after the run.
            path.write_text(path.read_text().replace(f"{target}{os.sep}", "mobile/"))
        files += [str(p.relative_to(out_dir)) for p in operator_configs]
        (target / "usability.json").write_text(json.dumps(usability, indent=2) + "\n")
        shapes_by_module = {name: config["inputs"] for name, config in configs.items()}
        (target / "usability.md").write_text(usability_markdown(usability, shapes_by_module))
        config = {
            "onnxruntime": ort.__version__,
            "runtime_note": f"load with ONNX Runtime (Mobile) {ort.__version__} or newer",
            "optimization_style": style,
            "optimization_level": level,
            "target_platform": "arm",
            "required_operators": [str(p.relative_to(out_dir)) for p in operator_configs],
            "usability_report": ["mobile/usability.json", "mobile/usability.md"],
            "modules": configs,
        }
        (target / "mobile.json").write_text(json.dumps(config, indent=2) + "\n")
        files += ["mobile/usability.json", "mobile/usability.md", "mobile/mobile.json"]
        return BackendArtifacts(self.name, files, config)

    def validate(
        self, artifacts: BackendArtifacts, out_dir: Path, references: dict[str, ModuleReferences],
        context: BackendContext,
    ) -> BackendValidation:
        details: dict[str, Any] = {"provider": "CPUExecutionProvider", "modules": {}}
        failures: list[str] = []
        unchecked: list[str] = []
        said: list[str] = []
        for name, module in artifacts.config["modules"].items():
            module_refs = references.get(name)
            if module_refs is None or not module_refs.cases:
                unchecked.append(f"{name}: no PyTorch references")
                continue
            shapes = {input_name: list(shape) for input_name, shape in module["inputs"].items()}
            matching = [r for r in module_refs.cases
                        if all(list(r.case.inputs[n].shape) == s for n, s in shapes.items())]
            if matching:
                reference = "pytorch"
                checked = replace(module_refs, cases=matching)
                plural = "s" if len(matching) > 1 else ""
                said.append(f"{name} against PyTorch ({len(matching)} case{plural} at the fixed shape)")
            else:
                reference = "exported-onnx"
                base = module_refs.cases[0]
                inputs = {n: fit(base.case.inputs[n], s) for n, s in shapes.items()}
                sizes = " ".join(f"{axis}={v['size']}" for axis, v in module["sizes"].items())
                label = f"{sizes} (inputs of PyTorch case {base.case.label!r} tiled/cropped)"
                try:
                    expected = OrtRunner(out_dir / module["source_model"])(inputs)
                except Exception as exc:  # tiled inputs can break a graph that ties two axes together
                    unchecked.append(f"{name}: no PyTorch case has the fixed shape and the exported graph does not "
                                     f"run on tiled inputs ({type(exc).__name__}: {exc})")
                    continue
                checked = ModuleReferences(module_refs.spec, module_refs.atol,
                                           [Reference(ShapeCase(label, inputs), expected)])
                said.append(f"{name} against the exported ONNX graph at {sizes} (no PyTorch case has that shape)")
            validation, failure = compare_file(checked, out_dir / module["file"])
            details["modules"][name] = {
                **validation_record(validation),
                "reference": reference,
                "cases": validation.cases,
            }
            if failure:
                failures.append(str(failure))
        if failures:
            return BackendValidation("failed", "; ".join(failures), details)
        if unchecked:
            return BackendValidation("skipped", "; ".join(unchecked), details)
        return BackendValidation("passed", "every .ort model matches on the CPU EP: " + "; ".join(said), details)
