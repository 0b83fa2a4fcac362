"""Triton model configurations: written from a graph's tensors, read back with Triton's own schema.

Both directions use `tritonclient`'s `model_config_pb2` (Triton's ModelConfig protobuf) and protobuf's
`text_format`, so a config that this module writes or accepts is one Triton's parser accepts too.
The check (`check_graph_config`) holds a config against the ONNX graph it points at: the same
inputs and outputs by name, dtype and dims, with the batch dimension left out where the model
batches (Triton's rule for `max_batch_size > 0`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from converter_core.errors import InputError
from converter_core.specs import ModuleSpec, TensorSpec

if TYPE_CHECKING:
    from google.protobuf.message import Message

CONFIG_NAME = "config.pbtxt"
TRITON_EXTRA = "pip install 'vlm-converter[triton]'"

# numpy dtype names (TensorSpec.dtype) and ONNX element types -> Triton data types.
NUMPY_TO_TRITON = {
    "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32",
    "int64": "TYPE_INT64", "float16": "TYPE_FP16", "float32": "TYPE_FP32", "float64": "TYPE_FP64",
}
ONNX_TO_TRITON = {
    onnx.TensorProto.BOOL: "TYPE_BOOL", onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.INT16: "TYPE_INT16", onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16", onnx.TensorProto.STRING: "TYPE_STRING",
}

def model_config_pb2() -> Any:
    """Triton's ModelConfig schema, from tritonclient; an InputError naming the extra where it is missing."""
    try:
        from tritonclient.grpc import model_config_pb2 as schema
    except ImportError as exc:
        raise InputError(f"backend triton needs tritonclient ({exc}): {TRITON_EXTRA}") from None
    return schema


@dataclass(frozen=True)
class TritonTensor:
    """One input or output of a Triton model: `dims` without the batch dimension where the model batches."""

    name: str
    data_type: str  # "TYPE_FP32", "TYPE_STRING", ...
    dims: tuple[int, ...]
    optional: bool = False
    reshape: tuple[int, ...] | None = None  # the shape the model sees, where it differs from `dims`


def batch_axis(spec: ModuleSpec) -> str | None:
    """The dynamic axis that is the first dimension of every input and output, if there is one:
    only then can Triton batch the graph (it stacks requests along that dimension)."""
    firsts = {t.shape[0] if t.shape else None for t in (*spec.inputs, *spec.outputs)}
    if len(firsts) == 1:
        (first,) = firsts
        return first if isinstance(first, str) else None
    return None


def graph_tensors(tensors: tuple[TensorSpec, ...], batched: bool) -> list[TritonTensor]:
    tritons = []
    for tensor in tensors:
        if tensor.dtype not in NUMPY_TO_TRITON:
            raise InputError(f"backend triton: tensor {tensor.name!r} has dtype {tensor.dtype}, which has no Triton type")
        dims = tuple(-1 if isinstance(dim, str) else int(dim) for dim in (tensor.shape[1:] if batched else tensor.shape))
        # Triton wants at least one dim: a per-sample scalar ([batch] in the graph) is [1] reshaped to [].
        tritons.append(TritonTensor(tensor.name, NUMPY_TO_TRITON[tensor.dtype], dims or (1,),
                                    reshape=() if not dims else None))
    return tritons


