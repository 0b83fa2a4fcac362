"""Entry point of the graph passes: fusion, onnxsim, INT8 (dynamic, static) and FP16, each gated."""

from __future__ import annotations

from collections.abc import Callable

from converter_core import hookimpl
from converter_core.extension import GraphPass
from plugins.quant.fp16 import Fp16Pass
from plugins.quant.fusion import FusionPass
from plugins.quant.int8_dynamic import Int8DynamicConfig, Int8DynamicPass
from plugins.quant.int8_static import Int8StaticPass
from plugins.quant.simplify import SimplifyPass


def passes() -> list[GraphPass]:
    return [
        FusionPass(),
        SimplifyPass(),
        Int8DynamicPass("int8-dynamic", Int8DynamicConfig(per_channel=False)),
        Int8DynamicPass("int8-dynamic-per-channel", Int8DynamicConfig(per_channel=True)),
        Int8StaticPass(),
        Fp16Pass(),
    ]


@hookimpl
def converter_register_passes(register: Callable[[GraphPass], None]) -> None:
    for graph_pass in passes():
        register(graph_pass)
