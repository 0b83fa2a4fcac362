"""Reading a BLIP output's manifest: every field the runtime uses, checked before it is used.

A manifest is input like any other: edited by hand, truncated, written by another version. Each
field the runtime reads is checked here for its type (and, where a wrong value would do harm, its
range), and every file it names must resolve inside the output directory, so that a manifest can
neither crash the runtime nor point it at `/etc/passwd`. A bad field is an InputError naming it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from converter_core.errors import InputError
from converter_core.output import MANIFEST_NAME
from plugins.blip.graphs import SPECIAL_TOKENS

SHA256 = re.compile(r"[0-9a-f]{64}")
Check = Callable[[Any], str | None]  # None when the value is fine, else what it should be


def _integer(low: int | None = None) -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return "an integer"
        return None if low is None or value >= low else f"an integer >= {low}"

    return check


def _number(positive: bool = False) -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (
                float("inf"), float("-inf")):
            return "a finite number"
        return None if not positive or value > 0 else "a number > 0"

    return check


def _text(value: Any) -> str | None:
    return None if isinstance(value, str) else "text"


def _sha256(value: Any) -> str | None:
    return None if isinstance(value, str) and SHA256.fullmatch(value) else "a sha256 (64 lower-case hex digits)"


def _numbers(count: int, positive: bool = False) -> Check:
    def check(value: Any) -> str | None:
        wanted = f"a list of {count} {'positive ' if positive else ''}numbers"
        if not isinstance(value, list) or len(value) != count:
            return wanted
        return wanted if any(_number(positive)(item) for item in value) else None

    return check


def _optional(check: Check) -> Check:
    return lambda value: None if value is None else check(value)


def _token_ids(value: Any) -> str | None:
    if not isinstance(value, list) or not value or any(_integer(0)(item) for item in value):
        return "a non-empty list of token ids"
    return None


def _is_none(value: Any) -> str | None:
    return None if value is None else "null"


# Field path -> check, for the top-level tables the runtime reads.
PREPROCESSING: dict[str, Check] = {
    "image_size": _integer(1), "resize": _text, "crop": _is_none, "rescale": _number(positive=True),
    "mean": _numbers(3), "std": _numbers(3, positive=True), "channel_order": _text, "layout": _text,
}
GENERATION: dict[str, Check] = {
    "prompt": _optional(_text), "prompt_ids": _optional(_token_ids), "eos_token_id": _integer(0),
    "max_position_embeddings": _integer(2), "num_layers": _integer(1), "max_text_len": _integer(2),
}
BLIP_GENERATE: dict[str, Check] = {
    "num_beams": _integer(1), "max_length": _integer(2), "min_length": _integer(0),
    "repetition_penalty": _number(positive=True),
}

VQA: dict[str, Check] = {"question_max_tokens": _integer(2)}
VQA_RANK: dict[str, Check] = {"k": _integer(1), "label_smoothing": _number()}


def _fail(path: Path, field: str, wanted: str, value: Any) -> InputError:
    shown = json.dumps(value)[:60] if not isinstance(value, (dict, list)) else type(value).__name__
    return InputError(f"{path}: {field} must be {wanted}, got {shown}; convert the model again with this version")


def _table(manifest: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    value = manifest.get(key)
    if not isinstance(value, dict):
        raise _fail(path, key, "a table", value) if key in manifest else InputError(
            f"{path}: has no {key!r}; convert the model again with this version")
    return value


def _check_fields(table: dict[str, Any], checks: dict[str, Check], prefix: str, path: Path) -> None:
    for name, check in checks.items():
        if name not in table:
            raise InputError(f"{path}: {prefix}.{name} is missing; convert the model again with this version")
        wanted = check(table[name])
        if wanted:
            raise _fail(path, f"{prefix}.{name}", wanted, table[name])


def inside(out_dir: Path, relative: Any, field: str) -> Path:
    """`out_dir / relative`, refused unless it is a relative path that resolves (links followed)
    inside `out_dir`: a manifest must not lead the runtime to files elsewhere."""
    if not isinstance(relative, str) or not relative:
        raise _fail(out_dir / MANIFEST_NAME, field, "a file name", relative)
    root = out_dir.resolve()
    target = (out_dir / relative).resolve()
    if Path(relative).is_absolute() or not target.is_relative_to(root) or target == root:
        raise InputError(f"{out_dir / MANIFEST_NAME}: {field} {relative!r} lies outside {out_dir}; refusing to open it")
    return out_dir / relative


def _check_modules(modules: dict[str, Any], out_dir: Path, path: Path) -> None:
    for name, module in modules.items():
        field = f"modules.{name}"
        if not isinstance(module, dict):
            raise _fail(path, field, "a table", module)
        files = [(f"{field}.file", module.get("file"), module.get("sha256"), f"{field}.sha256")]
        data_files = module.get("data_files", [])
        if not isinstance(data_files, list):
            raise _fail(path, f"{field}.data_files", "a list", data_files)
        for index, data in enumerate(data_files):
            if not isinstance(data, dict):
                raise _fail(path, f"{field}.data_files[{index}]", "a table", data)
            files.append((f"{field}.data_files[{index}].file", data.get("file"), data.get("sha256"),
                          f"{field}.data_files[{index}].sha256"))
        for file_field, file, digest, digest_field in files:
            target = inside(out_dir, file, file_field)
            if _sha256(digest):
                raise _fail(path, digest_field, "a sha256 (64 lower-case hex digits)", digest)
            if not target.is_file():
                raise InputError(f"{out_dir}: {file} (module {name}) is missing; convert again")


def _check_tokens(tokens: dict[str, Any], path: Path) -> None:
    for name in SPECIAL_TOKENS:
        if name not in tokens:
            raise InputError(f"{path}: tokens.{name} is missing; convert the model again with this version")
        if _integer(0)(tokens[name]):
            raise _fail(path, f"tokens.{name}", "an integer >= 0", tokens[name])


def _check_files(manifest: dict[str, Any], out_dir: Path, path: Path) -> None:
    tokenizer = _table(manifest, "tokenizer", path)
    files = tokenizer.get("files")
    if not isinstance(files, list) or any(not isinstance(f, str) for f in files):
        raise _fail(path, "tokenizer.files", "a list of file names", files)
    assets = manifest.get("assets", {})
    if not isinstance(assets, dict):
        raise _fail(path, "assets", "a table of file -> sha256", assets)
    for name, digest in assets.items():
        inside(out_dir, name, f"assets {name!r}")
        if _sha256(digest):
            raise _fail(path, f"assets.{name}", "a sha256 (64 lower-case hex digits)", digest)
    for name in files:
        inside(out_dir, name, "tokenizer.files")
        if name not in assets:
            raise InputError(f"{path}: tokenizer file {name} has no sha256 under assets; convert the model again")


def read_blip_manifest(out_dir: Path) -> dict[str, Any]:
    """The manifest of a BLIP conversion, every field the runtime reads checked; else InputError."""
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        raise InputError(f"{out_dir}: no {MANIFEST_NAME}; not a `convert blip` output directory")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InputError(f"{path}: not valid JSON ({type(exc).__name__})") from exc
    if not isinstance(manifest, dict) or manifest.get("model_type") != "blip":
        model_type = manifest.get("model_type") if isinstance(manifest, dict) else None
        raise InputError(f"{out_dir}: holds a {json.dumps(model_type)[:40]} conversion, not a BLIP one")
    _check_modules(_table(manifest, "modules", path), out_dir, path)
    _check_fields(_table(manifest, "preprocessing", path), PREPROCESSING, "preprocessing", path)
    generation = _table(manifest, "generation", path)
    _check_fields(generation, GENERATION, "generation", path)
    _check_fields(_table(generation, "blip_generate", path), BLIP_GENERATE, "generation.blip_generate", path)
    if "vqa" in generation:  # only a conversion of a VQA checkpoint has it
        vqa = _table(generation, "vqa", path)
        _check_fields(vqa, VQA, "generation.vqa", path)
        _check_fields(_table(vqa, "rank", path), VQA_RANK, "generation.vqa.rank", path)
        if not 0 <= vqa["rank"]["label_smoothing"] < 1:
            raise _fail(path, "generation.vqa.rank.label_smoothing", "a number in [0, 1)", vqa["rank"]["label_smoothing"])
    _check_tokens(_table(manifest, "tokens", path), path)
    not_exported = manifest.get("not_exported", {})
    if not isinstance(not_exported, dict) or any(not isinstance(v, str) for v in not_exported.values()):
        raise _fail(path, "not_exported", "a table of module -> reason", not_exported)
    _check_files(manifest, out_dir, path)
    return manifest
