"""Packed-QKV self-attention as torch.export writes it, rewritten to ONNX Runtime's `Attention` op.

ViTs that compute q, k and v with one Linear (BLIP's vision encoder) export as

    MatMul(x, W[in, 3h]) -> Add(b) -> Reshape[-1, N, 3, H, D] -> Transpose[2, 0, 3, 1, 4]
    -> Gather 0 (q), 1 (k), 2 (v);  Softmax(q @ Transpose(k) * scale) @ v
    -> Transpose[0, 2, 1, 3] -> Reshape[-1, N, h]

which ONNX Runtime's transformer optimizer does not match (it expects separate q, k, v MatMuls,
or a Split). `com.microsoft.Attention(x, W, b, num_heads=H)` computes exactly this: its merged
weight layout is the Linear's (q, k, v blocks of H heads of D columns each). One fused op instead
of thirteen, and `quantize_dynamic` turns it into `QAttention` (the qkv projection in int8).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.producer = {out: node for node in model.graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in model.graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.constants = {t.name: t for t in model.graph.initializer}
        self.outputs = {o.name for o in model.graph.output}

    def const(self, name: str) -> np.ndarray | None:
        if name in self.constants:
            return numpy_helper.to_array(self.constants[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def parent(self, node: onnx.NodeProto, index: int, op_type: str) -> onnx.NodeProto | None:
        if len(node.input) <= index:
            return None
        found = self.producer.get(node.input[index])
        return found if found is not None and found.op_type == op_type else None

    def only_consumer(self, name: str, op_type: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        if len(users) == 1 and users[0].op_type == op_type and name not in self.outputs:
            return users[0]
        return None


def _attribute(node: onnx.NodeProto, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _match(graph: _Graph, softmax: onnx.NodeProto) -> tuple[list[onnx.NodeProto], onnx.NodeProto] | None:
    """The nodes of one packed-QKV attention around `softmax`, and the Attention node replacing them."""
    if _attribute(softmax, "axis", -1) not in (-1, 3):
        return None
    scaled = graph.producer.get(softmax.input[0])
    if scaled is None or scaled.op_type not in ("Mul", "Div"):
        return None
    factor = graph.const(scaled.input[1])
    if factor is None or factor.size != 1:
        return None
    scale = float(factor.reshape(())) if scaled.op_type == "Mul" else 1.0 / float(factor.reshape(()))
    scores = graph.parent(scaled, 0, "MatMul")
    if scores is None or graph.only_consumer(scores.output[0], scaled.op_type) is None:
        return None
    q, k_t = graph.parent(scores, 0, "Gather"), graph.parent(scores, 1, "Transpose")
    k = graph.parent(k_t, 0, "Gather") if k_t is not None else None
    context = graph.only_consumer(softmax.output[0], "MatMul")
    v = graph.parent(context, 1, "Gather") if context is not None else None
    if None in (q, k, v) or list(_attribute(k_t, "perm", [])) != [0, 1, 3, 2]:
        return None
    gathers = {}
    for node in (q, k, v):
        index = graph.const(node.input[1])
        if index is None or index.size != 1 or _attribute(node, "axis", 0) != 0:
            return None
        gathers[int(index.reshape(()))] = node
    if set(gathers) != {0, 1, 2} or gathers[0] is not q or gathers[1] is not k or gathers[2] is not v:
        return None
    if len({node.input[0] for node in (q, k, v)}) != 1:
        return None
    permute = graph.producer.get(q.input[0])
    if permute is None or permute.op_type != "Transpose" or list(_attribute(permute, "perm", [])) != [2, 0, 3, 1, 4]:
        return None
    split = graph.parent(permute, 0, "Reshape")
    shape = graph.const(split.input[1]) if split is not None else None
    if shape is None or shape.size != 5 or shape[2] != 3:
        return None
    heads, head_size = int(shape[3]), int(shape[4])
    biased = graph.parent(split, 0, "Add")
    if biased is None:
        return None
    for mm_index in (0, 1):
        projection = graph.parent(biased, mm_index, "MatMul")
        bias = graph.const(biased.input[1 - mm_index])
        if projection is not None and bias is not None:
            break
    else:
        return None
    weight = graph.const(projection.input[1])
    hidden = heads * head_size
    if weight is None or weight.ndim != 2 or weight.shape[1] != 3 * hidden or bias.shape != (3 * hidden,):
        return None
    merge = graph.only_consumer(context.output[0], "Transpose")
    if merge is None or list(_attribute(merge, "perm", [])) != [0, 2, 1, 3]:
        return None
    flatten = graph.only_consumer(merge.output[0], "Reshape")
    flat_shape = graph.const(flatten.input[1]) if flatten is not None else None
    if flat_shape is None or flat_shape.size != 3 or int(flat_shape[2]) != hidden:
        return None
    nodes = [projection, biased, split, permute, q, k, v, k_t, scores, scaled, softmax, context, merge, flatten]
    inside = {out for node in nodes for out in node.output} - {flatten.output[0]}
    if any(user not in nodes for name in inside for user in graph.consumers.get(name, [])) or inside & graph.outputs:
        return None  # an intermediate tensor is read elsewhere: fusing would lose it
    bias_name = biased.input[1 - mm_index]
    if bias_name not in graph.constants:
        return None
    attributes = {"num_heads": heads}
    if not math.isclose(scale, 1 / math.sqrt(head_size), rel_tol=1e-6):
        attributes["scale"] = scale  # the op's default is 1/sqrt(head size)
    fused = helper.make_node(
        "Attention", [projection.input[0], projection.input[1], bias_name], [flatten.output[0]],
        name=f"{projection.name}_Attention", domain=MS_DOMAIN, **attributes,
    )
    return nodes, fused


def fuse_packed_attention(model: onnx.ModelProto) -> int:
    """Rewrite every packed-QKV self-attention of `model` in place; returns how many."""
    graph = _Graph(model)
    replaced: dict[int, onnx.NodeProto] = {}  # id of the removed MatMul -> its Attention
    removed: set[int] = set()
    for node in list(model.graph.node):
        if node.op_type != "Softmax":
            continue
        found = _match(graph, node)
        if found is None:
            continue
        nodes, fused = found
        removed |= {id(n) for n in nodes}
        replaced[id(nodes[0])] = fused
    if not replaced:
        return 0
    kept = []
    for node in model.graph.node:
        if id(node) in replaced:
            kept.append(replaced[id(node)])  # where the projection was: its inputs are ready there
        elif id(node) not in removed:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    produced = {out for node in kept for out in node.output}
    stale = [value for value in model.graph.value_info if value.name not in produced]
    for value in stale:  # the shapes of tensors that no longer exist
        model.graph.value_info.remove(value)
    read = {name for node in kept for name in node.input} | {o.name for o in model.graph.output}
    unused = [t for t in model.graph.initializer if t.name not in read]
    for tensor in unused:  # the removed Reshapes' shapes, Gathers' indices, the scale
        model.graph.initializer.remove(tensor)
    if not any(opset.domain == MS_DOMAIN for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(replaced)
