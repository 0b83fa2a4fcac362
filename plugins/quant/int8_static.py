"""`int8-static`: INT8 weights and activations, activation ranges calibrated ahead of time (QDQ).

What it needs: calibration inputs (`needs_calibration`): the model plugin's, through its split plan
(cases made from real images and captions), when it has them; otherwise the PyTorch reference cases,
which are random validation inputs, and the report says so, because ranges from random data may not
fit real ones.
What it produces: a QDQ graph (QuantizeLinear / DequantizeLinear around the quantised nodes), which
ONNX Runtime's CPU provider runs as integer kernels. When the module's gates fail, the most
sensitive nodes are left float (`plugins.quant.search`); the calibration runs once per pass.
"""

from __future__ import annotations

import inspect
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from converter_core.graph_files import external_data_files
from converter_core.specs import ModuleReferences, PassReport
from plugins.quant.gated import GatedPass
from plugins.quant.int8_dynamic import QUANT_TYPES, QUANTIZER_OPTIONS, quantizer_input
from plugins.quant.measure import LatencyConfig
from plugins.quant.search import SearchConfig

CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


@dataclass(frozen=True)
class Int8StaticConfig:
    # None: every op type ONNX Runtime can quantise (LayerNorm, Softmax, Add, Gather... included).
    op_types: tuple[str, ...] | None = ("MatMul", "Gemm", "Conv")
    per_channel: bool = False  # ORT's CPU guidance: per-tensor is the fastest
    activation_type: Literal["uint8", "int8"] = "uint8"  # ORT's CPU guidance for x86 (u8 activations, s8 weights)
    weight_type: Literal["int8", "uint8"] = "int8"
    reduce_range: bool = False
    calibrate_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    max_calibration_cases: int = 64
    search: SearchConfig = field(default_factory=SearchConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)


def calibration_inputs(references: ModuleReferences, limit: int) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """The inputs to calibrate on, and what the report should say about where they came from."""
    if references.calibration:
        cases = references.calibration[:limit]
        return [c.inputs for c in cases], {"source": "module calibration data", "cases": len(cases),
                                           "labels": [c.label for c in cases]}
    cases = [r.case for r in references.cases][:limit]
    return [c.inputs for c in cases], {
        "source": "validation cases", "cases": len(cases),
        "note": "the module has no calibration data: calibrated on its random validation inputs, not real data",
    }


class Int8StaticPass(GatedPass):
    needs_calibration = True
    shares_quantized_tensors = True
    description = ("INT8 static QDQ quantisation calibrated on the module's calibration data, gated, with a search "
                   "for nodes to keep float")

    def __init__(self, name: str = "int8-static", config: Int8StaticConfig = Int8StaticConfig()) -> None:
        self.name = name
        self.config = config
        self.latency, self.search = config.latency, config.search
        self._cache: Path | None = None

    def op_types(self) -> list[str]:
        if self.config.op_types is not None:
            return list(self.config.op_types)
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

        return sorted(set(QDQRegistry) | set(QLinearOpsRegistry))

    def candidates(self, model: onnx.ModelProto) -> list[str]:
        wanted = set(self.op_types())
        return [node.name for node in model.graph.node if node.op_type in wanted]

    def apply(self, source: Path, target: Path, references: ModuleReferences) -> PassReport:
        # Calibrate once per apply; the search's later rewrites read the ranges from the cache.
        with tempfile.TemporaryDirectory(prefix="vlm-calibration-") as folder:
            self._cache = Path(folder) / "ranges.json"
            try:
                return super().apply(source, target, references)
            finally:
                self._cache = None

    def rewrite(self, source: Path, target: Path, references: ModuleReferences, exclude: Sequence[str]) -> dict[str, Any]:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        inputs, calibration = calibration_inputs(references, self.config.max_calibration_cases)

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.items = iter(inputs)

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.items, None)

        # onnxruntime < 1.25 (onnxruntime-openvino 1.24 among them) has no calibration cache: there
        # each of the search's rewrites calibrates again, slower and to the same ranges.
        cache = ({"calibration_cache_path": self._cache}
                 if "calibration_cache_path" in inspect.signature(quantize_static).parameters else {})
        with quantizer_input(source) as graph:
            quantize_static(
                graph, target, Reader(),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=self.op_types(),
                per_channel=self.config.per_channel,
                reduce_range=self.config.reduce_range,
                activation_type=getattr(QuantType, QUANT_TYPES[self.config.activation_type]),
                weight_type=getattr(QuantType, QUANT_TYPES[self.config.weight_type]),
                nodes_to_exclude=list(exclude),
                calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[self.config.calibrate_method]),
                extra_options=QUANTIZER_OPTIONS,
                use_external_data_format=bool(external_data_files(source)),
                **cache,
            )
        return {"format": "QDQ", "calibration": calibration}
