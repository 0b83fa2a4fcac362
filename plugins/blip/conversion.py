"""BLIP conversion: loading a source, wrapping its modules, and what the manifest says about it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from converter_core.errors import InputError
from converter_core.specs import ShapeCase, SourceInfo, SplitPlan
from plugins.blip import graphs
from plugins.blip.graphs import (
    BERT_PROMPT_IDS,
    BERT_VOCAB_SIZE,
    PROMPT,
    RETRIEVAL_VISION_ENCODER,
    TEXT_DECODER,
    TEXT_DECODER_WITH_PAST,
    TEXT_ENCODER,
    TOKENIZER_FILES,
    VISION_ENCODER,
)
from plugins.blip.recipes import RECIPE, BlipConversion, module_specs
from plugins.blip.source import BlipSource

WHOLE_SEQUENCE = "tokens of the whole decoder sequence, prompt included ([DEC] a picture of ...), as BLIP's generate()"
NEW_TOKENS = "tokens written after the prompt, [SEP] included, as transformers' max_new_tokens / min_new_tokens"


def wrapper(source: BlipSource, name: str) -> torch.nn.Module:
    return RECIPE[name].build(source)


def _tokenizer_assets(source: BlipSource) -> dict[str, bytes]:
    """The tokenizer files to ship, each a regular file that resolves inside the tokenizer folder (a
    link out of it would ship whatever it points at), checked to load and to fit the model."""
    if source.tokenizer_dir is None:
        return {}
    folder = source.tokenizer_dir.resolve()
    assets = {}
    for name in TOKENIZER_FILES:
        path = source.tokenizer_dir / name
        if not path.exists() and not path.is_symlink():
            continue
        if not path.resolve().is_relative_to(folder) or not path.resolve().is_file():
            raise InputError(f"{path}: not a regular file inside {source.tokenizer_dir} (a link out of it, or not a "
                             "file); refusing to ship it: copy the file itself into the folder")
        assets[f"tokenizer/{name}"] = path.read_bytes()
    if assets:
        _check_tokenizer(source, assets)
    return assets


def _check_tokenizer(source: BlipSource, assets: dict[str, bytes]) -> None:
    """The shipped tokenizer loads and agrees with the model: its special ids (checked on loading)
    and its size, the model's vocabulary or that less BLIP's two added tokens [DEC] and [ENC]."""
    import tempfile

    from plugins.blip.runtime.tokenizer import BlipTokenizer

    config = source.model.config.text_config
    with tempfile.TemporaryDirectory(prefix="vlm-tokenizer-") as folder:
        for relative, content in assets.items():
            (Path(folder) / Path(relative).name).write_bytes(content)
        try:
            tokenizer = BlipTokenizer.from_directory(Path(folder), source.tokens, config.max_position_embeddings)
        except InputError as exc:
            raise InputError(f"{source.tokenizer_dir}: {str(exc).split(': ', 1)[-1]}") from None
        except Exception as exc:  # the tokenizers library's own parse errors
            raise InputError(f"{source.tokenizer_dir}: the tokenizer does not load: {type(exc).__name__}: {exc}") from None
    size, model = tokenizer.vocab_size, config.vocab_size
    added = (source.tokens["DEC"], source.tokens["ENC"]) == (model - 2, model - 1)
    if size != model and not (added and size == model - 2):
        raise InputError(f"{source.tokenizer_dir}: the tokenizer has {size} tokens and the model {model}"
                         + (f" ({model - 2} without [DEC] and [ENC])" if added else "")
                         + "; this tokenizer does not belong to this model")


def _prompt_ids(vocab: Path, dec_id: int) -> list[int] | None:
    """The prompt in a word-piece vocabulary of the model's own (the bundled tiny BLIP's): tokenized
    as BLIP does, [CLS] replaced by [DEC] and the trailing [SEP] dropped. None if a word is missing."""
    from tokenizers import BertWordPieceTokenizer

    tokenizer = BertWordPieceTokenizer(str(vocab), lowercase=True)
    ids = tokenizer.encode(PROMPT.strip()).ids
    if tokenizer.token_to_id("[UNK]") in ids:
        return None
    return [dec_id, *ids[1:-1]]


def _metadata(conversion: BlipConversion, assets: dict[str, bytes]) -> dict[str, Any]:
    source = conversion.source
    config = source.model.config
    vocab_size = config.text_config.vocab_size
    prompt_ids = None
    if vocab_size == BERT_VOCAB_SIZE:
        prompt_ids = [source.tokens["DEC"], *BERT_PROMPT_IDS]
    elif source.tokenizer_dir is not None and (source.tokenizer_dir / "vocab.txt").is_file():
        prompt_ids = _prompt_ids(source.tokenizer_dir / "vocab.txt", source.tokens["DEC"])
    metadata = {
        "preprocessing": graphs.preprocessing(source.image_size),
        "tokens": dict(source.tokens),
        "vocab_size": vocab_size,
        "tokenizer": (
            {"files": sorted(assets)} if assets else
            {"files": [], "reason": "the source has no tokenizer files; give --tokenizer DIR (bert-base-uncased "
                                    "plus [DEC] and [ENC]) to ship one"}
        ),
        "generation": {
            "prompt": PROMPT,
            "prompt_ids": prompt_ids,
            "eos_token_id": source.tokens["SEP"],
            "max_position_embeddings": config.text_config.max_position_embeddings,
            # The longest text (prompt + caption) the graphs were validated at and backends built for.
            "max_text_len": conversion.max_text_len,
            "num_layers": config.text_config.num_hidden_layers,
            # BLIP's own generate() and its COCO evaluation count lengths over the whole decoder
            # sequence, prompt included; the runtime's max_tokens/min_tokens count new tokens.
            "blip_generate": {"num_beams": 3, "max_length": 30, "min_length": 10, "repetition_penalty": 1.0,
                              "beam_scoring": "blip", "unit": WHOLE_SEQUENCE},
            "coco_evaluation": {"num_beams": 3, "max_length": 20, "min_length": 5, "unit": WHOLE_SEQUENCE},
            "runtime_defaults": {"num_beams": 1, "max_tokens": 20, "min_tokens": 0, "repetition_penalty": 1.0,
                                 "beam_scoring": "transformers", "unit": NEW_TOKENS},
        },
        "checkpoint_files": [
            {"path": str(f.path), "format": f.format, "sha256": f.sha256, "parts": list(f.parts)} for f in source.files
        ],
        "dropped_training_state": len(source.dropped_keys),
    }
    if source.vqa is not None:
        # The runtime's `answer` reads these; lengths as BLIP_VQA counts them, [DEC] included.
        metadata["generation"]["vqa"] = {
            "question_max_tokens": graphs.QUESTION_MAX_TOKENS, "blip_generate": {**graphs.VQA_GENERATE,
                                                                                 "unit": WHOLE_SEQUENCE},
            "rank": {"k": graphs.VQA_RANK_K, "label_smoothing": graphs.VQA_LABEL_SMOOTHING},
        }
    return metadata


def split(conversion: BlipConversion) -> SplitPlan:
    blip = conversion.source
    assets = _tokenizer_assets(blip)
    inputs = [file.path for file in blip.files]
    inputs += [blip.tokenizer_dir] if blip.tokenizer_dir is not None else []
    inputs += [conversion.calibration_images] if conversion.calibration_images is not None else []
    return SplitPlan(
        model_type="blip",
        source=SourceInfo(str(blip.path) if blip.path else None, blip.format, blip.sha256),
        modules=module_specs(conversion),
        not_exported=dict(blip.absent),
        metadata=_metadata(conversion, assets),
        assets=assets,
        inputs=tuple(inputs),
        calibration=lambda modules: calibration_set(blip, conversion.calibration_images, modules),
    )


def load_source(checkpoints: list[Path], random_weights: bool, preset: str, image_size: int | None,
                seed: int, tokenizer: Path | None) -> BlipSource:
    from plugins.blip.checkpoint import load_blip_source
    from plugins.blip.presets import random_source

    if checkpoints and random_weights:
        raise InputError("give --checkpoint or --random-weights, not both")
    if random_weights:
        source = random_source(preset, seed=seed, image_size=image_size)
    elif checkpoints:
        source = load_blip_source(checkpoints, image_size=image_size)
    else:  # the bundled tiny BLIP, trained on drawn scenes, with its own tokenizer
        from plugins.blip import fixture

        source = load_blip_source([fixture.checkpoint_path()], image_size=image_size)
        source.tokenizer_dir = fixture.tokenizer_dir()
    if tokenizer is not None:
        if not tokenizer.is_dir() or not any((tokenizer / name).is_file() for name in TOKENIZER_FILES):
            raise InputError(f"{tokenizer}: not a tokenizer directory (expected vocab.txt or tokenizer.json)")
        source.tokenizer_dir = tokenizer
    return source


CALIBRATION_IMAGES = 32
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def calibration_set(source: BlipSource, images_dir: Path | None, wanted: Sequence[str]) -> dict[str, list[ShapeCase]]:
    """Static-quantisation inputs for the `wanted` modules from real images: `images_dir`, else the
    bundled fixture's drawn scenes. The text comes from the fixture's captions either way (a folder
    of images has none); without a tokenizer only the vision encoders get calibration data."""
    from plugins.blip import fixture
    from plugins.blip.calibration import calibration_cases
    from plugins.blip.runtime.preprocess import load_image
    from plugins.blip.runtime.tokenizer import BlipTokenizer

    scenes = [fixture.training_scene(0, index) for index in range(CALIBRATION_IMAGES)]
    if images_dir is None:
        images = [fixture.draw(scene) for scene in scenes]
    else:
        if not images_dir.is_dir():
            raise InputError(f"{images_dir}: --calibration-images needs a directory of images")
        files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputError(f"{images_dir}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        images = [load_image(path) for path in files[:CALIBRATION_IMAGES]]
    captions = [scene.caption for scene in scenes][: len(images)]
    modules = [VISION_ENCODER, RETRIEVAL_VISION_ENCODER]
    tokenize = lambda text: []  # noqa: E731 - unused unless a text module is calibrated
    if source.tokenizer_dir is not None:
        config = source.model.config.text_config
        tokenizer = BlipTokenizer.from_directory(source.tokenizer_dir, source.tokens, config.max_position_embeddings)
        tokenize = lambda text: tokenizer.encode(text)[1:-1]  # noqa: E731 - without [CLS] and [SEP]
        modules += [TEXT_ENCODER, TEXT_DECODER, TEXT_DECODER_WITH_PAST]
    return calibration_cases(source, images, captions, tokenize, [name for name in modules if name in wanted])
