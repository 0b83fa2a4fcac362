"""Options every model command shares, so that `convert blip` and a third party's command agree."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from converter_core.options import parse_option_items
from converter_core.pipeline import ConvertOptions, parse_pass_policy

OutputDir = Annotated[Path, typer.Option("--output", "-o", help="Output directory, replaced atomically.")]
Backends = Annotated[
    list[str] | None,
    typer.Option("--backend", "-b", help="Backend to prepare and validate (repeatable); see `convert backends`."),
]
BackendOptions = Annotated[
    list[str] | None,
    typer.Option("--backend-option", help="KEY=VALUE or BACKEND.KEY=VALUE (repeatable), e.g. tensorrt.precision=fp16; "
                                          "`convert backends` lists each backend's options."),
]
Passes = Annotated[
    str | None,
    typer.Option("--passes", "--quantize", help="Graph passes: PASS for every module, or MODULE=PASS[+PASS],..."),
]
Atol = Annotated[float | None, typer.Option("--atol", help="Absolute tolerance vs PyTorch (default: per module, 1e-4).")]
Validate = Annotated[bool, typer.Option("--validate/--no-validate", help="Compare every graph with PyTorch.")]
RequireValidation = Annotated[
    bool, typer.Option("--require-validation", help="Exit 1 when a backend could not be validated here.")
]


def convert_options(
    output: Path,
    backends: list[str] | None,
    passes: str | None,
    atol: float | None,
    validate: bool,
    require_validation: bool,
    backend_options: list[str] | None = None,
) -> ConvertOptions:
    return ConvertOptions(
        output_dir=output,
        backends=tuple(dict.fromkeys(backends or ())),
        passes=parse_pass_policy(passes or ""),
        validate=validate,
        atol=atol,
        require_validation=require_validation,
        backend_options=parse_option_items(backend_options),
    )
