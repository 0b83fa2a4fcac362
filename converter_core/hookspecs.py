"""Every hook of vlm-converter. Plugins implement them with `@converter_core.hookimpl`.

The stages, in the order the pipeline calls them: split -> wrap -> export -> passes -> backend
tasks -> backend prepare -> backend validate. The `converter_register_*` hooks are called once when the CLI or the
pipeline starts and hand the plugin a callback; a name registered twice is an error naming both plugins.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from converter_core import hookspec

if TYPE_CHECKING:
    import torch
    import typer

    from converter_core.extension import Backend, GraphPass
    from converter_core.specs import ModuleSpec, SplitPlan


@hookspec(firstresult=True)
def converter_split_model(source: object) -> SplitPlan | None:
    """Split a loaded source model into the modules to export.

    Called once per conversion, first. `source` is whatever object a model command loaded (the
    core does not know its type). A plugin that recognises it returns a `SplitPlan`: the module
    specs (inputs and outputs with named dynamic axes, example and validation inputs, tolerance) and
    the modules it could not export with the reason. Others return None. The first non-None answer wins.
    """


@hookspec(firstresult=True)
def converter_wrap_module(source: object, spec: ModuleSpec) -> torch.nn.Module | None:
    """Return a `torch.nn.Module` whose `forward` is the frozen inference path of one module.

    Called once per module spec after the split. `forward` takes the spec's inputs, as tensors, in
    the spec's order and returns its outputs in the spec's order (a tensor or a tuple). The module
    is exported and is also PyTorch's reference for validation. The first non-None answer wins.
    """


@hookspec(firstresult=True)
def converter_export_module(wrapper: torch.nn.Module, spec: ModuleSpec, path: Path) -> bool | None:
    """Take over the export of one module.

    Called once per module before the core's default exporter (`torch.onnx.export` through
    torch.export with the spec's dynamic axes). Write the ONNX graph to `path` and return True;
    return None to leave the module to the next plugin or the default. The first non-None answer wins.
    """


@hookspec
def converter_register_passes(register: Callable[[GraphPass], None]) -> None:
    """Contribute graph passes by calling `register(pass_object)` once per pass.

    Called once per run. Passes are selected by name on the command line (`--passes`) and applied
    to the modules in the order given. Every implementation is called.
    """


@hookspec
def converter_register_backends(register: Callable[[Backend], None]) -> None:
    """Contribute deployment backends by calling `register(backend_object)` once per backend.

    Called once per run and by `convert backends`. A backend prepares artifacts from the exported
    graphs and validates them (see `converter_core.extension.Backend`). Every implementation is called.
    """


@hookspec(firstresult=True)
def converter_backend_tasks(backend: str, model_type: str) -> object | None:
    """Give a serving backend the model family's task layer: the code that turns requests into graph runs.

    Called once per backend of a conversion, before it prepares. Backends that serve whole tasks
    rather than single graphs ask for it (the `triton` backend for the Python models that run a
    decoding loop, the `web` backend for the browser runtime); what the object must offer is the
    backend's to define (see its module). The answer reaches the backend as `context.tasks`. Return
    None for a backend or model type the plugin does not serve. The first non-None answer wins.
    """


@hookspec
def converter_register_commands(cli: typer.Typer) -> None:
    """Add commands to the `convert` CLI with `@cli.command()` (or `cli.add_typer`).

    Called once when the CLI starts, with a Typer app of the plugin's own whose commands are then
    merged into `convert`; a model plugin adds its conversion command here (`convert blip`).
    Every implementation is called.
    """
