"""`int8-dynamic` and `int8-dynamic-per-channel`: INT8 weights, activations quantised at run time.

What it needs: an fp32 graph; no calibration data. What it produces: MatMul, Gemm and (fused)
Attention nodes with constant weights as MatMulInteger / QAttention (weights
stored as int8, one scale per tensor or per output channel); activations are quantised per run
from their actual range, so nothing is calibrated and nothing can be calibrated wrong. Attention's
activation-by-activation MatMuls, LayerNorm and Softmax stay float. When the module's gates fail,
the most sensitive nodes are left float (`plugins.quant.search`).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import onnx

from converter_core.graph_files import external_data_files, save_like
from converter_core.specs import ModuleReferences
from plugins.quant.gated import GatedPass
from plugins.quant.measure import LatencyConfig
from plugins.quant.search import SearchConfig

QUANT_TYPES = {"int8": "QInt8", "uint8": "QUInt8"}
# For onnxruntime.quantization: a tensor whose type its shape inference cannot find (an output of a
# contrib op, after `fusion`) is float, as every activation in these graphs is.
QUANTIZER_OPTIONS = {"DefaultTensorType": onnx.TensorProto.FLOAT}


@contextlib.contextmanager
def quantizer_input(source: Path) -> Iterator[Path]:
    """`source` without the intermediate shapes recorded in it, for onnxruntime.quantization.

    `fusion` records shapes before ONNX Runtime's optimizer rewrites the graph, and some records go
    stale: `fusion` then `int8-dynamic` on BLIP's text encoder failed with "Inferred shape and existing
    shape differ in dimension 0: (128) vs (512)". The quantizer infers the shapes it needs itself."""
    model = onnx.load(str(source), load_external_data=False)
    if not model.graph.value_info:
        yield source
        return
    onnx.load_external_data_for_model(model, str(source.parent))
    del model.graph.value_info[:]
    with tempfile.TemporaryDirectory(prefix="vlm-quantize-") as folder:
        path = Path(folder) / source.name
        save_like(model, path, source)
        yield path


@dataclass(frozen=True)
class Int8DynamicConfig:
    per_channel: bool = False
    # Attention is the fused op of the `fusion` pass (its qkv projection becomes int8: QAttention).
    # Conv (the vision encoder's patch embedding) stays float by default: ONNX Runtime's ConvInteger
    # took 20 ms where the float Conv took 5.5 ms (ViT-B/16 at 384, one thread), for 0.7% of the weights.
    op_types: tuple[str, ...] = ("MatMul", "Gemm", "Attention")
    weight_type: Literal["int8", "uint8"] = "int8"
    reduce_range: bool = False  # 7-bit weights, for CPUs without VNNI whose int8 kernels can saturate
    search: SearchConfig = field(default_factory=SearchConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)


def constant_names(model: onnx.ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer} | {
        out for node in model.graph.node if node.op_type == "Constant" for out in node.output
    }


class Int8DynamicPass(GatedPass):
    description = ("INT8 dynamic quantisation of weights (MatMul, Gemm, Attention), gated, with a search "
                   "for nodes to keep float")

    def __init__(self, name: str = "int8-dynamic", config: Int8DynamicConfig = Int8DynamicConfig()) -> None:
        self.name = name
        self.config = config
        self.latency, self.search = config.latency, config.search
        if config.per_channel:
            self.description = self.description.replace("of weights", "of weights, one scale per output channel")

    def candidates(self, model: onnx.ModelProto) -> list[str]:
        constants = constant_names(model)
        return [
            node.name for node in model.graph.node
            if node.op_type in self.config.op_types and len(node.input) > 1 and node.input[1] in constants
        ]

    def rewrite(self, source: Path, target: Path, references: ModuleReferences, exclude: Sequence[str]) -> dict[str, Any]:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with quantizer_input(source) as graph:
            quantize_dynamic(
                graph, target,
                op_types_to_quantize=list(self.config.op_types),
                per_channel=self.config.per_channel,
                reduce_range=self.config.reduce_range,
                weight_type=getattr(QuantType, QUANT_TYPES[self.config.weight_type]),
                nodes_to_exclude=list(exclude),
                extra_options={"MatMulConstBOnly": True, **QUANTIZER_OPTIONS},
                use_external_data_format=bool(external_data_files(source)),
            )
        made = {"MatMul": "MatMulInteger", "Gemm": "MatMulInteger", "Conv": "ConvInteger", "Attention": "QAttention"}
        return {"format": f"QOperator ({', '.join(dict.fromkeys(made[op] for op in self.config.op_types if op in made))})"}
