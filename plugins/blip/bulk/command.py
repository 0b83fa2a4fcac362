"""The `convert bulk` command: options, a progress bar with images/s and an ETA, a summary table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text


class ImagesPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        return Text("-- images/s" if task.speed is None else f"{task.speed:.1f} images/s")


class BulkProgress:
    """Images done out of all inputs (earlier runs' shards count as done), this run's images/s, ETA."""

    def __init__(self, console):
        self._progress = Progress(TextColumn("captioning"), BarColumn(), MofNCompleteColumn(), ImagesPerSecond(),
                                  TimeRemainingColumn(), console=console, transient=False)
        self._task = None

    def start(self, total: int, done: int) -> None:
        self._task = self._progress.add_task("bulk", total=total, completed=done)
        self._progress.start()

    def advance(self, count: int) -> None:
        self._progress.advance(self._task, count)

    def stop(self) -> None:
        self._progress.stop()


def print_summary(summary: dict, console) -> None:
    table = Table(title=f"convert bulk -> {summary['result']}", show_header=False)
    shards = summary["shards"]
    rate = summary["images_per_second"]
    for name, value in (
        ("inputs", summary["inputs"]),
        ("done", summary["done"]),
        ("failed (error rows)", summary["failed"]),
        ("shards written now / earlier / missing", f"{shards['written_now']} / {shards['earlier']} / {shards['missing']}"),
        ("images/s (this run)", "-" if rate is None else f"{rate:.2f}"),
        ("seconds", f"{summary['seconds']:.1f}"),
        ("mode", summary["options"]["mode"] + (f" ({summary['options']['ray']})" if summary["options"]["ray"] else "")),
        ("workers x threads", f"{summary['options']['workers']} x {summary['options']['threads']}"),
        ("model", summary["model"]["identity"][:16]),
    ):
        table.add_row(name, Text(str(value)))
    console.print(table)


def register_bulk_command(cli: typer.Typer) -> None:
    @cli.command("bulk")
    def bulk(
        output: Annotated[Path, typer.Argument(metavar="OUT", help="A `convert blip` output directory.",
                                               show_default=False)],
        inputs: Annotated[list[Path], typer.Argument(
            metavar="INPUT", show_default=False,
            help="A directory of images (recursive), a text file of paths, a Parquet file, or WebDataset .tar shards.")],
        result: Annotated[Path, typer.Option("--output", "-o", metavar="RESULT", show_default=False,
                                             help="Directory of Parquet shards and summary.json (resumed when rerun).")],
        task: Annotated[str, typer.Option(help="caption, embed (ITC image embedding) or both.")] = "both",
        beams: Annotated[int, typer.Option(help="Beam width; 1 is greedy.")] = 1,
        max_tokens: Annotated[int, typer.Option(help="Most tokens to write after the prompt.")] = 20,
        batch: Annotated[int, typer.Option(help="Images per batch.")] = 8,
        workers: Annotated[int, typer.Option(help="Worker processes (Ray: actors).")] = 1,
        threads: Annotated[int | None, typer.Option(
            help="onnxruntime threads per worker (default: usable cores / workers).", show_default=False)] = None,
        shard_size: Annotated[int, typer.Option(help="Images per output shard (the unit a rerun skips).")] = 1000,
        column: Annotated[str | None, typer.Option(
            help="Parquet INPUT: the column of paths or image bytes (default: path, image, jpg or png).",
            show_default=False)] = None,
        id_column: Annotated[str | None, typer.Option(
            help="Parquet INPUT: the column of ids (default: the path, else the row number).", show_default=False)] = None,
        tokenizer: Annotated[Path | None, typer.Option(
            help="Tokenizer directory, when OUT ships none.", show_default=False)] = None,
        ray: Annotated[str | None, typer.Option(
            "--ray", metavar="ADDRESS", show_default=False,
            help="Run as a Ray Data pipeline: 'local' starts a Ray cluster for the job; 'auto', HOST:PORT or "
                 "ray://HOST:PORT joins a running one.")] = None,
        overwrite: Annotated[bool, typer.Option(
            "--overwrite", help="Start again when RESULT holds another job (other options, model or INPUT).")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    ) -> None:
        """Caption and embed many images into Parquet shards, here or on a Ray cluster (no torch)."""
        from converter_core.console import stderr, stdout, verbosity
        from plugins.blip.bulk.run import BulkJob, run_bulk

        job = BulkJob(output, list(inputs), result, task, beams, max_tokens, batch, workers, threads, shard_size,
                      column, id_column, tokenizer, ray, overwrite)
        progress = None if verbosity.quiet or as_json else BulkProgress(stderr)
        outcome = run_bulk(job, progress)
        if as_json:
            stdout.print_json(json.dumps(outcome.summary))
        elif not verbosity.quiet:
            print_summary(outcome.summary, stdout)
        if "died" in outcome.summary:
            stderr.print(f"[red]error:[/red] {outcome.summary['died']}; run the same command again to finish",
                         highlight=False)
        raise typer.Exit(outcome.exit_code)
