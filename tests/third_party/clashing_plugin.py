"""A plugin that registers a backend named like the built-in one and a command named like the toy's."""

import typer

from converter_core import hookimpl
from plugins.backends.cpu import CpuBackend


@hookimpl
def converter_register_backends(register):
    register(CpuBackend())


@hookimpl
def converter_register_commands(cli: typer.Typer) -> None:
    @cli.command("toy")
    def another_toy() -> None:
        """Clashes with the toy plugin's command."""
