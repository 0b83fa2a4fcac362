"""Where a graph's time goes: ONNX Runtime's own per-node profile, summed by op type.

It answers why a module reaches the fraction of peak it does: the share of time in matrix products
(whose FLOPs the fraction counts) against everything else (LayerNorm, Softmax, GELU, quantising
activations, copies), and the rate of the products alone. The profiled session is separate from the
timed ones (profiling adds a little overhead of its own); the first run is left out as warm-up.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from benchmarks.flops import CONV_OPS, GEMM_OPS, MATMUL_OPS

# Products as ONNX Runtime runs them after its own fusions. The fused attention ops count as products:
# their QKV projection and QK^T / AV products are nearly all of their work.
PRODUCT_OPS = {*MATMUL_OPS, *GEMM_OPS, *CONV_OPS, "FusedGemm", "FusedConv", "NhwcConv", "QLinearConv",
               "Attention", "MultiHeadAttention", "QAttention"}


def op_time(graph: Path, feeds: dict[str, np.ndarray], threads: int, runs: int = 3) -> dict[str, Any]:
    """Per op type the kernel time of one run (ms, mean of `runs`), and the products' share of it."""
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as folder:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "profile")
        session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                     if e.get("cat") == "Session" and e.get("name") == "model_run")[1:]  # first: warm-up
    by_op: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        if any(start <= event["ts"] <= end for start, end in windows):
            by_op[event["args"]["op_name"]] += event["dur"] / 1000 / len(windows)
    total = sum(by_op.values())
    products = sum(ms for op, ms in by_op.items() if op in PRODUCT_OPS)
    return {
        "runs": len(windows),
        "run_ms": sum(end - start for start, end in windows) / 1000 / len(windows),
        "kernel_ms": total,
        "product_ms": products,
        "product_share": products / total if total else None,
        "by_op_ms": dict(sorted(((op, round(ms, 3)) for op, ms in by_op.items()), key=lambda item: -item[1])),
    }
