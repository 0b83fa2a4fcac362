"""ONNX graph files and the external-data files that hold their weights.

A graph over protobuf's 2 GB limit keeps its tensors in a file beside it (`model.onnx.data`), named
inside the graph by relative `location`. Moving, replacing or hashing a graph must take those files
along, and a reader must never follow a `location` out of the graph's folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from converter_core.errors import InputError

# Above this many bytes of weights a graph is written with external data: protobuf refuses 2 GiB,
# and the graph's own structure and metadata need room beside the weights.
EXTERNAL_DATA_ABOVE = 1_500_000_000


def _tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        tensors += [attribute.t for attribute in node.attribute if attribute.type == onnx.AttributeProto.TENSOR]
    return tensors


def data_locations(model: onnx.ModelProto) -> list[str]:
    """The external-data files a loaded (not data-loaded) graph refers to, in order of first use."""
    found: dict[str, None] = {}
    for tensor in _tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            found.setdefault(next(entry.value for entry in tensor.external_data if entry.key == "location"))
    return list(found)


def external_data_files(path: Path) -> tuple[str, ...]:
    """The external-data files of the graph at `path`, relative to its folder; each must lie inside it.
    A file that is no graph at all names none (loading it fails where it is validated)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends: not a graph
        return ()
    locations = tuple(data_locations(model))
    folder = path.parent.resolve()
    for location in locations:
        resolved = (folder / location).resolve()
        if Path(location).is_absolute() or not resolved.is_relative_to(folder) or resolved == folder:
            raise InputError(f"{path}: its external data {location!r} lies outside its folder")
    return locations


def save_graph(model: onnx.ModelProto, path: Path, external: bool) -> None:
    """Write `model` to `path`; with `external`, every tensor over 1 KiB goes to `path.name + ".data"`."""
    if external:
        data = path.with_name(path.name + ".data")
        if data.exists():
            data.unlink()
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data.name, size_threshold=1024)
    else:
        onnx.save(model, str(path))


def save_like(model: onnx.ModelProto, path: Path, like: Path) -> None:
    """Write `model` to `path` the way the graph at `like` is written: external data if it has any."""
    save_graph(model, path, external=bool(external_data_files(like)))


def move_graph(source: Path, target: Path) -> None:
    """Move a graph and its data files to `target` (replacing it and its data files), renaming the
    data file after the target so that two graphs in one folder never share one."""
    remove_graph(target)
    locations = external_data_files(source)
    if not locations:
        os.replace(source, target)
        return
    model = onnx.load(str(source), load_external_data=False)
    renamed = target.name + ".data"
    for tensor in _tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = renamed
    if len(locations) > 1:  # several data files: merge them by rewriting through onnx
        onnx.load_external_data_for_model(model, str(source.parent))
        save_graph(model, target, external=True)
    else:
        os.replace(source.parent / locations[0], target.parent / renamed)
        onnx.save(model, str(target))
    remove_graph(source)


def remove_graph(path: Path) -> None:
    """Delete a graph file and the data files it names, where they exist."""
    if not path.exists():
        return
    try:
        locations = external_data_files(path)
    except InputError:  # a data file outside the folder is not ours to delete
        locations = ()
    for location in locations:
        (path.parent / location).unlink(missing_ok=True)
    path.unlink()
