"""A third-party plugin as an outside author would write it: a two-module toy model that is not BLIP.

The tests install it as a real distribution (a dist-info with an entry point in the `vlm_converter`
group) in a temporary directory; this repository's pyproject does not know it. It implements every
hook: the split, the wrappers, an exporter of its own for one module (a hand-built ONNX graph), a
pass, a backend and a command.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import onnx
import torch
import typer
from onnx import TensorProto, helper, numpy_helper

from converter_core import hookimpl
from converter_core.cli_options import (
    Atol,
    BackendOptions,
    Backends,
    OutputDir,
    Passes,
    RequireValidation,
    Validate,
    convert_options,
)
from converter_core.extension import Backend, GraphPass
from converter_core.specs import (
    Availability,
    BackendArtifacts,
    BackendContext,
    BackendValidation,
    ExportedModule,
    ModuleReferences,
    ModuleSpec,
    PassReport,
    ShapeCase,
    SourceInfo,
    SplitPlan,
    TensorSpec,
)

HIDDEN = 8
CLASSES = 3


class ToyModel(torch.nn.Module):
    """An 'encoder' over token features and a 'head' that pools and classifies."""

    def __init__(self, seed: int = 0, poison: str | None = None) -> None:
        super().__init__()
        self.poison = poison  # the name of an unused weight full of NaN that the head's graph will carry
        torch.manual_seed(seed)
        self.encoder = torch.nn.Sequential(
            torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.GELU(), torch.nn.LayerNorm(HIDDEN)
        )
        self.head = torch.nn.Linear(HIDDEN, CLASSES)


class Encoder(torch.nn.Module):
    def __init__(self, model: ToyModel) -> None:
        super().__init__()
        self.encoder = model.encoder

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.encoder(features)


class Head(torch.nn.Module):
    def __init__(self, model: ToyModel) -> None:
        super().__init__()
        self.head = model.head
        self.poison = model.poison

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden.mean(dim=1))


def _case(batch: int, tokens: int, seed: int, name: str) -> ShapeCase:
    rng = np.random.default_rng(seed)
    return ShapeCase(f"batch={batch} tokens={tokens}", {name: rng.standard_normal((batch, tokens, HIDDEN)).astype(np.float32)})


def _spec(name: str, input_name: str, outputs: tuple[TensorSpec, ...]) -> ModuleSpec:
    return ModuleSpec(
        name=name,
        inputs=(TensorSpec(input_name, "float32", ("batch", "tokens", HIDDEN)),),
        outputs=outputs,
        example=_case(2, 3, 0, input_name),
        cases=[_case(1, 1, 1, input_name), _case(3, 5, 2, input_name), _case(2, 7, 3, input_name)],
        atol=1e-5,
        axis_ranges={"batch": (1, 2, 8), "tokens": (1, 16, 64)},
    )


@hookimpl
def converter_split_model(source: object) -> SplitPlan | None:
    if not isinstance(source, ToyModel):
        return None
    return SplitPlan(
        model_type="toy",
        source=SourceInfo(None, "random", None),
        modules=[
            _spec("encoder", "features", (TensorSpec("hidden", "float32", ("batch", "tokens", HIDDEN)),)),
            _spec("head", "hidden", (TensorSpec("logits", "float32", ("batch", CLASSES)),)),
        ],
        not_exported={"decoder": "the toy model has no decoder"},
        metadata={"toy": {"classes": CLASSES}},
        assets={"labels.txt": b"zero\none\ntwo\n"},
        calibration=toy_calibration,
    )


CALIBRATION_CALLS: list[tuple[str, ...]] = []  # what the pipeline asked the plan for, for the tests


def toy_calibration(modules) -> dict[str, list[ShapeCase]]:
    """"Realistic" inputs: four cases of token features per module asked for."""
    CALIBRATION_CALLS.append(tuple(modules))
    name = {"encoder": "features", "head": "hidden"}
    return {module: [_case(2, 4, 100 + i, name[module]) for i in range(4)] for module in modules}


@hookimpl
def converter_wrap_module(source: object, spec: ModuleSpec) -> torch.nn.Module | None:
    if not isinstance(source, ToyModel):
        return None
    return {"encoder": Encoder, "head": Head}[spec.name](source)


@hookimpl
def converter_export_module(wrapper: torch.nn.Module, spec: ModuleSpec, path: Path) -> bool | None:
    """The head is small enough to write by hand: ReduceMean, MatMul, Add."""
    if not isinstance(wrapper, Head):
        return None
    weight = wrapper.head.weight.detach().numpy().T.copy()
    bias = wrapper.head.bias.detach().numpy().copy()
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["hidden", "axes"], ["pooled"], keepdims=0),
            helper.make_node("MatMul", ["pooled", "weight"], ["projected"]),
            helper.make_node("Add", ["projected", "bias"], ["logits"]),
        ],
        "toy_head",
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "tokens", HIDDEN])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        [
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
            numpy_helper.from_array(weight, "weight"),
            numpy_helper.from_array(bias, "bias"),
            # A table no validation input reaches, as position rows past the lengths tried are.
            *([numpy_helper.from_array(np.array([1.0, np.nan, np.inf], np.float32), wrapper.poison)]
              if wrapper.poison else []),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return True


class ScaleWeights(GraphPass):
    """Multiplies every float initializer by a factor: harmless at 1.0, ruinous otherwise. Its gate
    compares the rewritten graph with PyTorch and keeps it only within the module's tolerance."""

    description = "scale float weights (a test pass with an accuracy gate)"

    def __init__(self, name: str, factor: float) -> None:
        self.name = name
        self.factor = factor

    def apply(self, source: Path, target: Path, references: ModuleReferences) -> PassReport:
        from converter_core.validate import OrtRunner, compare

        model = onnx.load(str(source))
        for initializer in model.graph.initializer:
            if initializer.data_type == TensorProto.FLOAT:
                array = numpy_helper.to_array(initializer) * np.float32(self.factor)
                initializer.CopyFrom(numpy_helper.from_array(array.astype(np.float32), initializer.name))
        onnx.save(model, str(target))
        validation, failure = compare(references, OrtRunner(target))
        worst = max(check.max_abs_diff for check in validation.outputs.values())
        return PassReport(
            self.name, references.spec.name, kept=failure is None,
            reason="within tolerance" if failure is None else f"gate failed: {failure}",
            details={"max_abs_diff": worst},
        )