def build_config(
    name: str, *, inputs: list[TritonTensor], outputs: list[TritonTensor], max_batch_size: int,
    instance_kind: str, instances: int, platform: str | None = None, backend: str | None = None,
    preferred_batch_sizes: tuple[int, ...] = (), queue_delay_us: int = 0,
    parameters: dict[str, str] | None = None, accelerator: dict[str, str] | None = None,
) -> Message:
    """A ModelConfig message; `accelerator` holds the parameters of a TensorRT gpu_execution_accelerator."""
    schema = model_config_pb2()
    config = schema.ModelConfig(name=name, max_batch_size=max_batch_size)
    if platform:
        config.platform = platform
    if backend:
        config.backend = backend
    for target, tensors in ((config.input, inputs), (config.output, outputs)):
        for tensor in tensors:
            entry = target.add(name=tensor.name, data_type=schema.DataType.Value(tensor.data_type), dims=tensor.dims)
            if tensor.optional:
                entry.optional = True
            if tensor.reshape is not None:
                entry.reshape.SetInParent()
                entry.reshape.shape.extend(tensor.reshape)
    if max_batch_size > 0:
        config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
        config.dynamic_batching.preferred_batch_size.extend(preferred_batch_sizes)
    kind = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}[instance_kind]
    config.instance_group.add(kind=schema.ModelInstanceGroup.Kind.Value(kind), count=instances)
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = value
    if accelerator is not None:
        trt = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        for key, value in accelerator.items():
            trt.parameters[key] = value
    return config


def config_text(config: Message) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def read_config(path: Path) -> Message:
    """Parse a config.pbtxt with Triton's schema; an error names the file and what protobuf rejected."""
    from google.protobuf import text_format

    schema = model_config_pb2()
    try:
        return text_format.Parse(path.read_text(), schema.ModelConfig())
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path.parent.name}/{CONFIG_NAME} does not parse as a Triton ModelConfig: {exc}") from None


def _graph_dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [dim.dim_param or (dim.dim_value if dim.HasField("dim_value") else "?")
            for dim in value_info.type.tensor_type.shape.dim]


def _graph_tensors(graph: onnx.GraphProto, kind: str) -> dict[str, onnx.ValueInfoProto]:
    if kind == "output":
        return {v.name: v for v in graph.output}
    initializers = {i.name for i in graph.initializer}
    return {v.name: v for v in graph.input if v.name not in initializers}


def check_graph_config(config: Message, graph_path: Path) -> list[str]:
    """Where `config` disagrees with the ONNX graph at `graph_path`, one message per tensor naming it."""
    schema = model_config_pb2()
    graph = onnx.load(str(graph_path), load_external_data=False).graph
    model = config.name
    problems = []
    batched = config.max_batch_size > 0
    for kind, entries in (("input", config.input), ("output", config.output)):
        in_graph = _graph_tensors(graph, kind)
        in_config = {entry.name: entry for entry in entries}
        for name in sorted(set(in_graph) - set(in_config)):
            problems.append(f"model {model}: graph {kind} {name!r} is missing from {CONFIG_NAME}")
        for name in sorted(set(in_config) - set(in_graph)):
            problems.append(f"model {model}: {CONFIG_NAME} {kind} {name!r} is not a {kind} of the graph")
        for name in sorted(set(in_config) & set(in_graph)):
            entry, value_info = in_config[name], in_graph[name]
            data_type = schema.DataType.Name(entry.data_type)
            expected_type = ONNX_TO_TRITON.get(value_info.type.tensor_type.elem_type, "TYPE_INVALID")
            if data_type != expected_type:
                problems.append(f"model {model}: {kind} {name!r} is {data_type} in {CONFIG_NAME}, "
                                f"the graph's is {expected_type}")
            dims = _graph_dims(value_info)
            if batched:
                if not dims or not isinstance(dims[0], str):
                    problems.append(f"model {model}: {kind} {name!r}: max_batch_size {config.max_batch_size} "
                                    f"needs a dynamic first dimension, the graph's shape is {dims}")
                    continue
                dims = dims[1:]
            expected = [-1 if isinstance(dim, str) else dim for dim in dims]
            # What the model sees: `reshape` where the config has one (Triton's way to serve [batch] as [1]).
            seen = list(entry.reshape.shape) if entry.HasField("reshape") else list(entry.dims)
            if seen != expected:
                what = f"reshape {seen}" if entry.HasField("reshape") else f"dims {seen}"
                problems.append(f"model {model}: {kind} {name!r} has {what} in {CONFIG_NAME}, "
                                f"the graph's are {expected} (shape {dims}{', batch left out' if batched else ''})")
    return problems
