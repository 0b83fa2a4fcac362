"""`onnxsim`: onnx-simplifier's constant folding and graph rewrites, kept only where they help.

What it needs: any graph onnxsim can load. What it produces: the simplified graph, if it has fewer
nodes, smaller weights or runs measurably faster, and is no worse on any of these. On torch.export
graphs onnxsim often makes things worse: it turns MatMul + Add into Reshape + Gemm + Reshape (more
nodes), and duplicates weights that two nodes share (BLIP's tied word embeddings and LM head), so
the report records the measurements and the reason for reverting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from converter_core.graph_files import save_like
from converter_core.specs import ModuleReferences
from plugins.quant.gated import GainConfig, NumbersKeepingPass
from plugins.quant.measure import LatencyConfig


@dataclass(frozen=True)
class SimplifyConfig:
    skip_constant_folding: bool = False
    skipped_optimizers: tuple[str, ...] = ()  # onnxoptimizer pass names onnxsim should not run
    gain: GainConfig = field(default_factory=GainConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)


class SimplifyPass(NumbersKeepingPass):
    name = "onnxsim"
    description = "onnx-simplifier (kept only where it measurably helps: nodes, weight size or latency)"

    def __init__(self, config: SimplifyConfig = SimplifyConfig()) -> None:
        self.config = config
        self.latency, self.gain = config.latency, config.gain

    def rewrite(self, source: Path, target: Path, references: ModuleReferences, exclude: Sequence[str]) -> dict[str, Any]:
        import onnxsim

        simplified, checked = onnxsim.simplify(
            onnx.load(str(source)),
            check_n=0,  # we check against PyTorch ourselves
            skip_constant_folding=self.config.skip_constant_folding,
            skipped_optimizers=list(self.config.skipped_optimizers) or None,
        )
        save_like(simplified, target, source)
        return {"onnxsim_version": getattr(onnxsim, "__version__", "unknown"), "onnxsim_check": bool(checked)}
