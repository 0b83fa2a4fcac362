"""What the CLI shows a person: progress while stages run, a summary table when a run ends."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from converter_core.specs import ConversionResult, ModuleRecord, PassReport

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True, log_path=False)


@dataclass
class Verbosity:
    verbose: bool = False
    quiet: bool = False
    debug: bool = False


verbosity = Verbosity()


@contextlib.contextmanager
def stage_progress() -> Iterator[Callable[[str], None]]:
    """Yield a callback that shows the current stage beside a spinner, with the time spent so far."""
    start = time.perf_counter()
    if verbosity.quiet:
        yield lambda stage: None
        return
    with stderr.status("starting") as status:

        def on_stage(stage: str) -> None:
            elapsed = time.perf_counter() - start
            status.update(f"[{elapsed:5.1f}s] {stage}")
            if verbosity.verbose:
                stderr.log(stage)

        yield on_stage


def _status_cell(status: str) -> str:
    colour = {"passed": "green", "failed": "red", "skipped": "yellow"}.get(status, "white")
    return f"[{colour}]{status}[/{colour}]"


def _pass_cell(report: PassReport) -> str:
    metrics = report.after.metrics if report.after is not None else {}
    if not report.changes_numbers or not metrics:
        return report.pass_name
    return f"{report.pass_name} ({', '.join(f'{key} {value:.4g}' for key, value in metrics.items())})"


def _megabytes(out_dir: Path, record: ModuleRecord) -> str:
    files = [record.file, *record.data_files]
    return f"{sum((out_dir / name).stat().st_size for name in files) / 1e6:.1f}"


def print_summary(result: ConversionResult) -> None:
    if verbosity.quiet:
        return
    table = Table(title=f"{result.plan.model_type} -> {result.output_dir}")
    table.add_column("module", no_wrap=True)
    # The diff and the validation are of the final graph; where a kept pass changed the numbers on
    # purpose, the gates decided, and their metrics stand beside the pass's name.
    for column in ("MB", "max abs diff", "atol", "validation", "passes (gate metrics)"):
        table.add_column(column)
    for name, record in result.modules.items():
        worst = record.validation.max_abs_diff if record.validation.outputs else None
        size = _megabytes(result.output_dir, record)
        kept = [_pass_cell(r) for r in record.passes if r.kept]
        table.add_row(
            name, size, "-" if worst is None else f"{worst:.2e}",
            f"{record.validation.atol:g}", _status_cell(record.validation.status), ", ".join(kept) or "-",
        )
    stdout.print(table)
    for name, reason in result.plan.not_exported.items():
        stdout.print(f"not exported: {name}: {escape(reason)}")
    for name, record in result.backends.items():
        stdout.print(f"backend {name}: {_status_cell(record.validation.status)} - {escape(record.validation.reason)}")
    if verbosity.verbose:
        for name, record in result.modules.items():
            for check in record.validation.outputs.values():
                stdout.print(f"  {name}.{check.name}: max abs {check.max_abs_diff:.3g}, max rel {check.max_rel_diff:.3g}")


def finish(result: ConversionResult) -> None:
    """Print the summary and the failures, then leave with 0 (all passed) or 1 (a check failed)."""
    print_summary(result)
    for failure in result.failures:
        stderr.print(f"[red]check failed:[/red] {escape(str(failure))}", highlight=False)
    raise typer.Exit(result.exit_code)
