"""Multiply-accumulate work counted from an ONNX graph at fixed input shapes.

The graph's dynamic input axes are set to the sizes measured, ONNX shape inference (with data
propagation, so that Reshape targets computed from Shape ops resolve) fills in every tensor's shape,
where it cannot (a Range whose length comes from a Shape), after folding the shape arithmetic to
constants, and each matrix product or convolution adds 2 FLOPs per multiply-accumulate:

- MatMul (batched, broadcast) and its integer forms (MatMulInteger, QLinearMatMul, ...):
  2 * prod(output shape) * K, K the last axis of A;
- Gemm: 2 * M * N * K;
- Conv and its integer forms: 2 * prod(output shape) * (C_in / group) * prod(kernel).

Element-wise work (LayerNorm, Softmax, GELU, adds) is left out: it is a few percent of a ViT's
FLOPs and runs far below any matrix-multiply peak, so counting it would only blur the fraction.
A product counts as integer work when its op is an integer one or, in a QDQ graph, when both its
inputs come out of DequantizeLinear (ONNX Runtime runs those as integer kernels).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from math import prod
from pathlib import Path

import onnx
from onnx import TensorProto, shape_inference

# op -> (index of A, index of B / W); the float ops and their integer counterparts.
MATMUL_OPS = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3),
              "DynamicQuantizeMatMul": (0, 1), "MatMulIntegerToFloat": (0, 1), "FusedMatMul": (0, 1)}
GEMM_OPS = {"Gemm": (0, 1), "QGemm": (0, 3)}
CONV_OPS = {"Conv": (0, 1), "ConvInteger": (0, 1), "QLinearConv": (0, 3)}
INTEGER_OPS = {"MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm",
               "ConvInteger", "QLinearConv"}


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one run at the given input shapes; `integer` is the share run as integer kernels."""

    total: int
    integer: int
    float: int
    products: int  # matrix products and convolutions counted

    def to_json(self) -> dict[str, int]:
        return asdict(self)


class FlopCountError(ValueError):
    """A product's shape could not be inferred; names the node."""


WEIGHT_ELEMENTS = 1024  # larger initializers are weights; smaller integer ones may be shape constants
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}


def shapes_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """A light copy of `model` for shape inference: weights (float, or large) become inputs of their
    fixed shape and type, no data copied; small integer initializers, which feed shape arithmetic,
    stay constants. Folding constants then reaches the shape arithmetic and nothing else."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    graph = light.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    for tensor in model.graph.initializer:
        if tensor.data_type in FLOAT_TYPES or prod(tensor.dims) > WEIGHT_ELEMENTS:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        else:
            graph.initializer.append(tensor)
    return light


def fix_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A copy of `model` whose inputs have the concrete `shapes` (inputs of fixed shape may be left
    out) and no stale intermediate shapes."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name not in shapes:
            if any(not d.HasField("dim_value") for d in dims):
                raise ValueError(f"no shape given for graph input {value.name!r}, whose shape is not fixed")
            continue
        wanted = shapes[value.name]
        if len(dims) != len(wanted):
            raise ValueError(f"input {value.name}: the graph has rank {len(dims)}, the shape given {tuple(wanted)}")
        for dim, size in zip(dims, wanted):
            dim.Clear()
            dim.dim_value = int(size)
    # The exporter declared intermediate shapes with symbolic axes; infer them again from the inputs.
    del fixed.graph.value_info[:]
    ordered = _topological(fixed.graph)
    del fixed.graph.node[:]
    fixed.graph.node.extend(ordered)
    for value in fixed.graph.output:
        value.type.tensor_type.ClearField("shape")
    return fixed


def _topological(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes in an order where each comes after its inputs' producers. Shape inference walks the
    list once; the fp16 converter appends the input Casts at the end."""
    ready = {value.name for value in graph.input} | {t.name for t in graph.initializer} | {""}
    waiting, ordered = list(graph.node), []
    while waiting:
        runnable = [node for node in waiting if all(name in ready for name in node.input)]
        if not runnable:  # a cycle or an input nobody produces: leave the rest as they were
            return ordered + waiting
        done = {id(node) for node in runnable}
        for node in runnable:
            ready.update(node.output)
        ordered += runnable
        waiting = [node for node in waiting if id(node) not in done]
    return ordered


def _known_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...] | None]:
    shapes: dict[str, tuple[int, ...] | None] = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for value in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        tensor = value.type.tensor_type
        if not tensor.HasField("shape"):
            shapes.setdefault(value.name, None)
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        shapes[value.name] = None if None in dims else tuple(dims)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    shapes[node.output[0]] = tuple(attribute.t.dims)
    return shapes


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _node_flops(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...] | None]) -> int:
    def shape(name: str) -> tuple[int, ...]:
        found = shapes.get(name)
        if found is None:
            raise FlopCountError(f"node {node.name or node.op_type} ({node.op_type}): the shape of {name!r} "
                                 "could not be inferred at these input shapes")
        return found

    out = shape(node.output[0])
    if node.op_type in MATMUL_OPS:
        a = shape(node.input[MATMUL_OPS[node.op_type][0]])
        return 2 * prod(out) * a[-1]
    if node.op_type in GEMM_OPS:
        a = shape(node.input[GEMM_OPS[node.op_type][0]])
        k = a[0] if _attribute(node, "transA", 0) else a[-1]
        return 2 * prod(out) * k
    weight = shape(node.input[CONV_OPS[node.op_type][1]])  # [C_out, C_in / group, *kernel]
    return 2 * prod(out) * prod(weight[1:])


def _infer(model: onnx.ModelProto) -> dict[str, tuple[int, ...] | None]:
    return _known_shapes(shape_inference.infer_shapes(model, data_prop=True))


def _folded(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its shape arithmetic folded to constants (Range lengths, for one, which ONNX's
    data propagation leaves unknown)."""
    import onnxscript.optimizer
    from onnxscript import ir

    folded = ir.from_proto(model)
    onnxscript.optimizer.fold_constants(folded)
    proto = ir.to_proto(folded)
    del proto.graph.value_info[:]
    return proto


def count_flops(path: Path | onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> FlopCount:
    """FLOPs of one run of the graph at `input_shapes` (every graph input, by name)."""
    model = path if isinstance(path, onnx.ModelProto) else onnx.load(str(path))
    fixed = fix_input_shapes(shapes_only(model), input_shapes)
    products = [node for node in model.graph.node if node.op_type in {**MATMUL_OPS, **GEMM_OPS, **CONV_OPS}]
    shapes = _infer(fixed)
    if any(shapes.get(name) is None for node in products for name in (*node.input[:1], node.output[0])):
        shapes = {**_infer(_folded(fixed)), **{k: v for k, v in shapes.items() if v is not None}}
    producers = {output: node.op_type for node in model.graph.node for output in node.output}
    total = integer = 0
    for node in products:
        flops = _node_flops(node, shapes)
        indices = {**MATMUL_OPS, **GEMM_OPS, **CONV_OPS}[node.op_type]
        dequantized = all(producers.get(node.input[i]) == "DequantizeLinear" for i in indices)
        total += flops
        if node.op_type in INTEGER_OPS or dequantized:
            integer += flops
    return FlopCount(total, integer, total - integer, len(products))