class LyingPass(GraphPass):
    """A broken third-party pass that always says `kept`: it scales the weights (`ruin`) or writes
    bytes that are no graph (`garbage`), and reports neither."""

    description = "claims to keep the numbers, and does not (a test pass)"

    def __init__(self, name: str, how: str) -> None:
        self.name, self.how = name, how

    def apply(self, source: Path, target: Path, references: ModuleReferences) -> PassReport:
        if self.how == "garbage":
            target.write_bytes(b"this is not an ONNX graph")
        else:
            model = onnx.load(str(source))
            for initializer in model.graph.initializer:
                if initializer.data_type == TensorProto.FLOAT:
                    array = numpy_helper.to_array(initializer) * np.float32(1.5)
                    initializer.CopyFrom(numpy_helper.from_array(array.astype(np.float32), initializer.name))
            onnx.save(model, str(target))
        return PassReport(self.name, references.spec.name, kept=True, reason="all good, trust me")


class CalibrationProbe(GraphPass):
    """A static pass by a third party: it needs calibration inputs, and says how many it got."""

    name = "toy-calibrated"
    description = "reports the calibration inputs it was given (a test pass)"
    needs_calibration = True

    def apply(self, source: Path, target: Path, references: ModuleReferences) -> PassReport:
        return PassReport(self.name, references.spec.name, kept=False, reason="a probe keeps nothing",
                          details={"calibration_cases": len(references.calibration),
                                   "labels": [case.label for case in references.calibration]})


@hookimpl
def converter_register_passes(register: Callable[[GraphPass], None]) -> None:
    register(ScaleWeights("toy-identity", 1.0))
    register(ScaleWeights("toy-ruin", 1.5))
    register(CalibrationProbe())
    register(LyingPass("toy-liar", "ruin"))
    register(LyingPass("toy-garbage", "garbage"))


class ToyRemoteBackend(Backend):
    name = "toy-remote"
    description = "a remote accelerator this machine does not have"

    def availability(self) -> Availability:
        return Availability(False, "no toy accelerator is attached to this machine")

    def prepare(self, modules: list[ExportedModule], out_dir: Path, options: Any,
                context: BackendContext) -> BackendArtifacts:
        config = {"modules": [m.spec.name for m in modules],
                  "task": context.tasks.describe() if isinstance(context.tasks, ToyTasks) else None}
        (out_dir / "toy-remote.json").write_text(json.dumps(config))
        return BackendArtifacts(self.name, ["toy-remote.json"], config)

    def validate(self, artifacts: BackendArtifacts, out_dir: Path, references: dict[str, ModuleReferences],
                 context: BackendContext) -> BackendValidation:
        return BackendValidation("skipped", self.availability().reason)


@hookimpl
def converter_register_backends(register: Callable[[Backend], None]) -> None:
    register(ToyRemoteBackend())


class ToyTasks:
    """The toy model's task layer for its remote backend: what a served request computes."""

    def describe(self) -> str:
        return f"classify token features into {CLASSES} classes: encoder, then head"


@hookimpl
def converter_backend_tasks(backend: str, model_type: str) -> object | None:
    return ToyTasks() if backend == "toy-remote" and model_type == "toy" else None


@hookimpl
def converter_register_commands(cli: typer.Typer) -> None:
    @cli.command("toy")
    def convert_toy(
        output: OutputDir,
        backend: Backends = None,
        backend_option: BackendOptions = None,
        passes: Passes = None,
        atol: Atol = None,
        validate: Validate = True,
        require_validation: RequireValidation = False,
        seed: Annotated[int, typer.Option(help="Seed of the random toy weights.")] = 0,
        poison: Annotated[str | None, typer.Option(help="Add an unused NaN weight of this name to the head.")] = None,
    ) -> None:
        """Convert the two-module toy model (a third-party example)."""
        from converter_core.console import finish, stage_progress
        from converter_core.pipeline import convert

        options = convert_options(output, backend, passes, atol, validate, require_validation, backend_option)
        with stage_progress() as on_stage:
            result = convert(ToyModel(seed, poison), options, on_stage=on_stage)
        finish(result)
