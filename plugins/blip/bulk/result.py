"""RESULT: a directory of Parquet shards, one row per input, written so that a rerun is exactly-once.

The items are cut into shards of `shard_size` in listing order; shard k is `part-0000k.parquet`,
written whole to a hidden temporary name and renamed into place, so a shard file either holds all
its rows or does not exist. `_job.json`, written before the first shard, records what decides the
rows (the model's graphs, the options that change a row, the listing); a rerun with the same job
skips the shards that exist, and a different job is refused (exit 2) unless `--overwrite`.
How many workers, threads, images per batch or which engine (local or Ray) ran a shard are not
part of it: they do not change a row, so a job started locally can be finished on Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from converter_core.errors import EnvironmentFailure, InputError

FORMAT = "vlm-converter bulk 1"
JOB_NAME = "_job.json"  # "_" and "." names: pyarrow and Spark read RESULT as a dataset without them
SUMMARY_NAME = "_summary.json"
SHARD = re.compile(r"part-(\d{5,})\.parquet")
TEMPORARY = re.compile(r"\.(part-\d{5,}\.parquet|_job\.json|_summary\.json)\.\d+\.tmp")
COLUMNS = ("id", "caption", "token_ids", "score", "embedding", "model", "error")


def schema():
    """One row per input. `embedding`: the ITC image embedding (float32, unit length). `model`: the
    model identity (see `model_identity`). `error`: null, or why this input has no result."""
    import pyarrow as pa

    return pa.schema([
        pa.field("id", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("token_ids", pa.list_(pa.int32())),
        pa.field("score", pa.float64()),
        pa.field("embedding", pa.list_(pa.float32())),
        pa.field("model", pa.string(), nullable=False),
        pa.field("error", pa.string()),
    ])


def model_identity(manifest: dict[str, Any]) -> str:
    """sha256 over the sha256 of every graph (and its external data) the manifest lists: two
    outputs with the same graphs give the same rows, whatever their folder is called."""
    graphs = {name: [module["sha256"], *(data["sha256"] for data in module.get("data_files", []))]
              for name, module in sorted(manifest["modules"].items())}
    return hashlib.sha256(json.dumps(graphs, sort_keys=True).encode()).hexdigest()


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _write_atomically(path: Path, write) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        descriptor = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(descriptor)  # the rename must not reach the disk before the data does
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise EnvironmentFailure(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _write_json(path: Path, value: dict[str, Any]) -> None:
    _write_atomically(path, lambda temporary: temporary.write_text(json.dumps(value, indent=2, allow_nan=False) + "\n"))


class ResultDir:
    """RESULT, opened for a job: `pending` lists the shards still to write."""

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def open(cls, path: Path, job: dict[str, Any], overwrite: bool) -> ResultDir:
        """Create RESULT, or take up the same job in it; a different job is exit 2 unless `overwrite`
        (which removes our files only). A non-empty folder that is no RESULT is never written into."""
        job = {"format": FORMAT, **job}
        result = cls(path)
        if path.exists() and not path.is_dir():
            raise InputError(f"{path}: exists and is not a directory; give -o a new or a RESULT directory")
        entries = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        if entries and JOB_NAME not in entries:
            raise InputError(f"{path}: is not empty and holds no {JOB_NAME}: not a `convert bulk` result; "
                             "refusing to write into it (give -o a new directory)")
        if JOB_NAME in entries:
            try:
                earlier = json.loads((path / JOB_NAME).read_text())
            except (OSError, ValueError) as exc:
                raise InputError(f"{path / JOB_NAME}: unreadable ({exc}); remove RESULT or give another -o") from exc
            changed = _differences(earlier, job)
            if changed and not overwrite:
                raise InputError(f"{path}: holds the result of another job ({'; '.join(changed)}); run with the same "
                                 "model, INPUT and options to finish it, or give --overwrite to start it again")
            if changed:
                result.remove_ours()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EnvironmentFailure(f"cannot create {path}: {exc.strerror or exc}") from exc
        for leftover in path.iterdir():  # a killed run's half-written files: ours by name
            if TEMPORARY.fullmatch(leftover.name):
                leftover.unlink(missing_ok=True)
        if not (path / JOB_NAME).is_file():
            _write_json(path / JOB_NAME, job)
        return result

    def remove_ours(self) -> None:
        for entry in self.path.iterdir():
            if SHARD.fullmatch(entry.name) or TEMPORARY.fullmatch(entry.name) or entry.name in (JOB_NAME, SUMMARY_NAME):
                entry.unlink()

    def shard_path(self, index: int) -> Path:
        return self.path / shard_name(index)

    def finished(self, index: int, rows: int) -> bool:
        """Shard `index` exists with its `rows` rows (a rename makes it whole, so this is a cheap check)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self.shard_path(index)
        if not path.is_file():
            return False
        try:
            return pq.read_metadata(path).num_rows == rows
        except (OSError, pa.ArrowException):
            return False  # damaged after the fact: it is written again

    def write_shard(self, index: int, rows: list[dict[str, Any]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist([{name: row[name] for name in COLUMNS} for row in rows], schema=schema())
        _write_atomically(self.shard_path(index), lambda temporary: pq.write_table(table, temporary))

    def shards(self) -> list[Path]:
        return sorted(p for p in self.path.iterdir() if SHARD.fullmatch(p.name))

    def counts(self) -> tuple[int, int]:
        """(rows without an error, rows with one) over every shard in RESULT."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        done = failed = 0
        for shard in self.shards():
            errors = pq.read_table(shard, columns=["error"]).column("error")
            failed += int(pc.sum(pc.is_valid(errors).cast("int64")).as_py() or 0)
            done += len(errors)
        return done - failed, failed

    def write_summary(self, summary: dict[str, Any]) -> None:
        _write_json(self.path / SUMMARY_NAME, summary)


def _differences(earlier: dict[str, Any], job: dict[str, Any]) -> list[str]:
    """What differs between two jobs, as `field: before -> now`, model and listing by name only."""
    def flat(value: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
        if isinstance(value, dict):
            for key, inner in value.items():
                yield from flat(inner, f"{prefix}{key}.")
        else:
            yield prefix.rstrip("."), value

    before, now = dict(flat(earlier)), dict(flat(job))
    changed = []
    for key in sorted(set(before) | set(now)):
        if before.get(key) != now.get(key):
            if key.startswith("model") or key.endswith("sha256"):
                changed.append(f"{key} differs")
            else:
                changed.append(f"{key}: {before.get(key)!r} -> {now.get(key)!r}")
    return changed
