"""`convert bulk --ray ADDRESS`: the same job as a Ray Data pipeline.

The listing becomes a dataset of items; `map_batches` runs `BlipActor`, an actor class holding one
`BlipRuntime` per actor (a pool of `workers` actors, `num_cpus` = threads per actor), which reads and
decodes each image where it runs; the driver streams the result rows back and writes each shard
through `ResultDir` as soon as its last row arrives. Ray's own `write_parquet` names files after
its tasks and writes them in place, so a killed job would leave files that neither hold a known
set of rows nor are known to be whole: resuming exactly-once needs the shard files of `result`.
Rows are small (a caption and one embedding), so the driver writing them is no bottleneck.

ADDRESS is what `ray.init` takes: `local` starts a Ray cluster on this machine for the job;
`auto`, `HOST:PORT` or `ray://HOST:PORT` joins a running one, whose nodes must have vlm-converter
installed and see OUT and the INPUT's files at the same paths.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields, replace
from typing import Any

from converter_core.errors import InputError
from plugins.blip.bulk.inputs import Item
from plugins.blip.bulk.result import ResultDir, schema
from plugins.blip.bulk.worker import Worker, WorkOptions

LOCAL = "local"
OBJECT_STORE_BYTES = 256 * 1024**2  # a local cluster's object store: rows and item lists are small
ITEM_FIELDS = [f.name for f in fields(Item)]


def require_ray():
    try:
        import ray
        import ray.data  # noqa: F401 - the Data library is its own extra of ray
    except ImportError as exc:
        raise InputError("--ray needs Ray Data: pip install 'vlm-converter[ray]'") from exc
    return ray


class BlipActor:
    """A Ray Data actor: one runtime, built once, turns batches of items into result rows."""

    def __init__(self, options: WorkOptions):
        self.worker = Worker(options)

    def __call__(self, batch) -> Any:
        import pyarrow as pa

        records = batch.to_pylist()
        items = [Item(**{name: record[name] for name in ITEM_FIELDS}) for record in records]
        items = [replace(item, error=item.error or None) for item in items]
        rows = self.worker.process(items)
        for row, record in zip(rows, records):
            row["shard"], row["position"] = record["shard"], record["position"]
        return pa.Table.from_pylist(rows, schema=_wire_schema())


def _wire_schema():
    import pyarrow as pa

    return schema().append(pa.field("shard", pa.int64())).append(pa.field("position", pa.int64()))


def run_ray(
    address: str,
    shards: Sequence[tuple[int, Sequence[Item]]],
    options: WorkOptions,
    workers: int,
    result: ResultDir,
    on_images: Callable[[int], None],
    on_shard: Callable[[int], None],
) -> str | None:
    """Process `shards` on the Ray cluster at `address`; None, or why some were not written."""
    ray = require_ray()
    needed = workers * options.threads
    # "local" always starts a cluster, where no address would join one that `ray start` left running.
    settings: dict[str, Any] = {"address": address, "include_dashboard": False, "logging_level": logging.ERROR,
                                "log_to_driver": False}
    if address == LOCAL:
        settings.update(num_cpus=needed, object_store_memory=OBJECT_STORE_BYTES)
    try:
        ray.init(**settings)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise InputError(f"--ray {address}: cannot reach a Ray cluster there ({str(exc).splitlines()[0]})") from exc
    try:
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if needed > cpus:
            raise InputError(f"--workers {workers} x --threads {options.threads} = {needed} CPUs, but the Ray cluster at "
                             f"{address} has {cpus}; ask for fewer")
        if shards:
            try:
                _pipeline(ray, shards, options, workers, result, on_images, on_shard)
            except ray.exceptions.RayError as exc:  # an actor or node died, or a task failed past its retries
                return f"the Ray job failed ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})"
        return None
    finally:
        ray.shutdown()


def _pipeline(ray, shards, options: WorkOptions, workers: int, result: ResultDir, on_images, on_shard) -> None:
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours shows images/s over the whole job
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    records = [{**asdict(item), "error": item.error or "", "shard": index, "position": position}
               for index, items in shards for position, item in enumerate(items)]
    rows = (ray.data.from_items(records)
            .map_batches(BlipActor, fn_constructor_args=(options,), batch_size=options.batch, batch_format="pyarrow",
                         compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=options.threads))
    expected = {index: len(items) for index, items in shards}
    arrived: dict[int, dict[int, dict[str, Any]]] = {index: {} for index in expected}
    for batch in rows.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in batch.to_pylist():
            arrived[row["shard"]][row["position"]] = row
        on_images(batch.num_rows)
        for index in [i for i, got in arrived.items() if len(got) == expected[i]]:
            result.write_shard(index, [arrived[index][p] for p in range(expected[index])])
            del arrived[index]
            on_shard(index)
