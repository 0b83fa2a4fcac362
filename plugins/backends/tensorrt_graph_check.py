"""What in an ONNX graph TensorRT's ONNX parser cannot take, found before any engine is built.

The ONNX Runtime TensorRT EP gives TensorRT the parts of a graph its parser accepts and runs the rest
on CUDA (or CPU), so an unsupported node does not fail the build: it splits the graph into several
engines with copies between them. This check names those nodes up front, so that a slow or partial
engine is explained before anyone waits for a build.

Source of the tables below: onnx/onnx-tensorrt `docs/operators.md` at tag 10.1-GA (commit 96e7811,
"TensorRT 10.0 supports operators in the inclusive range of opset 9 to opset 20"): the rows marked
`N`, and the restrictions written beside `If`, `Loop` and `Scan`. Data types: the same page and the
onnx-tensorrt changelog for 9.0 ("Added support for INT64 data type. The ONNX parser no longer
automatically casts INT64 to INT32"). Later TensorRT 10.x releases may accept more; the check errs
on the side of reporting.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import onnx
from onnx import TensorProto

# Rows marked N in onnx-tensorrt docs/operators.md (10.1-GA).
UNSUPPORTED_OPS = frozenset({
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor",
    "BlackmanWindow", "CenterCropPad", "Col2Im", "Compress", "ConcatFromSequence", "ConvInteger", "DFT",
    "Det", "DynamicQuantizeLinear", "HammingWindow", "HannWindow", "ImageDecoder", "MatMulInteger",
    "MaxRoiPool", "MaxUnpool", "MelWeightMatrix", "Multinomial", "NegativeLogLikelihoodLoss", "Optional",
    "OptionalGetElement", "OptionalHasElement", "QLinearConv", "QLinearMatMul", "RegexFullMatch", "STFT",
    "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength",
    "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence", "StringConcat", "StringNormalizer",
    "StringSplit", "TfIdfVectorizer", "Unique",
})

# Supported, with the restrictions the same page states.
CONTROL_FLOW = {
    "If": "the two branches' outputs must have the same rank and different names",
    "Loop": "scan output length cannot be dynamic; loop-carried shapes must not change between iterations",
    "Scan": "runs as a TensorRT loop; the body must be fully supported",
}

# Data-dependent output shapes: supported by TensorRT 10, but ONNX Runtime documents excluding them from
# the TensorRT EP (`trt_op_types_to_exclude`) when TensorRT's version is slower than CUDA's.
DATA_DEPENDENT_SHAPE_OPS = frozenset({"NonMaxSuppression", "NonZero", "RoiAlign"})

DEFAULT_DOMAINS = ("", "ai.onnx")
MAX_OPSET = 20
LISTED = 20  # tensors listed by name per note; the rest are counted

Severity = Literal["unsupported", "restricted", "note"]


@dataclass(frozen=True)
class Finding:
    """One thing TensorRT will not take (`unsupported`), takes with conditions, or handles differently."""

    severity: Severity
    kind: str  # operator, custom-domain, control-flow, dynamic-rank, non-tensor, int64, float64, opset
    detail: str
    node: str | None = None
    op: str | None = None


@dataclass
class GraphCheck:
    module: str
    nodes: int
    findings: list[Finding] = field(default_factory=list)

    @property
    def whole_graph(self) -> bool:
        """True when nothing found keeps a node out of TensorRT: one engine for the whole graph."""
        return not any(f.severity == "unsupported" for f in self.findings)

    def summary(self) -> str:
        unsupported = [f for f in self.findings if f.severity == "unsupported"]
        if not unsupported:
            return f"{self.module}: TensorRT's parser takes all {self.nodes} nodes"
        named = ", ".join(f"{f.node} ({f.op})" if f.node else f.detail for f in unsupported[:5])
        more = f" and {len(unsupported) - 5} more" if len(unsupported) > 5 else ""
        return f"{self.module}: {len(unsupported)} nodes TensorRT cannot take, run on CUDA instead: {named}{more}"

    def to_json(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes,
            "whole_graph": self.whole_graph,
            "summary": self.summary(),
            "findings": [{k: v for k, v in asdict(f).items() if v is not None} for f in self.findings],
        }


def node_label(node: onnx.NodeProto, index: int, scope: str) -> str:
    # Hand-built graphs often leave nodes unnamed; the op and position still find them.
    name = node.name or f"<unnamed {node.op_type} #{index}>"
    return f"{scope}/{name}" if scope else name


def _walk(graph: onnx.GraphProto, scope: str = "") -> Iterator[tuple[str, onnx.NodeProto]]:
    for index, node in enumerate(graph.node):
        label = node_label(node, index, scope)
        yield label, node
        for attribute in node.attribute:
            subgraphs = [attribute.g] if attribute.HasField("g") else list(attribute.graphs)
            for subgraph in subgraphs:
                yield from _walk(subgraph, f"{label}/{attribute.name}")


def _node_findings(label: str, node: onnx.NodeProto) -> list[Finding]:
    if node.domain not in DEFAULT_DOMAINS:
        return [Finding(
            "unsupported", "custom-domain",
            f"operator {node.domain}::{node.op_type} is not an ONNX operator; TensorRT's parser knows it only "
            "if a TensorRT plugin of that name is registered",
            label, node.op_type,
        )]
    if node.op_type in UNSUPPORTED_OPS:
        return [Finding("unsupported", "operator", "not supported by TensorRT's ONNX parser", label, node.op_type)]
    if node.op_type in CONTROL_FLOW:
        return [Finding("restricted", "control-flow", CONTROL_FLOW[node.op_type], label, node.op_type)]
    if node.op_type in DATA_DEPENDENT_SHAPE_OPS:
        return [Finding(
            "note", "data-dependent-shape",
            "output shape depends on the data; consider trt_op_types_to_exclude if TensorRT is slower here",
            label, node.op_type,
        )]
    return []


def _value_infos(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # shape inference is a help here, never a reason to stop the check
        inferred = model
    graph = inferred.graph
    return [*graph.input, *graph.output, *graph.value_info]


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:LISTED])
    return shown + (f" and {len(names) - LISTED} more" if len(names) > LISTED else "")


def load_graph(path: Path) -> onnx.ModelProto:
    """The graph without external weights: everything the checks here read."""
    return onnx.load(str(path), load_external_data=False)


def check_graph(model: onnx.ModelProto, module: str) -> GraphCheck:
    """Report what in `model` TensorRT's ONNX parser cannot take, with node names."""
    nodes = list(_walk(model.graph))
    check = GraphCheck(module, len(nodes))
    for label, node in nodes:
        check.findings.extend(_node_findings(label, node))

    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for value in values:
            if not value.type.HasField("tensor_type"):
                check.findings.append(Finding(
                    "unsupported", "non-tensor",
                    f"graph {kind} {value.name!r} is a {value.type.WhichOneof('value')}, not a tensor",
                ))
            elif not value.type.tensor_type.HasField("shape"):
                check.findings.append(Finding(
                    "unsupported", "dynamic-rank",
                    f"graph {kind} {value.name!r} has no rank; a TensorRT network input or output needs one",
                ))

    values = _value_infos(model)
    by_type: dict[int, list[str]] = {TensorProto.INT64: [], TensorProto.DOUBLE: []}
    unranked = []
    for value in values:
        if not value.type.HasField("tensor_type"):
            continue
        tensor = value.type.tensor_type
        if tensor.elem_type in by_type:
            by_type[tensor.elem_type].append(value.name)
        if not tensor.HasField("shape"):
            unranked.append(value.name)
    io_names = {v.name for v in (*model.graph.input, *model.graph.output)}
    unranked = [name for name in dict.fromkeys(unranked) if name not in io_names]
    if unranked:
        check.findings.append(Finding(
            "note", "dynamic-rank",
            f"ONNX shape inference finds no rank for {len(unranked)} tensors ({_listed(unranked)}); TensorRT "
            "must infer every rank at build time, which fails for data-dependent ranks",
        ))
    int64 = list(dict.fromkeys(by_type[TensorProto.INT64]))
    if int64:
        check.findings.append(Finding(
            "note", "int64",
            f"{len(int64)} int64 tensors ({_listed(int64)}): TensorRT 10 runs INT64 natively where its operator "
            "table lists it; TensorRT 8.x casts INT64 to INT32, clamping values beyond +-2^31-1",
        ))
    double = list(dict.fromkeys(by_type[TensorProto.DOUBLE]))
    if double:
        check.findings.append(Finding(
            "note", "float64",
            f"{len(double)} float64 tensors ({_listed(double)}): TensorRT casts DOUBLE to FLOAT, clamping to +-FLT_MAX",
        ))
    opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), None)
    if opset is not None and opset > MAX_OPSET:
        check.findings.append(Finding(
            "note", "opset",
            f"opset {opset}: the onnx-tensorrt 10.1 operator table covers opsets 9 to {MAX_OPSET}; a newer "
            "TensorRT may parse it, check the build log",
        ))
    return check


