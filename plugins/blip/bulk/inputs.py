"""What `convert bulk` reads: the four kinds of INPUT, each listed as items with stable ids.

Listing reads no pixels: an item says where its image is (a file, a tar member's byte range, a
Parquet row), and the worker that captions it reads and decodes it, so that a bad image is that
item's error row and a million images never sit in one process's memory. The listing is the same
on every run over the same INPUT, which is what lets a rerun skip the shards it finished.

- a directory: every file below it with an image suffix, in sorted order; id = its path relative
  to the directory ('/' separators).
- a text file: one path per line (blank lines and '#' lines skipped; relative paths are relative
  to the text file); id = the line as written.
- a Parquet file: `column` holds paths (a string column, relative to the Parquet file) or image
  bytes (a binary column); id = `id_column`, else the path, else the row number.
- WebDataset `.tar` shards (img2dataset, LAION): a sample is the members sharing a key (the member
  name up to the first '.' of its base name, as `webdataset` splits it), its image the first member
  with an image extension; id = the key.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import tarfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from converter_core.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_COLUMNS = ("path", "image", "jpg", "png")  # tried in this order when --column is not given


@dataclass(frozen=True)
class Item:
    """One image to process. `file`: the image file, or the tar shard or Parquet file holding it.
    `offset`/`size`: the member's data in a tar shard (size -1: the sample has no image). `row`: the
    Parquet row whose `column` holds the image's bytes (-1 when `file` is the image itself)."""

    id: str
    file: str
    offset: int = -1
    size: int = -1
    row: int = -1
    error: str | None = None  # known from the listing alone (a tar sample without an image)


@dataclass(frozen=True)
class Listing:
    """The items of an INPUT, and what identifies the listing for a rerun (`kind`, `column`, `digest`)."""

    kind: str
    items: list[Item]
    column: str | None = None

    @property
    def digest(self) -> str:
        digest = hashlib.sha256()
        for item in self.items:
            digest.update(repr(tuple(asdict(item).values())).encode())
            digest.update(b"\n")
        return digest.hexdigest()


def list_inputs(inputs: Sequence[Path], column: str | None = None, id_column: str | None = None) -> Listing:
    """The items of INPUT (one directory, text file or Parquet file, or any number of `.tar` shards)."""
    paths = _expand(inputs)
    if not paths:
        raise InputError("no INPUT given")
    if all(p.suffix == ".tar" for p in paths):
        return _check_unique(Listing("webdataset", [item for shard in paths for item in _tar_items(shard)]))
    if len(paths) > 1:
        raise InputError(f"give one INPUT (a directory, a text file or a Parquet file), or any number of .tar shards; "
                         f"got {len(paths)}: {', '.join(map(str, paths[:3]))}")
    path = paths[0]
    for option, value in (("--column", column), ("--id-column", id_column)):
        if value is not None and path.suffix != ".parquet":
            raise InputError(f"{option} names a column of a Parquet INPUT; {path} is not a .parquet file")
    if path.is_dir():
        return _check_unique(Listing("directory", _directory_items(path)))
    if path.suffix == ".parquet":
        return _check_unique(_parquet_items(path, column, id_column))
    return _check_unique(Listing("text", _text_items(path)))


def _expand(inputs: Sequence[Path]) -> list[Path]:
    """INPUTs, a quoted glob ('shards/*.tar') expanded in sorted order; a missing INPUT is exit 2."""
    paths: list[Path] = []
    for given in inputs:
        if not given.exists() and glob.has_magic(str(given)):
            matched = sorted(glob.glob(str(given)))
            if not matched:
                raise InputError(f"{given}: matches no file")
            paths.extend(Path(m) for m in matched)
        elif not given.exists():
            raise InputError(f"{given}: no such file or directory")
        else:
            paths.append(given)
    return paths


def _check_unique(listing: Listing) -> Listing:
    seen: set[str] = set()
    for item in listing.items:
        if item.id in seen:
            raise InputError(f"the id {item.id!r} occurs twice in the {listing.kind} INPUT; every image needs its own id "
                             "(one result row each)")
        seen.add(item.id)
    return listing


