"""The shape every pass here shares: rewrite, measure, judge by the module's gates, report.

A pass subclasses `GatedPass` and says how to rewrite a graph (leaving named nodes alone) and which
nodes it may leave alone. `apply` measures the input graph, rewrites it, judges the result; when
the gates fail it searches for the nodes to leave unrewritten (`plugins.quant.search`), and if
that fails too the report says `kept=False` with the reason, so the pipeline keeps the input graph.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import onnx

from converter_core.errors import raise_if_environment
from converter_core.extension import GraphPass
from converter_core.specs import GraphSnapshot, ModuleReferences, PassReport
from plugins.quant.measure import Accuracy, LatencyConfig, accuracy, paired_latency_ms, quiet, snapshot
from plugins.quant.search import SearchConfig, exclusion_units, rank_nodes, search_exclusions


@dataclass(frozen=True)
class GainConfig:
    """When a rewrite that keeps the numbers (fusion, onnxsim) measurably helps, or hurts."""

    min_latency_gain: float = 0.05  # >= 5% faster counts as a gain; smaller changes are noise
    max_latency_loss: float = 0.10  # > 10% slower is a loss
    max_weight_growth: float = 0.01  # > 1% more weight bytes is a loss (duplicated tied weights)


def measured_gain(before: GraphSnapshot, after: GraphSnapshot, config: GainConfig) -> tuple[list[str], list[str]]:
    """What got better and what got worse, each as readable facts."""
    gains, losses = [], []
    if after.nodes < before.nodes:
        gains.append(f"nodes {before.nodes} -> {after.nodes}")
    weights = after.weight_bytes / max(before.weight_bytes, 1) - 1
    if weights < -config.max_weight_growth:
        gains.append(f"weights {weights:+.1%}")
    elif weights > config.max_weight_growth:
        losses.append(f"weights {weights:+.1%} ({before.weight_bytes} -> {after.weight_bytes} bytes)")
    if before.latency_ms and after.latency_ms:
        change = after.latency_ms / before.latency_ms - 1
        if change <= -config.min_latency_gain:
            gains.append(f"latency {change:+.1%}")
        elif change > config.max_latency_loss:
            losses.append(f"latency {change:+.1%} ({before.latency_ms:.3g} -> {after.latency_ms:.3g} ms)")
    return gains, losses


class GatedPass(GraphPass):
    """A rewrite kept only when the module's gates hold (see the module docstring)."""

    # Rewrites that claim to keep the numbers must also stay within the validation tolerance.
    keeps_numbers: ClassVar[bool] = False
    # QDQ graphs quantise a tensor once for all its readers: the search leaves such readers float together.
    shares_quantized_tensors: ClassVar[bool] = False
    latency: LatencyConfig = LatencyConfig()
    search: SearchConfig = SearchConfig(enabled=False)

    @abstractmethod
    def rewrite(self, source: Path, target: Path, references: ModuleReferences, exclude: Sequence[str]) -> dict[str, Any]:
        """Write the rewritten `source` to `target`, leaving the nodes named in `exclude` as they are;
        return what the report should say about the rewrite."""

    def candidates(self, model: onnx.ModelProto) -> list[str]:
        """Names of the nodes the search may leave unrewritten."""
        return []

    def config_json(self) -> dict[str, Any]:
        config = getattr(self, "config", None)
        return asdict(config) if config is not None else {}

    def judge(self, before: GraphSnapshot, after: GraphSnapshot, result: Accuracy,
              details: dict[str, Any]) -> tuple[bool, str]:
        if not result.passed:
            return False, f"gate failed: {'; '.join(result.failures)}"
        excluded = details.get("excluded")
        kept_float = f"; {len(excluded)} sensitive node(s) left unrewritten" if excluded else ""
        return True, f"gates hold: {result.summary()}{kept_float}"

    def apply(self, source: Path, target: Path, references: ModuleReferences) -> PassReport:
        module = references.spec.name
        source_accuracy = accuracy(source, references, self.keeps_numbers)
        details: dict[str, Any] = {"config": self.config_json()}

        def attempt(exclude: Sequence[str]) -> Accuracy:
            with quiet():
                details.update(self.rewrite(source, target, references, exclude))
            return accuracy(target, references, self.keeps_numbers)

        try:
            result = attempt(())
        except Exception as exc:  # the tools refuse some graphs; the module then stays as it was
            raise_if_environment(exc)
            reason = f"the rewrite failed: {type(exc).__name__}: {str(exc).strip()[:500]}; the input graph is kept"
            (latency,) = paired_latency_ms([source], references.spec.example.inputs, self.latency)
            before = snapshot(source, latency, self.latency.threads, source_accuracy)
            return PassReport(self.name, module, False, reason, before, None, details, not self.keeps_numbers)

        if not result.passed and self.search.enabled:
            try:
                result = self._search(source, target, references, attempt, result, details)
            except Exception as exc:  # a rewrite the search tried was refused: the full rewrite's verdict stands
                raise_if_environment(exc)
                details["search"] = {"result": f"the search failed: {type(exc).__name__}: {str(exc).strip()[:500]}"}
                result.failures.append(details["search"]["result"])
        latencies = paired_latency_ms([source, target], references.spec.example.inputs, self.latency)
        before = snapshot(source, latencies[0], self.latency.threads, source_accuracy)
        after = snapshot(target, latencies[1], self.latency.threads, result)
        kept, reason = self.judge(before, after, result, details)
        if not kept:
            reason += "; the input graph is kept"
        return PassReport(self.name, module, kept, reason, before, after, details, not self.keeps_numbers)


    def _search(self, source: Path, target: Path, references: ModuleReferences,
                attempt: Callable[[Sequence[str]], Accuracy], failed: Accuracy, details: dict[str, Any]) -> Accuracy:
        """Leave the most sensitive nodes unrewritten until the gates hold; record what and why."""
        model = onnx.load(str(source), load_external_data=False)
        candidates = self.candidates(model)
        if not candidates:
            return failed
        ranked = rank_nodes(source, target, references, candidates)
        units = exclusion_units(ranked, model, self.shares_quantized_tensors)
        found = search_exclusions(units, attempt, failed, self.search)
        details["search"] = found.to_json()
        if not found.passed:
            found.accuracy.failures.append(f"search: {found.stopped}")
            return found.accuracy
        rank = {s.node: place for place, s in enumerate(ranked, start=1)}
        details["excluded"] = [
            {**asdict(s), "why": f"adds {s.added_error:.3g} relative error (output error {s.output_error:.3g}), "
                                 f"rank {rank[s.node]} of {len(ranked)} by sensitivity"}
            for s in found.excluded
        ]
        return found.accuracy


class NumbersKeepingPass(GatedPass):
    """A rewrite meant to leave the numbers alone (fusion, onnxsim): kept only where it measurably helps."""

    keeps_numbers = True
    gain: GainConfig = GainConfig()

    def judge(self, before: GraphSnapshot, after: GraphSnapshot, result: Accuracy,
              details: dict[str, Any]) -> tuple[bool, str]:
        if not result.passed:
            return False, f"changed the numbers: {'; '.join(result.failures)}"
        gains, losses = measured_gain(before, after, self.gain)
        details["gains"], details["losses"] = gains, losses
        if losses:
            return False, f"made the graph worse: {', '.join(losses)}"
        if not gains:
            return False, (f"no measurable gain: nodes {before.nodes} -> {after.nodes}, weights "
                           f"{before.weight_bytes} -> {after.weight_bytes} bytes, latency "
                           f"{before.latency_ms or 0:.3g} -> {after.latency_ms or 0:.3g} ms")
        return True, f"helps: {', '.join(gains)}"
