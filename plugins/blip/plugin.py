"""Entry point of the BLIP plugin: the split, the wrappers and the `convert blip` command.

The heavy parts (torch, transformers) are imported when a hook is called, not when the plugin
loads, so that `convert --help` and the listings start quickly.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

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
from converter_core.specs import ModuleSpec, SplitPlan

if TYPE_CHECKING:
    import torch


def _is_blip(source: object) -> bool:
    # A BlipConversion exists only once its module (which needs torch) was imported.
    recipes = sys.modules.get("plugins.blip.recipes")
    return recipes is not None and isinstance(source, recipes.BlipConversion)


@hookimpl
def converter_split_model(source: object) -> SplitPlan | None:
    if not _is_blip(source):
        return None
    from plugins.blip.conversion import split

    return split(source)


@hookimpl
def converter_wrap_module(source: object, spec: ModuleSpec) -> torch.nn.Module | None:
    if not _is_blip(source):
        return None
    from plugins.blip.recipes import RECIPE

    return RECIPE[spec.name].build(source.source)


@hookimpl
def converter_backend_tasks(backend: str, model_type: str) -> object | None:
    if model_type != "blip":
        return None
    if backend == "triton":
        from plugins.blip.serving_triton import BlipTritonTasks  # the Python models that run the decoding loop

        return BlipTritonTasks()
    if backend == "web":
        from plugins.blip.web import BlipWebTasks  # the browser app and its check against the Python runtime

        return BlipWebTasks()
    return None


@hookimpl
def converter_register_commands(cli: typer.Typer) -> None:
    from plugins.blip.bulk.command import register_bulk_command
    from plugins.blip.commands import register_runtime_commands  # caption, match: the torch-free runtime

    register_runtime_commands(cli)
    register_bulk_command(cli)

    @cli.command("blip")
    def convert_blip(
        output: OutputDir,
        checkpoint: Annotated[list[Path] | None, typer.Option(
            "--checkpoint", "-c", help="BLIP checkpoint: Salesforce .pth/.safetensors or a Hugging Face "
            "directory; give a captioning and a retrieval one together for all modules, or a VQA one alone.")] = None,
        random_weights: Annotated[bool, typer.Option(help="Random weights of --preset (tests, benchmarks).")] = False,
        preset: Annotated[str, typer.Option(help="tiny, base or large (with --random-weights).")] = "base",
        seed: Annotated[int, typer.Option(help="Seed of --random-weights.")] = 0,
        image_size: Annotated[int | None, typer.Option(help="Export at this image size (position "
                                                       "embeddings are interpolated).")] = None,
        tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer directory to ship with the "
                                                       "models, when the checkpoint has none.")] = None,
        max_batch: Annotated[int, typer.Option(help="Largest batch (images x beams) to serve.")] = 8,
        max_text_len: Annotated[int, typer.Option(help="Longest text (prompt + caption) to serve.")] = 40,
        calibration_images: Annotated[Path | None, typer.Option(help="Images for int8-static calibration "
                                                                "(default: the bundled fixture's scenes).")] = None,
        backend: Backends = None,
        backend_option: BackendOptions = None,
        passes: Passes = None,
        atol: Atol = None,
        validate: Validate = True,
        require_validation: RequireValidation = False,
    ) -> None:
        """Export BLIP to ONNX: vision encoder, text encoder (ITM/ITC), text decoder with KV cache (or VQA's graphs)."""
        from converter_core.console import finish, stage_progress
        from converter_core.export import require_export_extra
        from converter_core.pipeline import convert

        require_export_extra("transformers")
        from plugins.blip.conversion import load_source
        from plugins.blip.recipes import BlipConversion

        if max_batch < 1 or max_text_len < 2:
            raise InputError("--max-batch must be >= 1 and --max-text-len >= 2")
        options = convert_options(output, backend, passes, atol, validate, require_validation, backend_option)
        with stage_progress() as on_stage:
            on_stage("loading the checkpoint")
            source = load_source(checkpoint or [], random_weights, preset, image_size, seed, tokenizer)
            positions = source.model.config.text_config.max_position_embeddings
            if max_text_len > positions:
                raise InputError(f"--max-text-len {max_text_len} exceeds the model's {positions} text positions")
            conversion = BlipConversion(source, max_batch, max_text_len, calibration_images)
            result = convert(conversion, options, on_stage=on_stage)
        finish(result)
