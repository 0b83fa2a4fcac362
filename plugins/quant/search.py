"""Which nodes to leave as they were when a rewritten (quantised, fp16) graph fails its gates.

Sensitivity: run the input graph and the fully rewritten graph on the reference cases with every
candidate node's input and output tensors exposed (the rewriters keep tensor names), and measure the
relative L2 error of each tensor. The error a node *adds* is its output's error minus the worst
error among its inputs: accumulated error from earlier nodes does not count against it. That takes
two runs per case whatever the node count, where quantising each node alone would take one rewrite
per node.

Search: leave the 1, 2, 4, 8, ... most sensitive nodes (or units of nodes that share a quantised
tensor, see `exclusion_units`) unrewritten, rewriting and judging the graph by its gates each time;
once a count passes, bisect down to the smallest passing count. Beyond the budget (a share of the
candidate nodes, or a time limit) the pass gives up and the module stays as it was.
"""

from __future__ import annotations

import ast
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from converter_core.specs import ModuleReferences
from plugins.quant.measure import Accuracy, session


@dataclass(frozen=True)
class SearchConfig:
    enabled: bool = True
    # Beyond this share of the candidate nodes kept unrewritten, most of the gain is gone: give up.
    max_excluded_fraction: float = 0.25
    max_seconds: float = 900.0


@dataclass
class Sensitivity:
    """The error one node adds when the whole graph is rewritten, and where it comes from in PyTorch."""

    node: str
    op_type: str
    scope: str  # the PyTorch module that produced the node, from the exporter's metadata ("" if unknown)
    added_error: float  # relative error of its output minus the worst relative error of its inputs
    output_error: float


@dataclass
class SearchResult:
    passed: bool
    excluded: list[Sensitivity]
    accuracy: Accuracy
    stopped: str  # why the search ended
    steps: list[dict[str, Any]] = field(default_factory=list)
    ranked: list[Sensitivity] = field(default_factory=list)

    def to_json(self, top: int = 10) -> dict[str, Any]:
        return {
            "ranked_by": "relative error each node adds (its output's minus its worst input's) with the whole graph "
                         "rewritten, over the reference cases",
            "candidates": len(self.ranked),
            "most_sensitive": [asdict(s) for s in self.ranked[:top]],
            "steps": self.steps,
            "result": self.stopped,
        }


