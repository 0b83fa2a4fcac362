"""Entry point of the BLIP plugin: the split, the wrappers and the `convert blip` command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from converter_core import hookimpl
from converter_core.cli_options import (
    Atol,
    BackendOptions,
    Backends,
    OutputDir,
    Passes,
    RequireValidation,
    Validate,
    convert_options,
)
from converter_core.errors import InputError
from converter_core.specs import ModuleSpec, SourceInfo, SplitPlan
from plugins.blip import wrappers
from plugins.blip.modules import (
    RETRIEVAL_VISION_ENCODER,
    TEXT_DECODER,
    TEXT_DECODER_WITH_PAST,
    TEXT_ENCODER,
    VISION_ENCODER,
    BlipConversion,
    module_specs,
)
from plugins.blip.source import BlipSource

# Original BLIP preprocessing and generation (shared/BLIP.md): bicubic resize, no crop, CLIP's statistics.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
PROMPT = "a picture of "
BERT_PROMPT_IDS = (1037, 3861, 1997)  # "a picture of" in bert-base-uncased, after [DEC]
BERT_VOCAB_SIZE = 30524
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _wrapper(source: BlipSource, name: str) -> torch.nn.Module:
    tokens = source.tokens
    if name == VISION_ENCODER:
        model = source.captioning or source.retrieval
        return wrappers.VisionEncoder(model.vision_model)
    if name == RETRIEVAL_VISION_ENCODER:
        return wrappers.VisionEncoder(source.retrieval.vision_model)
    if name == TEXT_ENCODER:
        return wrappers.TextEncoder(source.retrieval, tokens["ENC"], tokens["CLS"])
    if name == TEXT_DECODER:
        return wrappers.DecoderFirstStep(source.captioning)
    if name == TEXT_DECODER_WITH_PAST:
        return wrappers.DecoderWithPast(source.captioning)
    raise KeyError(name)


def _tokenizer_assets(source: BlipSource) -> dict[str, bytes]:
    if source.tokenizer_dir is None:
        return {}
    return {
        f"tokenizer/{name}": (source.tokenizer_dir / name).read_bytes()
        for name in TOKENIZER_FILES
        if (source.tokenizer_dir / name).is_file()
    }


def _metadata(source: BlipSource, assets: dict[str, bytes]) -> dict[str, Any]:
    config = (source.captioning or source.retrieval).config
    vocab_size = config.text_config.vocab_size
    prompt_ids = None
    if vocab_size == BERT_VOCAB_SIZE:
        prompt_ids = [source.tokens["DEC"], *BERT_PROMPT_IDS]
    return {
        "preprocessing": {
            "image_size": source.image_size,
            "resize": "bicubic",
            "crop": None,
            "rescale": 1 / 255,
            "mean": list(IMAGE_MEAN),
            "std": list(IMAGE_STD),
            "channel_order": "RGB",
            "layout": "NCHW",
        },
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
            "num_layers": config.text_config.num_hidden_layers,
            "defaults": {"num_beams": 3, "max_length": 30, "min_length": 10, "repetition_penalty": 1.0},
            "coco_evaluation": {"num_beams": 3, "max_length": 20, "min_length": 5},
        },
        "checkpoint_files": [
            {"path": str(f.path), "format": f.format, "sha256": f.sha256, "parts": list(f.parts)} for f in source.files
        ],
        "dropped_training_state": len(source.dropped_keys),
    }


@hookimpl
def converter_split_model(source: object) -> SplitPlan | None:
    if not isinstance(source, BlipConversion):
        return None
    blip = source.source
    specs, not_exported = module_specs(source, lambda name: _wrapper(blip, name))
    assets = _tokenizer_assets(blip)
    return SplitPlan(
        model_type="blip",
        source=SourceInfo(str(blip.path) if blip.path else None, blip.format, blip.sha256),
        modules=specs,
        not_exported=not_exported,
        metadata=_metadata(blip, assets),
        assets=assets,
    )


@hookimpl
def converter_wrap_module(source: object, spec: ModuleSpec) -> torch.nn.Module | None:
    if not isinstance(source, BlipConversion):
        return None
    return _wrapper(source.source, spec.name)


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
    else:
        raise InputError("give --checkpoint PATH (a BLIP .pth, .safetensors or Hugging Face directory) "
                         "or --random-weights --preset tiny|base|large")
    if tokenizer is not None:
        if not tokenizer.is_dir() or not any((tokenizer / name).is_file() for name in TOKENIZER_FILES):
            raise InputError(f"{tokenizer}: not a tokenizer directory (expected vocab.txt or tokenizer.json)")
        source.tokenizer_dir = tokenizer
    return source


@hookimpl
def converter_register_commands(cli: typer.Typer) -> None:
    from plugins.blip.commands import register_runtime_commands  # caption, match: the torch-free runtime

    register_runtime_commands(cli)

    @cli.command("blip")
    def convert_blip(
        output: OutputDir,
        checkpoint: Annotated[list[Path] | None, typer.Option(
            "--checkpoint", "-c", help="BLIP checkpoint: Salesforce .pth/.safetensors or a Hugging Face "
            "directory; give a captioning and a retrieval one together for all modules.")] = None,
        random_weights: Annotated[bool, typer.Option(help="Random weights of --preset (tests, benchmarks).")] = False,
        preset: Annotated[str, typer.Option(help="tiny, base or large (with --random-weights).")] = "base",
        seed: Annotated[int, typer.Option(help="Seed of --random-weights.")] = 0,
        image_size: Annotated[int | None, typer.Option(help="Export at this image size (position "
                                                       "embeddings are interpolated).")] = None,
        tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer directory to ship with the "
                                                       "models, when the checkpoint has none.")] = None,
        max_batch: Annotated[int, typer.Option(help="Largest batch (images x beams) to serve.")] = 8,
        max_text_len: Annotated[int, typer.Option(help="Longest text (prompt + caption) to serve.")] = 40,
        backend: Backends = None,
        backend_option: BackendOptions = None,
        passes: Passes = None,
        atol: Atol = None,
        validate: Validate = True,
        require_validation: RequireValidation = False,
    ) -> None:
        """Export BLIP to ONNX: vision encoder, text encoder (ITM/ITC), text decoder with KV cache."""
        from converter_core.console import finish, stage_progress
        from converter_core.pipeline import convert

        if max_batch < 1 or max_text_len < 2:
            raise InputError("--max-batch must be >= 1 and --max-text-len >= 2")
        options = convert_options(output, backend, passes, atol, validate, require_validation, backend_option)
        with stage_progress() as on_stage:
            on_stage("loading the checkpoint")
            source = load_source(checkpoint or [], random_weights, preset, image_size, seed, tokenizer)
            result = convert(BlipConversion(source, max_batch, max_text_len), options, on_stage=on_stage)
        finish(result)
