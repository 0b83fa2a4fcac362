"""The machine's own matrix-multiply peak, fp32 and INT8, measured with the benchmark's thread count.

Square products of growing size, each library's GEMM at the same thread count as the modules:

- fp32: PyTorch `torch.mm` (oneDNN / MKL) and ONNX Runtime's `MatMul` (MLAS);
- INT8: ONNX Runtime's `MatMulInteger` with uint8 activations and int8 weights (the MLAS kernel the
  INT8 graphs run: dynamic quantisation's `DynamicQuantizeMatMul` and static QDQ's `QLinearMatMul`
  both call it), and PyTorch's `torch._int_mm` (int8 x int8 -> int32) where this build has it.

A kernel's rate is 2 n^3 / p50 time at its best size; the peak of a precision is the best rate any
library reached, the same p50 statistic the modules are judged by. Which instructions a library used
is not observable from outside; the ISA flags say what was available (AVX-512 VNNI does 4x the int8
multiply-accumulates of fp32 FMAs per instruction, so an INT8/fp32 ratio well above 4 means AMX tiles).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from benchmarks.latency import Timing, TimingConfig, time_in_turns


def matmul_graph(op: str, n: int, a_type: int, b_type: int, out_type: int) -> bytes:
    inputs = [helper.make_tensor_value_info("a", a_type, [n, n]), helper.make_tensor_value_info("b", b_type, [n, n])]
    output = helper.make_tensor_value_info("y", out_type, [n, n])
    graph = helper.make_graph([helper.make_node(op, ["a", "b"], ["y"])], f"{op}_{n}", inputs, [output])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def ort_session(model: bytes | str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def kernels(n: int, threads: int, rng: np.random.Generator) -> dict[str, tuple[str, Callable[[], object]]]:
    """name -> (precision, one n x n x n product)."""
    a32, b32 = (torch.from_numpy(rng.standard_normal((n, n), dtype=np.float32)) for _ in range(2))
    a_u8 = rng.integers(0, 256, (n, n), dtype=np.uint8)
    b_s8 = rng.integers(-128, 128, (n, n), dtype=np.int8)
    float32, uint8, int8_, int32 = TensorProto.FLOAT, TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32
    fp32 = ort_session(matmul_graph("MatMul", n, float32, float32, float32), threads)
    int8 = ort_session(matmul_graph("MatMulInteger", n, uint8, int8_, int32), threads)
    feeds32 = {"a": a32.numpy(), "b": b32.numpy()}
    feeds8 = {"a": a_u8, "b": b_s8}
    found = {
        "torch.mm fp32": ("fp32", lambda: torch.mm(a32, b32)),
        "onnxruntime MatMul fp32": ("fp32", lambda: fp32.run(None, feeds32)),
        "onnxruntime MatMulInteger u8s8": ("int8", lambda: int8.run(None, feeds8)),
    }
    if hasattr(torch, "_int_mm"):
        a_s8, b_s8t = torch.from_numpy(a_u8.view(np.int8)), torch.from_numpy(b_s8)
        found["torch._int_mm s8s8"] = ("int8", lambda: torch._int_mm(a_s8, b_s8t))
    return found


def measure_peak(threads: int, sizes: tuple[int, ...], timing: TimingConfig) -> dict[str, Any]:
    """Per kernel and size the rate reached; per precision the peak and which kernel set it."""
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    for n in sizes:
        found = kernels(n, threads, rng)
        with torch.inference_mode():
            timings = time_in_turns({name: run for name, (_, run) in found.items()}, timing)
        for name, (precision, _) in found.items():
            result = timings[name]
            row: dict[str, Any] = {"kernel": name, "precision": precision, "n": n}
            if isinstance(result, Timing):
                row.update(result.to_json(), gflops=2 * n**3 / (result.p50_ms / 1000) / 1e9)
            else:
                row["error"] = result
            rows.append(row)
    peaks = {}
    for precision in ("fp32", "int8"):
        measured = [row for row in rows if row["precision"] == precision and "gflops" in row]
        if measured:
            best = max(measured, key=lambda row: row["gflops"])
            per_kernel = {row["kernel"]: max(r["gflops"] for r in measured if r["kernel"] == row["kernel"])
                          for row in measured}
            peaks[precision] = {"gflops": best["gflops"], "kernel": best["kernel"], "n": best["n"],
                                "per_kernel_gflops": per_kernel}
    ratio = peaks["int8"]["gflops"] / peaks["fp32"]["gflops"] if {"int8", "fp32"} <= peaks.keys() else None
    return {"threads": threads, "statistic": "2 n^3 / p50 time, best size", "measurements": rows,
            "peak": peaks, "int8_over_fp32": ratio}
