"""How much of a fixed-shape graph NNAPI (Android) and CoreML (Apple) would take, and what follows.

The numbers come from onnxruntime's own usability checker (`onnxruntime.tools.mobile_helpers.
usability_checker`, the code behind `python -m onnxruntime.tools.check_onnx_model_mobile_usability`),
called through its Python API: each EP's supported-operator table, the partitioning ORT would do, and
its verdict (YES / MAYBE / NO). Like that tool, we first apply ORT's basic optimisations, which the
ORT-format conversion applies too. The checker looks at operator types, ranks and fixed shapes only;
the per-operator caveats it lists are conditions nobody has checked.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import onnx

EPS = {
    "NNAPI": ("nnapi", None),
    "CoreML MLProgram": ("coreml", "coreml_supported_mlprogram_ops.md"),
    "CoreML NeuralNetwork": ("coreml", "coreml_supported_neuralnetwork_ops.md"),
}
LISTED = 10  # node names listed per blocking operator


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"<unnamed {node.op_type} #{index}>"


def _recommendation(ep: str, verdict: str, pct: float, partitions: int, blockers: list[str]) -> str:
    stopped = f" (stopped by {', '.join(blockers)})" if blockers else ""
    if partitions == 0:
        return f"{ep} takes no node{stopped}: use the CPU EP"
    where = "1 partition" if partitions == 1 else f"{partitions} partitions"
    if verdict == "YES":
        return f"{ep} takes {pct:.0f}% of nodes in {where}: worth trying"
    if verdict == "MAYBE":
        return f"{ep} takes {pct:.0f}% of nodes in {where}{stopped}: worth trying, measure against the CPU EP"
    return f"{ep} takes {pct:.0f}% of nodes in {where}{stopped}: use the CPU EP"


def _ep_report(ep: str, info: Any, nodes: list[onnx.NodeProto]) -> dict[str, Any]:
    # Nodes are told apart by their outputs, which are unique in a graph.
    taken = {tuple(node.output) for group in info.supported_groups for node in group}
    left_out: dict[str, list[str]] = {}
    for index, node in enumerate(nodes):
        if tuple(node.output) not in taken:
            left_out.setdefault(node.op_type, []).append(_node_label(node, index))
    verdict = info.suitability().name if info.num_nodes else "NO"
    pct = 100.0 * info.num_supported_nodes / info.num_nodes if info.num_nodes else 0.0
    blockers = sorted(op.split(":", 1)[-1] for op in info.unsupported_ops)
    return {
        "nodes": info.num_nodes,
        "nodes_taken": info.num_supported_nodes,
        "percent_taken": round(pct, 1),
        "partitions": info.num_partitions,
        "partition_sizes": [len(group) for group in info.supported_groups],
        "unsupported_ops": sorted(info.unsupported_ops),
        "nodes_left_on_cpu": {op: names[:LISTED] + ([f"... {len(names) - LISTED} more"] if len(names) > LISTED else [])
                              for op, names in sorted(left_out.items())},
        "unsupported_because": {
            "operator": info.nodes_unsupported_due_to_op,
            "dynamic_shape": info.nodes_unsupported_due_to_dynamic_input,
            "rank": info.num_unsupported_nodes_due_to_rank,
        },
        "unchecked_caveats": info.supported_ops_checker.get_caveats(),
        "verdict": verdict,
        "recommendation": _recommendation(ep, verdict, pct, info.num_partitions, blockers),
    }


def check_usability(fixed_model: Path) -> dict[str, Any]:
    """Per EP: nodes taken, partitions, the operators that stop it, and a recommendation."""
    from onnxruntime.tools.mobile_helpers import usability_checker
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model

    with tempfile.TemporaryDirectory() as scratch:
        optimized = Path(scratch) / fixed_model.name
        optimize_model(fixed_model, optimized)
        model = ModelProtoWithShapeInfo(optimized).model_with_shape_info
    nodes = list(model.graph.node)
    eps = {}
    for ep, (kind, table) in EPS.items():
        if kind == "nnapi":
            info = usability_checker.check_nnapi_partitions(model, require_fixed_input_sizes=True)
        else:
            info = usability_checker.check_coreml_partitions(model, True, table)
        eps[ep] = _ep_report(ep, info, nodes)
    rank = {"YES": 2, "MAYBE": 1, "NO": 0}
    best = max(eps, key=lambda ep: (rank[eps[ep]["verdict"]], eps[ep]["percent_taken"]))
    if rank[eps[best]["verdict"]] == 0:
        overall = "use the CPU EP: neither NNAPI nor CoreML takes enough of this graph in few partitions"
    else:
        overall = eps[best]["recommendation"]
    return {"execution_providers": eps, "recommendation": overall}


def usability_markdown(reports: dict[str, dict[str, Any]], fixed_shapes: dict[str, dict[str, list[int]]]) -> str:
    lines = [
        "# ORT Mobile usability",
        "",
        "What NNAPI and CoreML would take of each fixed-shape graph (onnxruntime's usability checker,",
        "after basic optimisations). Nodes an EP does not take run on the CPU EP; every extra partition",
        "costs a copy between devices. Caveats listed are conditions not checked.",
    ]
    for module, report in reports.items():
        shapes = ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in fixed_shapes[module].items())
        lines += ["", f"## {module} ({shapes})", ""]
        if "error" in report:
            lines.append(f"The usability check did not run: {report['error']}")
            continue
        lines += [
            "| EP | nodes taken | partitions (sizes) | stopped by | verdict |",
            "|---|---|---|---|---|",
        ]
        for ep, info in report["execution_providers"].items():
            stopped = ", ".join(f"{op} ({', '.join(names)})" for op, names in info["nodes_left_on_cpu"].items()) or "-"
            sizes = ", ".join(map(str, info["partition_sizes"])) or "-"
            lines.append(
                f"| {ep} | {info['nodes_taken']}/{info['nodes']} ({info['percent_taken']:g}%) | "
                f"{info['partitions']} ({sizes}) | {stopped} | {info['verdict']} |"
            )
        lines += ["", f"**Recommendation:** {report['recommendation']}."]
        for ep, info in report["execution_providers"].items():
            if info["unchecked_caveats"]:
                lines.append(f"- {ep} caveats: " + "; ".join(info["unchecked_caveats"]))
    return "\n".join(lines) + "\n"
