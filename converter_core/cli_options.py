"""Options every model command shares, so that `convert blip` and a third party's command agree."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from converter_core.errors import InputError
from converter_core.pipeline import ConvertOptions, parse_pass_policy

OutputDir = Annotated[Path, typer.Option("--output", "-o", help="Output directory, replaced atomically.")]
Backends = Annotated[
    list[str] | None,
    typer.Option("--backend", "-b", help="Backend to prepare and validate (repeatable); see `convert backends`."),
]
BackendOptions = Annotated[
    list[str] | None,
    typer.Option("--backend-option", help="KEY=VALUE for the backends (repeatable), e.g. precision=fp16."),
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


def parse_backend_options(items: list[str] | None) -> dict[str, Any]:
    """`KEY=VALUE` strings to a dict; values that read as int or float become numbers."""
    options: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"bad --backend-option {item!r}: expected KEY=VALUE")
        for kind in (int, float):
            try:
                options[key.strip()] = kind(value)
                break
            except ValueError:
                options[key.strip()] = value.strip()
    return options


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
        backend_options=parse_backend_options(backend_options),
    )
