"""The default exporter: torch.onnx.export through torch.export, with the spec's named dynamic axes."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from converter_core.errors import ConverterError, InputError, raise_if_environment
from converter_core.graph_files import EXTERNAL_DATA_ABOVE
from converter_core.specs import ModuleSpec

if TYPE_CHECKING:  # torch is imported where it is used: `convert --help` should not pay for it
    import torch
    from torch.export import Dim


class ExportError(ConverterError):
    """The exporter could not turn a wrapper into an ONNX graph, or the graph does not fit its spec."""


EXPORT_EXTRA = ("torch", "onnxscript")


def require_export_extra(*modules: str) -> None:
    """Exporting needs torch and friends, which the runtime-only install leaves out: say how to get them."""
    import importlib.util

    missing = [name for name in (*EXPORT_EXTRA, *modules) if importlib.util.find_spec(name) is None]
    if missing:
        raise InputError(
            f"converting a model needs {', '.join(missing)}, which this install lacks (the base install is the "
            "torch-free runtime); install the export extra: pip install 'vlm-converter[export]'"
        )


def weight_bytes(wrapper: torch.nn.Module) -> int:
    """Bytes of the wrapper's parameters and buffers, each shared tensor counted once."""
    tensors = {id(t): t for t in (*wrapper.parameters(), *wrapper.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _dynamic_shapes(spec: ModuleSpec) -> tuple[dict[int, Dim], ...]:
    from torch.export import Dim

    # One Dim object per axis name, shared by every input that has the axis, so torch.export knows
    # that e.g. the batch of `input_ids` and `image_embeds` is the same symbol.
    dims: dict[str, Dim] = {}
    shapes = []
    for tensor in spec.inputs:
        axes = {}
        for index, dim in enumerate(tensor.shape):
            if isinstance(dim, str):
                axes[index] = dims.setdefault(dim, Dim(dim))
        shapes.append(axes)
    return tuple(shapes)


def torch_inputs(spec: ModuleSpec, arrays: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(arrays[t.name])) for t in spec.inputs)


def export_with_torch(wrapper: torch.nn.Module, spec: ModuleSpec, path: Path,
                      external_data_above: int = EXTERNAL_DATA_ABOVE) -> None:
    """Export `wrapper` to `path`; weights over `external_data_above` bytes go to `path.name + ".data"`."""
    import torch

    for tensor in spec.inputs:
        for axis, size in zip(tensor.shape, spec.example.inputs[tensor.name].shape):
            if isinstance(axis, str) and size < 2:
                # torch.export would silently specialise the axis to its example size.
                raise ExportError(
                    f"{spec.name}: example size of axis {axis!r} of {tensor.name} is {size}; it must be >= 2"
                )
    log = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log), torch.no_grad():
            warnings.simplefilter("ignore")
            logging.getLogger("torch").setLevel(logging.ERROR)
            torch.onnx.export(
                wrapper.eval(),
                torch_inputs(spec, spec.example.inputs),
                str(path),
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                dynamic_shapes=_dynamic_shapes(spec),
                opset_version=spec.opset,
                dynamo=True,
                external_data=weight_bytes(wrapper) > external_data_above,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:
        raise_if_environment(exc)
        raise ExportError(f"{spec.name}: torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    check_graph_io(spec, path)


def check_graph_io(spec: ModuleSpec, path: Path) -> None:
    """The written graph must have exactly the spec's inputs and outputs, with its dynamic axes dynamic."""
    graph = onnx.load(str(path), load_external_data=False).graph
    for kind, declared, actual in (("input", spec.inputs, graph.input), ("output", spec.outputs, graph.output)):
        names = [value.name for value in actual]
        if names != [t.name for t in declared]:
            raise ExportError(f"{spec.name}: graph {kind}s are {names}, the spec says {[t.name for t in declared]}")
        for tensor, value in zip(declared, actual):
            dims = value.type.tensor_type.shape.dim
            for index, dim in enumerate(tensor.shape):
                if isinstance(dim, str) and dims[index].HasField("dim_value"):
                    raise ExportError(
                        f"{spec.name}: axis {index} ({dim}) of {kind} {tensor.name} was exported as the "
                        f"fixed size {dims[index].dim_value}"
                    )
