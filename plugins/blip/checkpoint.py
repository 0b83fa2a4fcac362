"""Loading BLIP checkpoints into transformers models.

Three kinds of file come in: a Hugging Face directory (config.json + weights), an original Salesforce
`.pth`, and a `.safetensors` file in the Salesforce layout. All three end as one state dict in
transformers names plus a `BlipConfig` (from config.json, or inferred from tensor shapes), which is
loaded strictly: a missing or unexpected key is an error naming the key, never a random weight.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors
from torch.nn import functional as F
from transformers import BlipConfig, PreTrainedModel

from converter_core.errors import InputError
from converter_core.output import sha256_file
from plugins.blip.graphs import TEXT_DECODER, TEXT_ENCODER
from plugins.blip.presets import HEAD_DIM, BlipDims, check_image_size, empty_models, empty_vqa_model, special_tokens
from plugins.blip.source import BlipSource, CheckpointFile

HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_MARKERS = ("tokenizer.json", "vocab.txt")  # either says a directory holds a tokenizer
# Training state of the original pretrain and retrieval models: momentum encoders, ITC queues, temperature.
TRAINING_STATE = re.compile(r"^([a-z_]+_m\.|(image|text|idx|ptr)_queue$|temp$)|(^|\.)position_ids$")
# Original Salesforce ViT names -> transformers BlipVisionModel names (BLIP.md); {n} a block, {p} weight|bias.
VISION_KEYS = [
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.{p}", "embeddings.patch_embedding.{p}"),
    ("blocks.{n}.norm1.{p}", "encoder.layers.{n}.layer_norm1.{p}"),
    ("blocks.{n}.attn.qkv.{p}", "encoder.layers.{n}.self_attn.qkv.{p}"),
    ("blocks.{n}.attn.proj.{p}", "encoder.layers.{n}.self_attn.projection.{p}"),
    ("blocks.{n}.norm2.{p}", "encoder.layers.{n}.layer_norm2.{p}"),
    ("blocks.{n}.mlp.fc1.{p}", "encoder.layers.{n}.mlp.fc1.{p}"),
    ("blocks.{n}.mlp.fc2.{p}", "encoder.layers.{n}.mlp.fc2.{p}"),
    ("norm.{p}", "post_layernorm.{p}"),
]
ORIGINAL_VISION, HF_VISION = "visual_encoder.", "vision_model."
CAPTIONING_PREFIXES = ("text_decoder.",)
RETRIEVAL_PREFIXES = ("text_encoder.", "vision_proj.", "text_proj.", "itm_head.")
RETRIEVAL_HEADS = RETRIEVAL_PREFIXES[1:]
VQA_ARCHITECTURE = "BlipForQuestionAnswering"
LISTED_KEYS = 5



def _rank(key: str) -> int:
    """The rank of a tensor whose shape tells the model's dimensions (`_infer_dims` reads them)."""
    if key.endswith(("class_embedding", "position_embedding")):
        return 3  # [1, 1, hidden], [1, positions, hidden]
    return 4 if key.endswith("patch_embedding.weight") else 2  # a convolution; else Linear or Embedding


class CheckpointError(InputError):
    """A checkpoint file that cannot be loaded as BLIP; the message names the file."""


def load_blip_source(paths: Sequence[Path], *, image_size: int | None = None) -> BlipSource:
    """Load one or two BLIP checkpoints into eval-mode float32 transformers models.

    Each path is a Hugging Face BLIP directory, an original Salesforce `.pth`, or a `.safetensors`
    file in the Salesforce layout. A captioning file and a retrieval file together give both parts;
    their vision towers are one object when their weights are equal. `image_size` resizes the
    vision position embeddings bicubically (as BLIP's `interpolate_pos_embed`).
    """
    paths = [Path(p) for p in paths]
    if not 1 <= len(paths) <= 2:
        raise InputError(f"give one or two BLIP checkpoints, got {len(paths)}")
    checkpoints = [_read(path) for path in paths]
    sizes = {ckpt.image_size for ckpt in checkpoints}
    if image_size is None and len(sizes) > 1:
        first, second = (ckpt.image_size for ckpt in checkpoints)
        raise InputError(
            f"{paths[0]} and {paths[1]} were trained at different image sizes ({first} and {second} px); "
            "pass an image size to resize both"
        )
    target_size = image_size if image_size is not None else sizes.pop()
    loaded = [_build(ckpt, target_size) for ckpt in checkpoints]
    return _combine(loaded, target_size)


