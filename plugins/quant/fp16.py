"""`fp16`: float16 weights and compute, float32 inputs and outputs.

What it needs: an fp32 graph. What it produces: the graph in float16 (weights take half the bytes)
with Casts at the inputs and outputs, so callers keep feeding and reading float32. Overflow-prone
ops (LayerNorm's variance, Softmax's exponentials, norms) stay float32; when the module's gates still
fail, the most sensitive nodes are kept float32 as well (`plugins.quant.search`).

The gates are measured on ONNX Runtime's CPU provider, which computes ops that have no float16 CPU
kernel in float32 between inserted Casts: it sees the rounding of weights and of the tensors between
ops, not float16 accumulation inside a kernel. A GPU backend should validate its own numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from converter_core.graph_files import save_like
from converter_core.specs import ModuleReferences
from plugins.quant.gated import GatedPass
from plugins.quant.measure import LatencyConfig
from plugins.quant.search import SearchConfig

# Ops that only move or reshape data: nothing to gain by keeping one of them float32.
DATA_MOVEMENT = {"Shape", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Gather", "Slice", "Expand",
                 "Cast", "Range", "Constant", "ConstantOfShape", "Split", "Flatten", "Identity"}


@dataclass(frozen=True)
class Fp16Config:
    keep_float32_ops: tuple[str, ...] = (
        "LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization", "Softmax",
        "ReduceMean", "ReduceSum", "ReduceL2", "Pow", "Sqrt",
    )
    search: SearchConfig = field(default_factory=SearchConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)


def io_types(model: onnx.ModelProto) -> dict[str, str]:
    return {
        value.name: onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
        for value in (*model.graph.input, *model.graph.output)
    }


class Fp16Pass(GatedPass):
    description = "float16 weights and compute with float32 inputs and outputs, LayerNorm and Softmax kept float32"

    def __init__(self, name: str = "fp16", config: Fp16Config = Fp16Config()) -> None:
        self.name = name
        self.config = config
        self.latency, self.search = config.latency, config.search

    def candidates(self, model: onnx.ModelProto) -> list[str]:
        keep = set(self.config.keep_float32_ops) | DATA_MOVEMENT
        return [node.name for node in model.graph.node if node.op_type not in keep]

    def rewrite(self, source: Path, target: Path, references: ModuleReferences, exclude: Sequence[str]) -> dict[str, Any]:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        model = onnx.load(str(source))
        # torch.export declares the type of every tensor, weights included; the converter retypes the
        # weights but not those declarations, and the graph would then contradict itself (ONNX's
        # strict shape inference refuses it). It infers the types again from the graph.
        del model.graph.value_info[:]
        converted = convert_float_to_float16(
            model, keep_io_types=True,
            op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(self.config.keep_float32_ops)),
            node_block_list=list(exclude) or None,
        )
        changed = {name: (was, io_types(converted)[name]) for name, was in io_types(model).items()
                   if io_types(converted).get(name) != was}
        if changed:
            raise RuntimeError(f"the float16 conversion changed input/output types: {changed}")
        save_like(converted, target, source)
        return {"io_types": "unchanged (float32 kept)",
                "note": "gates measured on ONNX Runtime CPU, which runs ops without a float16 kernel in float32"}
