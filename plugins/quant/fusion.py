"""`fusion`: ONNX Runtime's transformer fusions, after shape inference.

What it needs: an fp32 transformer graph. What it produces: the same graph with ONNX Runtime
contrib ops (Attention, BiasGelu, ...) where the optimizer's patterns match,
and the inferred shapes of every tensor (symbolic shape inference, which names dynamic sizes such as
the decoders' `past + new`; ONNX's own inference where symbolic inference fails).

The contrib ops run on ONNX Runtime only: a graph for TensorRT or another runtime should skip this
pass. The optimizer runs at level 0 (its Python fusions only), so the file stays portable across
CPUs; ONNX Runtime applies its own hardware-specific optimisations when it loads the file.
On torch.export graphs the optimizer's attention patterns do not match (BLIP's ViT computes q, k, v
in one MatMul and splits them with Gather; its text layers' masks come in another form): the
packed-QKV form is rewritten here (`plugins.quant.attention`), the report says what was fused,
and a pass that fused nothing, or measurably helped nothing, is reverted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import onnx

from converter_core.graph_files import external_data_files
from converter_core.specs import ModuleReferences
from plugins.quant.attention import fuse_packed_attention
from plugins.quant.gated import GainConfig, NumbersKeepingPass
from plugins.quant.measure import LatencyConfig


@dataclass(frozen=True)
class FusionConfig:
    # None: "vit" for a graph that takes images (a 4-D input into a Conv), "bert" otherwise.
    model_type: str | None = None
    num_heads: int = 0  # 0: the optimizer reads it off the graph where it can
    hidden_size: int = 0
    shape_inference: Literal["symbolic", "onnx", "none"] = "symbolic"
    # Also rewrite torch.export's packed-QKV self-attention, which ORT's optimizer misses, to its
    # Attention op (plugins.quant.attention).
    packed_attention: bool = True
    # Off by default because it is slower on ONNX Runtime's CPU EP wherever there is more than a token:
    # its SkipLayerNormalization kernel took 1.31 ms on [1, 577, 768] where Add, Add and
    # LayerNormalization took 0.55 ms, 0.059 ms against 0.035 ms at 20 tokens (onnxruntime 1.32,
    # 2 threads, AVX-512 Xeon); without it the INT8 base vision encoder at 384 ran in 137 ms instead
    # of 166 ms. At 1 token (a decoder step with past) the fused op is faster, 0.011 ms against
    # 0.021 ms: about 0.4 ms of a base decoder step's 19 ms.
    skip_layer_norm: bool = False
    gain: GainConfig = field(default_factory=GainConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)


def guess_model_type(model: onnx.ModelProto) -> str:
    inputs = {value.name: len(value.type.tensor_type.shape.dim) for value in model.graph.input}
    takes_images = any(node.op_type == "Conv" and inputs.get(node.input[0]) == 4 for node in model.graph.node)
    return "vit" if takes_images else "bert"


def infer_shapes(model: onnx.ModelProto, how: str) -> tuple[onnx.ModelProto, str]:
    """The model with shapes of its tensors filled in, and which inference gave them."""
    if how == "none":
        return model, "none"
    failure = ""
    if how == "symbolic":
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        try:
            inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
            if inferred is not None:
                return inferred, "symbolic"
            failure = "returned nothing"
        except Exception as exc:  # it gives up on some op patterns (BLIP's text encoder)
            failure = f"{type(exc).__name__}: {exc}"
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    return inferred, "onnx" + (f" (symbolic inference failed: {failure})" if failure else "")


class FusionPass(NumbersKeepingPass):
    name = "fusion"
    description = "ONNX Runtime transformer fusions and shape inference (kept only where it measurably helps)"

    def __init__(self, config: FusionConfig = FusionConfig()) -> None:
        self.config = config
        self.latency, self.gain = config.latency, config.gain

    def rewrite(self, source: Path, target: Path, references: ModuleReferences, exclude: Sequence[str]) -> dict[str, Any]:
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model

        model = onnx.load(str(source))
        contrib_before = Counter(node.op_type for node in model.graph.node if node.domain == "com.microsoft")
        model_type = self.config.model_type or guess_model_type(model)
        model, shapes = infer_shapes(model, self.config.shape_inference)
        if self.config.packed_attention:
            fuse_packed_attention(model)
        options = FusionOptions(model_type)
        options.enable_skip_layer_norm = self.config.skip_layer_norm
        optimized = optimize_model(
            model, model_type=model_type, num_heads=self.config.num_heads, hidden_size=self.config.hidden_size,
            opt_level=0, use_gpu=False, optimization_options=options,
        )
        optimized.save_model_to_file(str(target), use_external_data_format=bool(external_data_files(source)))
        contrib = Counter(node.op_type for node in optimized.model.graph.node if node.domain == "com.microsoft")
        fused = {op: count - contrib_before[op] for op, count in contrib.items() if count > contrib_before[op]}
        return {
            "model_type": model_type,
            "shape_inference": shapes,
            "shaped_tensors": len(optimized.model.graph.value_info),
            "fused": fused,
            "contrib_ops": sorted(contrib),
        }

    def judge(self, before, after, result, details):
        kept, reason = super().judge(before, after, result, details)
        if not details.get("fused"):
            return False, f"fused nothing ({details.get('model_type')} patterns did not match)"
        return kept, reason + (f"; fused {details['fused']}; runs on ONNX Runtime only (contrib ops "
                               f"{', '.join(details['contrib_ops'])})" if kept and details["contrib_ops"] else "")
