"""One worker's part of `convert bulk`: items in, result rows out, one `BlipRuntime` per worker.

The local process pool and the Ray actors both run this, so the two modes give the same rows.
Every failure of an input (missing, unreadable, truncated, too many pixels) becomes that row's
`error`; a batch that fails is run again one image at a time, so one bad image costs only its row.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from plugins.blip.bulk.inputs import Item, ParquetCells, read_tar_member
from plugins.blip.bulk.result import model_identity

Task = Literal["caption", "embed", "both"]
TASKS = ("caption", "embed", "both")


@dataclass(frozen=True)
class WorkOptions:
    """What a worker needs to build its runtime and turn items into rows (plain data: it is pickled
    to worker processes and Ray actors)."""

    out_dir: str
    task: Task = "both"
    beams: int = 1
    max_tokens: int = 20
    batch: int = 8
    threads: int = 1
    tokenizer: str | None = None
    column: str | None = None  # the Parquet column of image bytes, for items with a row


def refuse_bombs() -> None:
    """Pillow only warns between its pixel limit and twice that, then decodes: in a bulk job an
    image of 90-180 M pixels is an error row, not 500 MB of memory per worker."""
    warnings.simplefilter("error", Image.DecompressionBombWarning)


class Worker:
    def __init__(self, options: WorkOptions):
        from plugins.blip.runtime import BlipRuntime

        refuse_bombs()
        self.options = options
        self.runtime = BlipRuntime(Path(options.out_dir), tokenizer_dir=options.tokenizer, threads=options.threads)
        self.model = model_identity(self.runtime.manifest)
        self.cells = ParquetCells(options.column)

    def process(self, items: Sequence[Item], on_progress: Callable[[int], None] = lambda count: None) -> list[dict[str, Any]]:
        """One row per item, in the items' order."""
        rows = []
        for start in range(0, len(items), self.options.batch):
            chunk = items[start:start + self.options.batch]
            rows.extend(self._batch(chunk))
            on_progress(len(chunk))
        return rows

    def _batch(self, items: Sequence[Item]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = [self._row(item.id) for item in items]
        loaded: list[tuple[int, Image.Image]] = []
        for position, item in enumerate(items):
            try:
                loaded.append((position, self._load(item)))
            except Exception as exc:  # any failure to read an input is that input's error row
                rows[position]["error"] = _reason(exc)
        if loaded:
            try:
                self._infer([rows[p] for p, _ in loaded], [image for _, image in loaded])
            except Exception:  # find the image that broke the batch, keep the others
                for position, image in loaded:
                    try:
                        self._infer([rows[position]], [image])
                    except Exception as exc:
                        rows[position] = {**self._row(items[position].id), "error": _reason(exc)}
        return rows

    def _row(self, item_id: str) -> dict[str, Any]:
        return {"id": item_id, "caption": None, "token_ids": None, "score": None, "embedding": None,
                "model": self.model, "error": None}

    def _load(self, item: Item) -> Image.Image:
        from converter_core.errors import InputError
        from plugins.blip.runtime import decode_image, load_image

        if item.error:
            raise InputError(item.error)
        if item.row >= 0:
            data = self.cells.get(item.file, item.row)
            if data is None:
                raise InputError(f"{item.file}: row {item.row} has no image bytes in column {self.options.column!r}")
            return decode_image(data, f"{item.file} row {item.row} ({item.id})")
        if item.size >= 0:
            return decode_image(read_tar_member(item), f"{item.file}: {item.id}")
        return load_image(item.file)

    def _infer(self, rows: list[dict[str, Any]], images: list[Image.Image]) -> None:
        from plugins.blip.graphs import VISION_ENCODER

        runtime, options = self.runtime, self.options
        embeds = None
        if options.task in ("caption", "both"):
            embeds = runtime.image_embeds(images)
            captions = runtime.caption_embeds(embeds, beams=options.beams, max_tokens=options.max_tokens)
        else:
            captions = []
        features = None
        if options.task in ("embed", "both"):
            shared = embeds if runtime.retrieval_vision == VISION_ENCODER else None  # one vision pass for both
            features = runtime.embedding(images, shared)
        for index, row in enumerate(rows):
            if captions:
                caption = captions[index]
                row.update(caption=caption.text, token_ids=caption.token_ids, score=caption.score)
            if features is not None:
                row["embedding"] = features[index].tolist()


def _reason(exc: BaseException) -> str:
    from converter_core.errors import ConverterError

    return str(exc) if isinstance(exc, ConverterError) else f"{type(exc).__name__}: {exc}"