def _directory_items(root: Path) -> list[Item]:
    files = (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
    return [Item(p.relative_to(root).as_posix(), str(p)) for p in sorted(files, key=lambda p: p.relative_to(root).as_posix())]


def _text_items(path: Path) -> list[Item]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not a UTF-8 text file of image paths (nor a directory, .parquet or .tar)") from exc
    except OSError as exc:
        raise InputError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    items = []
    for line in lines:
        entry = line.strip()
        if entry and not entry.startswith("#"):
            items.append(Item(entry, str(path.parent / entry)))
    return items


def _parquet_items(path: Path, column: str | None, id_column: str | None) -> Listing:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{path}: not a Parquet file pyarrow can read ({exc})") from exc
    names = list(schema.names)
    if column is None:
        column = next((name for name in DEFAULT_COLUMNS if name in names), None)
        if column is None:
            raise InputError(f"{path}: say which column holds the images (--column NAME); its columns: {', '.join(names)}")
    for wanted, option in ((column, "--column"), (id_column, "--id-column")):
        if wanted is not None and wanted not in names:
            raise InputError(f"{path}: has no column {wanted!r} ({option}); its columns: {', '.join(names)}")
    kind = schema.field(column).type
    holds_paths = pa.types.is_string(kind) or pa.types.is_large_string(kind)
    if not holds_paths and not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise InputError(f"{path}: column {column!r} is {kind}; it must hold paths (string) or image bytes (binary)")
    read = [c for c in dict.fromkeys([id_column] + ([column] if holds_paths else [])) if c is not None]
    table = pq.read_table(path, columns=read) if read else None
    rows = pq.read_metadata(path).num_rows
    ids = _column_text(table, id_column, path) if id_column else None
    if holds_paths:
        values = table.column(column).to_pylist()
        if None in values:
            raise InputError(f"{path}: column {column!r} has an empty path in row {values.index(None)}")
        items = [Item(ids[row] if ids else value, str(path.parent / value)) for row, value in enumerate(values)]
        return Listing("parquet-paths", items, column)
    items = [Item(ids[row] if ids else f"row-{row}", str(path), row=row) for row in range(rows)]
    return Listing("parquet-bytes", items, column)


def _column_text(table, name: str, path: Path) -> list[str]:
    values = table.column(name).to_pylist()
    if None in values:
        raise InputError(f"{path}: --id-column {name!r} is empty in row {values.index(None)}")
    return [str(value) for value in values]


def _tar_items(shard: Path) -> list[Item]:
    try:
        with tarfile.open(shard, "r:") as tar:  # uncompressed only: members are read by byte range
            members = [m for m in tar.getmembers() if m.isfile()]
    except (tarfile.TarError, OSError) as exc:
        raise InputError(f"{shard}: not an uncompressed tar file Python can read ({exc})") from exc
    samples: dict[str, Item] = {}
    for member in members:
        key, extension = _split_key(member.name)
        if key.startswith("__") or not extension:
            continue  # webdataset's own metadata members, or a file with no extension
        is_image = f".{extension.lower().split('.')[-1]}" in IMAGE_SUFFIXES
        if key not in samples or (samples[key].error and is_image):
            samples[key] = (Item(key, str(shard), member.offset_data, member.size) if is_image
                            else Item(key, str(shard), error=f"{shard}: sample {key} has no image member "
                                                              f"({', '.join(s[1:] for s in IMAGE_SUFFIXES)})"))
    return list(samples.values())


def _split_key(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension


class ParquetCells:
    """Image bytes by Parquet row, read a row group at a time; the last row group read is kept,
    since a worker's items come in listing order and a row group serves many batches."""

    def __init__(self, column: str | None):
        self.column = column
        self._starts: dict[str, list[int]] = {}
        self._kept: tuple[str, int, list[bytes | None]] | None = None

    def get(self, file: str, row: int) -> bytes | None:
        import pyarrow.parquet as pq

        if file not in self._starts:
            metadata, starts, first = pq.read_metadata(file), [], 0
            for group in range(metadata.num_row_groups):
                starts.append(first)
                first += metadata.row_group(group).num_rows
            self._starts[file] = starts
        starts = self._starts[file]
        group = bisect.bisect_right(starts, row) - 1
        if self._kept is None or self._kept[:2] != (file, group):
            values = pq.ParquetFile(file).read_row_group(group, columns=[self.column]).column(self.column).to_pylist()
            self._kept = (file, group, values)
        values = self._kept[2]
        return values[row - starts[group]] if 0 <= row - starts[group] < len(values) else None


def read_tar_member(item: Item) -> bytes:
    with open(item.file, "rb") as handle:
        handle.seek(item.offset)
        data = handle.read(item.size)
    if len(data) != item.size:
        raise InputError(f"{item.file}: member {item.id} is cut short ({len(data)} of {item.size} bytes)")
    return data