def to_salesforce_state_dict(*models: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The state dict of transformers BLIP models under the original Salesforce names (what
    `load_blip_source` reads from a `.pth`): a captioning and a retrieval model sharing one vision
    model give a pretrain-style file with all modules. Detached copies; no training state."""
    state: dict[str, torch.Tensor] = {}
    for model in models:
        state.update({_to_original(key): tensor.detach().clone() for key, tensor in model.state_dict().items()})
    return state


@dataclass
class _Checkpoint:
    """One file read: its tensors under transformers names, and the config that fits them."""

    path: Path  # as given: the directory for a Hugging Face checkpoint
    file: Path  # the weights file itself
    format: str
    sha256: str
    state: dict[str, torch.Tensor]
    config: BlipConfig
    parts: tuple[str, ...]
    name_in_file: Callable[[str], str]  # transformers name -> the name the file uses, for messages
    dropped: list[str] = field(default_factory=list)
    tokenizer_dir: Path | None = None

    @property
    def image_size(self) -> int:
        return self.config.vision_config.image_size


@dataclass
class _Loaded:
    checkpoint: _Checkpoint
    models: dict[str, PreTrainedModel]  # "captioning" and/or "retrieval" -> its model


def _read(path: Path) -> _Checkpoint:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        return _read_hf_dir(path)
    if not path.is_file():  # a FIFO or a device would hang or stream forever
        raise CheckpointError(f"{path}: not a regular file")
    if path.suffix == ".safetensors":
        return _from_original(path, "safetensors", _load_safetensors(path))
    return _from_original(path, "salesforce-pth", _load_pickle(path))


def _read_hf_dir(path: Path) -> _Checkpoint:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: a Hugging Face directory needs config.json, and it has none")
    try:
        config_data = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_file}: not readable JSON ({_first_line(exc)})") from exc
    model_type = config_data.get("model_type") if isinstance(config_data, dict) else None
    if model_type != "blip":
        raise CheckpointError(f"{config_file}: describes a {model_type!r} model, not BLIP (model_type 'blip')")
    architectures = config_data.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(name, str) for name in architectures):
        raise CheckpointError(f"{config_file}: 'architectures' must be a list of class names, got {architectures!r}"[:300])
    if not isinstance(config_data.get("vision_config", {}), dict) or not isinstance(config_data.get("text_config", {}), dict):
        raise CheckpointError(f"{config_file}: vision_config and text_config must be tables")
    weights = next((path / name for name in HF_WEIGHTS if (path / name).is_file()), None)
    if weights is None:
        raise CheckpointError(
            f"{path}: no weights file ({' or '.join(HF_WEIGHTS)}); sharded checkpoints are not supported"
        )
    state = _load_safetensors(weights) if weights.suffix == ".safetensors" else _load_pickle(weights)
    state, dropped = _drop_training_state(state, weights)
    if not any(key.startswith(HF_VISION) for key in state):
        raise CheckpointError(f"{weights}: not a BLIP checkpoint: no {HF_VISION}* weights (found {_listing(state)})")
    try:
        config = BlipConfig.from_dict(config_data)
    except Exception as exc:  # transformers validates many fields, each with its own error type
        raise CheckpointError(f"{config_file}: not a valid BLIP config ({_first_line(exc)})") from exc
    parts = _parts(state, weights)
    if architectures and (VQA_ARCHITECTURE in architectures) != (parts == ("vqa",)):
        said = "a question-answering model" if VQA_ARCHITECTURE in architectures else f"a {architectures[:1]} model"
        raise CheckpointError(f"{config_file}: says {said}, but the weights hold a BLIP {' + '.join(parts)} model")
    return _Checkpoint(
        path=path,
        file=weights,
        format="hf-dir",
        sha256=sha256_file(weights),
        state=state,
        config=config,
        parts=parts,
        name_in_file=lambda name: name,
        dropped=dropped,
        tokenizer_dir=path if any((path / name).is_file() for name in TOKENIZER_MARKERS) else None,
    )


def _from_original(path: Path, format: str, state: dict[str, torch.Tensor]) -> _Checkpoint:
    state, dropped = _drop_training_state(state, path)
    if not any(key.startswith(ORIGINAL_VISION) for key in state):
        if any(key.startswith(HF_VISION) for key in state):
            raise CheckpointError(
                f"{path}: holds transformers-named weights without a config; give its Hugging Face directory instead"
            )
        raise CheckpointError(f"{path}: not a BLIP checkpoint: no {ORIGINAL_VISION}* weights (found {_listing(state)})")
    state = {_to_hf(key): tensor for key, tensor in state.items()}
    parts = _parts(state, path)
    dims = _infer_dims(state, path, _to_original)
    return _Checkpoint(
        path=path,
        file=path,
        format=format,
        sha256=sha256_file(path),
        state=state,
        config=dims.config(),
        parts=parts,
        name_in_file=_to_original,
        dropped=dropped,
    )


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        # weights_only refuses any pickled object other than tensors and plain containers, so a
        # malicious file fails here instead of running its code.
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f" (it calls {found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path}: refused: the pickle holds Python objects other than tensors, which could run code{what}; "
            "load only a plain state dict"
        ) from exc
    except Exception as exc:  # truncated zip, bad magic number, EOF: all mean an unreadable file
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {_first_line(exc)}"
        ) from exc
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    return _tensors_only(data, path)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(path, device="cpu")
    except Exception as exc:  # safetensors raises its own error type for every header or size problem
        raise CheckpointError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {_first_line(exc)}"
        ) from exc


def _tensors_only(data: object, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(data, dict) or not data:
        raise CheckpointError(
            f"{path}: not a state dict (got {type(data).__name__}); expected {{'model': state_dict}} or a state dict"
        )
    not_names = [repr(key) for key in data if not isinstance(key, str)]
    if not_names:
        raise CheckpointError(f"{path}: not a state dict: keys that are not names: {_names(not_names)}")
    not_tensors = [str(key) for key, value in data.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path}: not a state dict: entries that are not tensors: {_names(not_tensors)}")
    return data


def _drop_training_state(state: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    kept, dropped, not_float = {}, [], []
    for key, tensor in state.items():
        if TRAINING_STATE.search(key):
            dropped.append(key)
        elif tensor.is_floating_point():
            kept[key] = tensor.float()
        else:  # loading would cast it silently into a float parameter
            not_float.append(f"{key} ({str(tensor.dtype).removeprefix('torch.')})")
    if not_float:
        raise CheckpointError(f"{path}: tensors that are not floating point, which no BLIP weight is: {_names(not_float)}")
    return kept, dropped


def _template_regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template).replace(r"\{n\}", r"(?P<n>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(pattern + "$")


_TO_HF = [(_template_regex(original), hf) for original, hf in VISION_KEYS]
_TO_ORIGINAL = [(_template_regex(hf), original) for original, hf in VISION_KEYS]


def _to_hf(key: str) -> str:
    """Salesforce name -> transformers name. Names outside the ViT keep theirs (BLIP.md)."""
    if not key.startswith(ORIGINAL_VISION):
        return key
    return HF_VISION + _rename(key.removeprefix(ORIGINAL_VISION), _TO_HF)


def _to_original(key: str) -> str:
    if not key.startswith(HF_VISION):
        return key
    return ORIGINAL_VISION + _rename(key.removeprefix(HF_VISION), _TO_ORIGINAL)


def _rename(key: str, table: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, template in table:
        match = pattern.match(key)
        if match:
            return template.format(**match.groupdict())
    return key  # not a known ViT weight: it stays, and the strict load reports it as unexpected


def _infer_dims(state: dict[str, torch.Tensor], path: Path, name_in_file: Callable[[str], str]) -> BlipDims:
    """A config from tensor shapes alone; heads are hidden / 64, the ViT-B/L and BERT-base convention."""

    def shape(key: str) -> torch.Size:
        if key not in state:
            raise CheckpointError(f"{path}: missing key {name_in_file(key)}")
        found = state[key].shape
        if len(found) != _rank(key) or any(size == 0 for size in found):
            raise CheckpointError(f"{path}: {name_in_file(key)} has shape {tuple(found)}, which no BLIP model has")
        return found

    def layers(prefix: str) -> int:
        numbers = {int(m.group(1)) for key in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", key))}
        return max(numbers) + 1 if numbers else 0

    vision_hidden = shape("vision_model.embeddings.class_embedding")[-1]
    patch_size = shape("vision_model.embeddings.patch_embedding.weight")[-1]
    positions = shape("vision_model.embeddings.position_embedding")[1] - 1
    grid = round(positions**0.5)
    if grid * grid != positions:
        table = name_in_file("vision_model.embeddings.position_embedding")
        raise CheckpointError(f"{path}: {table} has {positions} patch positions, not a square grid")
    text = "text_decoder.bert." if any(key.startswith("text_decoder.") for key in state) else "text_encoder."
    vocab_size, text_hidden = shape(text + "embeddings.word_embeddings.weight")
    for what, hidden in (("vision", vision_hidden), ("text", text_hidden)):
        if hidden % HEAD_DIM:
            raise CheckpointError(
                f"{path}: {what} width {hidden} is not a multiple of {HEAD_DIM}; cannot infer the attention heads"
            )
    image_text_hidden = shape("vision_proj.weight")[0] if "vision_proj.weight" in state else 256
    return BlipDims(
        vision_hidden=vision_hidden,
        vision_layers=layers("vision_model.encoder.layers."),
        vision_mlp=shape("vision_model.encoder.layers.0.mlp.fc1.weight")[0],
        image_size=grid * patch_size,
        text_hidden=text_hidden,
        text_layers=layers(text + "encoder.layer."),
        text_intermediate=shape(text + "encoder.layer.0.intermediate.dense.weight")[0],
        vocab_size=vocab_size,
        max_positions=shape(text + "embeddings.position_embeddings.weight")[0],
        image_text_hidden=image_text_hidden,
        patch_size=patch_size,
    )


def _parts(state: dict[str, torch.Tensor], path: Path) -> tuple[str, ...]:
    """What the keys hold. A question encoder and an answer decoder without the retrieval heads are
    BLIP_VQA (`model_base_vqa_capfilt_large.pth`, `model_vqa.pth`); a pretrain file has the heads."""
    has = lambda prefixes: any(key.startswith(prefixes) for key in state)  # noqa: E731
    if has(("text_encoder.",)) and has(CAPTIONING_PREFIXES) and not has(RETRIEVAL_HEADS):
        return ("vqa",)
    parts = tuple(
        part
        for part, prefixes in (("captioning", CAPTIONING_PREFIXES), ("retrieval", RETRIEVAL_PREFIXES))
        if any(key.startswith(prefixes) for key in state)
    )
    if not parts:
        raise CheckpointError(
            f"{path}: has vision weights but no text_decoder.* or text_encoder.* weights; nothing to export"
        )
    return parts


def _build(ckpt: _Checkpoint, image_size: int) -> _Loaded:
    if image_size != ckpt.image_size:
        _resize_positions(ckpt, image_size)
    captioning, retrieval = empty_models(ckpt.config, ckpt.parts)
    vqa = empty_vqa_model(ckpt.config) if "vqa" in ckpt.parts else None
    built = (("captioning", captioning), ("retrieval", retrieval), ("vqa", vqa))
    models = {part: model for part, model in built if model is not None}
    expected: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    for model in models.values():
        expected.update(model.state_dict())
        tied.update(model.all_tied_weights_keys)
    _check_keys(ckpt, expected, tied)
    for model in models.values():
        own = model.state_dict().keys()
        model.load_state_dict({key: ckpt.state[key] for key in own if key in ckpt.state}, strict=False)
        model.float().eval()
    return _Loaded(ckpt, models)


def _check_keys(ckpt: _Checkpoint, expected: dict[str, torch.Tensor], tied: dict[str, str]) -> None:
    """Refuse a state dict that would leave a weight random or a tensor unused."""
    present, name = ckpt.state.keys(), ckpt.name_in_file
    # A tied weight (the LM head's, the word embeddings') is loaded through the weight it is tied to.
    missing = [key for key in expected if key not in present and tied.get(key) not in present]
    unexpected = [key for key in present if key not in expected]
    problems = []
    if missing:
        problems.append(f"missing keys {_names(map(name, missing))}")
    if unexpected:
        problems.append(f"unexpected keys {_names(map(name, unexpected))}")
    if problems:
        kind = " + ".join(ckpt.parts)
        raise CheckpointError(f"{ckpt.file}: {'; '.join(problems)}; is it a complete BLIP {kind} checkpoint?")
    mismatched = [
        f"{name(key)} {tuple(tensor.shape)} (expected {tuple(expected[key].shape)})"
        for key, tensor in ckpt.state.items()
        if tensor.shape != expected[key].shape
    ]
    if mismatched:
        raise CheckpointError(f"{ckpt.file}: tensor shapes do not fit one BLIP model: {_names(mismatched)}")
    for target, source in tied.items():
        if target in present and source in present and not torch.equal(ckpt.state[target], ckpt.state[source]):
            raise CheckpointError(f"{ckpt.file}: {name(target)} differs from {name(source)}, which it is tied to")


def _resize_positions(ckpt: _Checkpoint, image_size: int) -> None:
    """Bicubic resize of the patch position grid, class position kept: BLIP's `interpolate_pos_embed`."""
    vision = ckpt.config.vision_config
    check_image_size(image_size, vision.patch_size)
    key = "vision_model.embeddings.position_embedding"
    old_grid = vision.image_size // vision.patch_size
    new_grid = image_size // vision.patch_size
    table = ckpt.state.get(key)
    if table is None or table.shape[1] != old_grid * old_grid + 1:
        return  # missing or not fitting the config: the key check reports it
    dim = table.shape[-1]
    grid = table[:, 1:].reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    ckpt.state[key] = torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)
    vision.image_size = image_size