def node_scope(node: onnx.NodeProto) -> str:
    """The PyTorch module path torch.onnx.export (dynamo) recorded for `node`, e.g. `...layers.1.mlp.fc2`."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return ""
            return scopes[-2] if len(scopes) >= 2 else ""
    return ""


def _relative_errors(source: Path, rewritten: Path, references: ModuleReferences, names: set[str]) -> dict[str, float]:
    """Relative L2 error per float tensor in `names`, accumulated over the reference cases."""
    sessions = []
    for path in (source, rewritten):
        model = onnx.load(str(path))
        produced = {out for node in model.graph.node for out in node.output}
        present = sorted((names & produced) - {o.name for o in model.graph.output})
        model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in present)
        sessions.append((session(model.SerializeToString()), set(present) | {o.name for o in model.graph.output}))
    wanted = sorted(names & sessions[0][1] & sessions[1][1])
    squared_diff = dict.fromkeys(wanted, 0.0)
    squared_norm = dict.fromkeys(wanted, 0.0)
    for reference in references.cases:
        expected, actual = (dict(zip(wanted, s.run(wanted, reference.case.inputs))) for s, _ in sessions)
        for name in wanted:
            a, b = expected[name], actual[name]
            if a.dtype.kind != "f" or a.shape != b.shape:
                squared_diff.pop(name, None)
                continue
            if name in squared_diff:
                a64 = a.astype(np.float64)
                squared_diff[name] += float(np.sum((b.astype(np.float64) - a64) ** 2))
                squared_norm[name] += float(np.sum(a64**2))
    # An overflow (inf or NaN in the rewritten graph) is the largest error there is.
    return {name: float(np.nan_to_num(np.sqrt(d / max(squared_norm[name], 1e-30)), nan=np.inf))
            for name, d in squared_diff.items()}


def rank_nodes(source: Path, rewritten: Path, references: ModuleReferences, candidates: Sequence[str]) -> list[Sensitivity]:
    """Candidate nodes, most sensitive first (see the module docstring)."""
    model = onnx.load(str(source), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    nodes = [node for node in model.graph.node if node.name in set(candidates)]
    names = {t for node in nodes for t in (*node.input, *node.output) if t and t not in initializers}
    errors = _relative_errors(source, rewritten, references, names)
    ranked = []
    for node in nodes:
        output_error = max((errors.get(t, 0.0) for t in node.output), default=0.0)
        input_error = max((errors.get(t, 0.0) for t in node.input if t in errors), default=0.0)
        # Past an overflow every later node's error is inf: only the node where it starts adds any.
        added = 0.0 if output_error == input_error == np.inf else output_error - input_error
        ranked.append(Sensitivity(node.name, node.op_type, node_scope(node), added, output_error))
    ranked.sort(key=lambda s: s.added_error, reverse=True)
    return ranked


def exclusion_units(ranked: list[Sensitivity], model: onnx.ModelProto, shared_tensors: bool) -> list[list[Sensitivity]]:
    """What the search leaves unrewritten together, most sensitive unit first.

    Each node alone, unless `shared_tensors`: in a QDQ graph a tensor is quantised once and every
    reader gets the quantised copy, so leaving one reader float does not remove that tensor's
    error (q, k and v projections reading one LayerNorm output); candidates that read the same
    tensor (not a weight) are then left float together. A producer and its reader are not joined:
    where both matter, both rank high.
    """
    if not shared_tensors:
        return [[s] for s in ranked]
    constants = {t.name for t in model.graph.initializer}
    parent = {s.node: s.node for s in ranked}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    touching: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.name in parent:
            for tensor in node.input:
                if tensor and tensor not in constants:
                    touching.setdefault(tensor, []).append(node.name)
    for names in touching.values():
        for other in names[1:]:
            parent[root(other)] = root(names[0])
    units: dict[str, list[Sensitivity]] = {}
    for s in ranked:  # `ranked` is sorted, so each unit lists its most sensitive node first
        units.setdefault(root(s.node), []).append(s)
    return sorted(units.values(), key=lambda unit: unit[0].added_error, reverse=True)


def search_exclusions(
    units: list[list[Sensitivity]],
    attempt: Callable[[list[str]], Accuracy],
    failed: Accuracy,
    config: SearchConfig,
) -> SearchResult:
    """Find the fewest most-sensitive units whose exclusion makes `attempt` pass.

    `attempt(excluded_node_names)` rewrites the graph without those nodes and judges it; `failed`
    is how the full rewrite did. On return the graph holds the rewrite for `excluded` when
    `passed`; otherwise whatever was tried last.
    """
    started = time.monotonic()
    ranked = sorted((s for unit in units for s in unit), key=lambda s: s.added_error, reverse=True)
    budget = int(config.max_excluded_fraction * len(ranked))
    sizes = np.cumsum([len(unit) for unit in units])
    limit = int(np.searchsorted(sizes, budget, side="right"))  # most units whose nodes fit the budget
    steps: list[dict[str, Any]] = []
    tried: dict[int, Accuracy] = {0: failed}

    def chosen(count: int) -> list[Sensitivity]:
        return [s for unit in units[:count] for s in unit]

    def trial(count: int) -> Accuracy:
        result = attempt([s.node for s in chosen(count)])
        tried[count] = result
        steps.append({"excluded": len(chosen(count)), "passed": result.passed, "metrics": result.metrics,
                      "seconds": round(time.monotonic() - started, 2)})
        return result

    def out_of_time() -> bool:
        return time.monotonic() - started > config.max_seconds

    if limit == 0:
        return SearchResult(False, [], failed, f"leaving even the most sensitive unit of {len(units[0]) if units else 0} "
                            f"node(s) unrewritten exceeds the budget ({config.max_excluded_fraction:.0%} of "
                            f"{len(ranked)} candidate nodes)", steps, ranked)
    failing, passing = 0, None
    count = 1
    while passing is None:
        if trial(count).passed:
            passing = count
            break
        failing = count
        if count == limit:
            return SearchResult(False, [], tried[failing], f"still failing with the {len(chosen(count))} most "
                                f"sensitive of {len(ranked)} candidate nodes left unrewritten (the budget is "
                                f"{config.max_excluded_fraction:.0%})", steps, ranked)
        if out_of_time():
            return SearchResult(False, [], tried[failing], f"gave up after {config.max_seconds:g} s with "
                                f"{len(chosen(count))} node(s) left unrewritten", steps, ranked)
        count = min(count * 2, limit)
    while passing - failing > 1 and not out_of_time():
        middle = (passing + failing) // 2
        if trial(middle).passed:
            passing = middle
        else:
            failing = middle
    if steps[-1]["excluded"] != len(chosen(passing)):
        attempt([s.node for s in chosen(passing)])  # leave the graph holding the chosen rewrite
    return SearchResult(True, chosen(passing), tried[passing], f"passes with the {len(chosen(passing))} most "
                        f"sensitive of {len(ranked)} candidate nodes left unrewritten", steps, ranked)