def fp32_nodes(model: onnx.ModelProto) -> list[dict[str, str]]:
    """Nodes that stay in float32 when the engine is built with FP16 enabled, and why.

    `trt_layer_norm_fp32_fallback` makes the TensorRT EP pin every Pow layer followed by a Reduce
    layer (the sum of squares of a decomposed layer norm, where FP16 overflows) to FP32
    (onnxruntime tensorrt_execution_provider.cc). A LayerNormalization node is imported as one
    normalization layer whose compute precision is its `stash_type`, float32 by default
    (onnx-tensorrt onnxOpImporters.cpp).
    """
    nodes = list(model.graph.node)
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(index)
    kept = []
    for index, node in enumerate(nodes):
        label = node_label(node, index, "")
        if node.op_type == "LayerNormalization":
            stash = next((a.i for a in node.attribute if a.name == "stash_type"), 1)
            if stash == TensorProto.FLOAT:
                kept.append({"node": label, "op": node.op_type, "why": "stash_type=1: computed in float32"})
        elif node.op_type == "Pow":
            reduce = next(
                (i for o in node.output for i in consumers.get(o, []) if nodes[i].op_type.startswith("Reduce")), None
            )
            if reduce is not None:
                kept.append({
                    "node": label, "op": node.op_type,
                    "why": f"trt_layer_norm_fp32_fallback: Pow feeding {nodes[reduce].op_type} pinned to float32",
                })
                kept.append({
                    "node": node_label(nodes[reduce], reduce, ""), "op": nodes[reduce].op_type,
                    "why": "trt_layer_norm_fp32_fallback: Reduce after Pow pinned to float32",
                })
    return kept


def has_qdq(model: onnx.ModelProto) -> bool:
    return any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in model.graph.node)
