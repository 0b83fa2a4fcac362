"""The benchmark, as a user runs it: `python -m benchmarks --quick` writes every section with sane numbers.

Expected FLOP counts come from hand computations (a hand-made graph; the ViT formula on the tiny
preset's dimensions), never from the benchmark's own counter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from benchmarks.flops import count_flops
from plugins.blip.presets import PRESETS

REPO = Path(__file__).parent.parent
MODULES = ("vision_encoder", "text_encoder", "text_decoder", "text_decoder_with_past")


def hand_made_graph() -> onnx.ModelProto:
    """A batched MatMul, a transposed Gemm, a grouped Conv, a QDQ MatMul, and a MatMul whose row count
    comes out of Shape -> Range (what ONNX's own shape inference cannot follow)."""
    rng = np.random.default_rng(0)

    def const(name, array):
        return numpy_helper.from_array(np.asarray(array), name)

    initializers = [
        const("w", rng.standard_normal((4, 5)).astype(np.float32)),
        const("b_gemm", rng.standard_normal((5, 7)).astype(np.float32)),
        const("w_conv", rng.standard_normal((6, 2, 3, 3)).astype(np.float32)),
        const("w_q", rng.integers(-128, 128, (4, 5)).astype(np.int8)),
        const("scale", np.float32(0.1)), const("zero_u8", np.uint8(128)), const("zero_s8", np.int8(0)),
        const("table", rng.standard_normal((10, 4)).astype(np.float32)),
        const("zero", np.int64(0)), const("one", np.int64(1)), const("axis1", np.array([1], dtype=np.int64)),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y_matmul"]),  # [b, 3, 4] x [4, 5]
        helper.make_node("Gemm", ["a", "b_gemm"], ["y_gemm"], transA=1),  # A^T [6, 5] x [5, 7]
        helper.make_node("Conv", ["image", "w_conv"], ["y_conv"], group=2, pads=[1, 1, 1, 1]),  # -> [b, 6, 8, 8]
        helper.make_node("QuantizeLinear", ["x", "scale", "zero_u8"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "scale", "zero_u8"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "scale", "zero_s8"], ["w_dq"]),
        helper.make_node("MatMul", ["x_dq", "w_dq"], ["y_qdq"]),  # integer work in a QDQ graph
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Gather", ["x_shape", "axis1"], ["rows_1d"], axis=0),
        helper.make_node("Squeeze", ["rows_1d"], ["rows"]),
        helper.make_node("Range", ["zero", "rows", "one"], ["positions"]),
        helper.make_node("Gather", ["table", "positions"], ["embedded"], axis=0),  # [3, 4]
        helper.make_node("MatMul", ["embedded", "w"], ["y_range"]),  # [3, 4] x [4, 5]
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "rows", 4]),
        helper.make_tensor_value_info("a", TensorProto.FLOAT, [5, 6]),
        helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 4, 8, 8]),
    ]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
               for name in ("y_matmul", "y_gemm", "y_conv", "y_qdq", "y_range")]
    graph = helper.make_graph(nodes, "hand_made", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_flops_of_a_hand_made_graph_are_the_hand_computed_ones():
    batch, rows = 2, 3
    count = count_flops(hand_made_graph(), {"x": (batch, rows, 4), "a": (5, 6), "image": (batch, 4, 8, 8)})
    matmul = 2 * batch * rows * 5 * 4
    gemm = 2 * 6 * 7 * 5
    conv = 2 * (batch * 6 * 8 * 8) * (2 * 3 * 3)  # C_in / group = 2
    qdq = 2 * batch * rows * 5 * 4
    ranged = 2 * rows * 5 * 4
    assert count.total == matmul + gemm + conv + qdq + ranged
    assert count.integer == qdq
    assert count.products == 5


def vit_flops(batch: int, image_size: int, hidden: int, layers: int, mlp: int, patch: int) -> int:
    """Matrix-product FLOPs of a ViT: patch embedding, then per layer qkv, QK^T, AV, projection, MLP."""
    patches = (image_size // patch) ** 2
    tokens = patches + 1
    heads, head_dim = hidden // 64, 64
    embedding = 2 * batch * patches * hidden * 3 * patch * patch
    per_layer = (2 * batch * tokens * hidden * 3 * hidden
                 + 2 * 2 * batch * heads * tokens * tokens * head_dim
                 + 2 * batch * tokens * hidden * hidden
                 + 2 * 2 * batch * tokens * hidden * mlp)
    return embedding + layers * per_layer


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("benchmark")
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--threads", "1", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), out


def test_quick_run_measures_the_machine_and_the_conversion(quick_run):
    results, _ = quick_run
    assert results["mode"] == "quick"
    machine = results["machine"]
    assert machine["threads"] == 1 and machine["cpu"] and "onnxruntime" in machine["libraries"]
    assert set(machine["isa_flags"]) >= {"avx512f", "avx512_vnni", "amx_int8"}
    peak = results["peak"]["peak"]
    assert peak["fp32"]["gflops"] > 0 and peak["int8"]["gflops"] > 0

    conversion = results["conversion"]
    assert conversion["exit_code"] == 0
    assert conversion["seconds"] > 0 and conversion["peak_rss_mb"] > 100  # a Python with torch loaded
    assert conversion["validation"] == dict.fromkeys(MODULES, "passed")

    for variant in results["variants"].values():
        for reports in variant["passes"].values():
            assert reports and all(isinstance(r["kept"], bool) and r["reason"] for r in reports)


def test_quick_run_times_every_module_against_pytorch(quick_run):
    results, _ = quick_run
    tiny = PRESETS["tiny"]
    native = results["model"]["image_size"]
    assert native == tiny.image_size and results["model"]["other_image_size"] is None  # quick: one size
    rows = {(row["module"], row["image_size"], row["batch"]): row for row in results["modules"]}
    assert set(rows) == {(module, native, batch) for module in MODULES for batch in (1, 8)}
    for (module, size, batch), row in rows.items():
        for name in ("pytorch", "fp32", "fp32-fused", "int8-dynamic", "int8-fused", "int8-static"):
            entry = row["results"][name]
            assert 0 < entry["p50_ms"] <= entry["p90_ms"], (module, name)
            assert entry["gflops_per_s"] > 0 and entry["flops"]["total"] > 0
        for name in ("int8-dynamic", "int8-fused", "int8-static"):
            entry = row["results"][name]
            assert isinstance(entry["pass_kept"], bool)
            assert entry["flops"]["total"] == row["results"]["fp32"]["flops"]["total"]  # the same products
            if entry["pass_kept"]:
                assert entry["flops"]["integer"] > 0
        fp16 = row["results"]["fp16"]
        assert "p50_ms" in fp16 or fp16["not_run"].startswith("not run on this backend")
        if module == "vision_encoder":
            assert row["results"]["fp32"]["flops"]["total"] == vit_flops(
                batch, size, tiny.vision_hidden, tiny.vision_layers, tiny.vision_mlp, tiny.patch_size)
    profiled = rows[("vision_encoder", native, 8)]["profile"]["fp32"]
    assert 0 < profiled["product_ms"] <= profiled["kernel_ms"]


def test_quick_run_captions_end_to_end_with_equal_work(quick_run):
    results, _ = quick_run
    decodings = {row["decoding"]: row for row in results["captioning"]}
    assert set(decodings) == {"greedy", "beam 3"}
    for row in decodings.values():
        assert set(row["results"]) == {"pytorch-generate", "runtime-fp32", "runtime-fp32-fused",
                                       "runtime-int8-dynamic", "runtime-int8-fused", "runtime-int8-static"}
        for entry in row["results"].values():
            assert entry["tokens"] == 20 and entry["p50_ms"] > 0
    assert decodings["greedy"]["results"]["runtime-fp32"]["tokens_equal_to_pytorch"] == "20/20"
    encoding = results["captioning_vision"]
    assert set(encoding) == {"pytorch", "runtime-fp32", "runtime-fp32-fused", "runtime-int8-dynamic",
                             "runtime-int8-fused", "runtime-int8-static"}
    greedy = decodings["greedy"]["results"]
    for name, entry in encoding.items():
        caption = greedy["pytorch-generate" if name == "pytorch" else name]
        assert 0 < entry["p50_ms"] < caption["p50_ms"]  # a caption includes encoding the image


def test_quick_run_writes_sizes_targets_table_and_chart(quick_run):
    results, out = quick_run
    sizes = {(row["module"], row["image_size"]): row for row in results["sizes"]}
    assert set(sizes) == {(module, results["model"]["image_size"]) for module in MODULES}
    for row in sizes.values():
        assert row["pytorch_bytes"] > 0
        if row["int8-dynamic"]["pass_kept"]:
            assert row["int8-dynamic"]["bytes"] < row["fp32"]["bytes"]
    assert len(results["targets"]) == 4
    for target in results["targets"]:
        assert isinstance(target["met"], bool)
        assert target["met"] or target["short_by"]
    table = (out / "results.md").read_text()
    for heading in ("### Targets", "### Per module", "### End-to-end captioning", "### Model sizes",
                    "### Full conversion"):
        assert heading in table
    with Image.open(out / "results.png") as chart:
        assert chart.size[0] > 500 and chart.size[1] > 300