def _combine(loaded: list[_Loaded], image_size: int) -> BlipSource:
    models: dict[str, PreTrainedModel] = {}
    origin: dict[str, _Checkpoint] = {}
    for item in loaded:
        for part, model in item.models.items():
            if part in origin:
                raise InputError(
                    f"{origin[part].path} and {item.checkpoint.path} both hold a {part} model; give at most one of each"
                )
            models[part], origin[part] = model, item.checkpoint
    captioning, retrieval, vqa = models.get("captioning"), models.get("retrieval"), models.get("vqa")
    if vqa is not None and len(models) > 1:
        others = [str(origin[part].path) for part in models if part != "vqa"]
        raise InputError(f"{origin['vqa'].path} is a VQA checkpoint; this version converts it on its own, "
                         f"without {' and '.join(others)}")

    shared_vision = True
    if captioning is not None and retrieval is not None and captioning.vision_model is not retrieval.vision_model:
        if _same_weights(captioning.vision_model, retrieval.vision_model):
            retrieval.vision_model = captioning.vision_model
        else:
            shared_vision = False

    tokens = {part: special_tokens(model.config.text_config) for part, model in models.items()}
    if len({tuple(ids.items()) for ids in tokens.values()}) > 1:
        raise InputError(
            f"{origin['captioning'].path} and {origin['retrieval'].path} disagree on special token ids "
            f"({tokens['captioning']} vs {tokens['retrieval']})"
        )
    for part, ids in tokens.items():
        vocab_size = models[part].config.text_config.vocab_size
        outside = {token: value for token, value in ids.items() if not 0 <= value < vocab_size}
        if outside:
            raise CheckpointError(f"{origin[part].path}: special token ids {outside} lie outside its {vocab_size} ids")

    first = loaded[0].checkpoint
    absent = {}
    if vqa is not None:
        reason = f"{first.path.name} is a VQA checkpoint (question encoder and answer decoder)"
        absent[TEXT_ENCODER] = absent[TEXT_DECODER] = reason
    elif retrieval is None:
        absent[TEXT_ENCODER] = f"{first.path.name} has no text_encoder.* weights (captioning checkpoint)"
    if captioning is None and vqa is None:
        absent[TEXT_DECODER] = f"{first.path.name} has no text_decoder.* weights (retrieval checkpoint)"
    return BlipSource(
        path=first.path,
        format=first.format,
        sha256=first.sha256,
        image_size=image_size,
        captioning=captioning,
        retrieval=retrieval,
        absent=absent,
        dropped_keys=[key for item in loaded for key in item.checkpoint.dropped],
        tokenizer_dir=next((item.checkpoint.tokenizer_dir for item in loaded if item.checkpoint.tokenizer_dir), None),
        tokens=next(iter(tokens.values())),
        shared_vision=shared_vision,
        vqa=vqa,
        files=[
            CheckpointFile(item.checkpoint.path, item.checkpoint.format, item.checkpoint.sha256, tuple(item.models))
            for item in loaded
        ],
    )


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    ours, theirs = a.state_dict(), b.state_dict()
    return ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)


def _names(names: Iterable[str]) -> str:
    names = list(names)
    listed = ", ".join(names[:LISTED_KEYS])
    return listed if len(names) <= LISTED_KEYS else f"{listed} and {len(names) - LISTED_KEYS} more"


def _listing(state: dict[str, object]) -> str:
    return _names(list(state)) if state else "no keys"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
