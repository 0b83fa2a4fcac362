"""The `convert` command: listings of hooks, plugins and backends, plus every plugin's commands.

Exit codes: 0 ok, 1 a check failed, 2 bad input or usage, 3 an internal error (a bug: rerun with
--debug for the traceback).
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import traceback
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from converter_core import hookspecs
from converter_core.console import stderr, stdout, verbosity
from converter_core.errors import (
    CheckFailed,
    ConverterError,
    EnvironmentFailure,
    InputError,
    PluginError,
    environment_error,
)
from converter_core.options import option_table
from converter_core.plugins import (
    PluginFailure,
    PluginHost,
    collect_backends,
    get_plugin_manager,
    hook_descriptions,
    implementers,
)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
BUILTIN_COMMANDS = ("hooks", "plugins", "backends")


def _global_options(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show every stage and difference.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Show only errors.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Turn PyTorch vision-language models into verified ONNX artifacts."""
    verbosity.verbose, verbosity.quiet, verbosity.debug = verbose, quiet and not verbose, debug


def _print(rows: Any, table: Table, as_json: bool) -> None:
    if as_json:
        stdout.print_json(json.dumps(rows))
    else:
        stdout.print(table)


def _hooks_command(app: typer.Typer, host: PluginHost) -> None:
    @app.command("hooks")
    def list_hooks(as_json: JsonFlag = False) -> None:
        """List every hook, what it is for, and which plugins implement it."""
        rows = [
            {
                "name": name,
                "description": description,
                "firstresult": bool(getattr(hookspecs, name).vlm_converter_spec.get("firstresult")),
                "implemented_by": implementers(host, name),
            }
            for name, description in hook_descriptions().items()
        ]
        table = Table("hook", "description", "implemented by")
        for row in rows:
            table.add_row(row["name"], row["description"], ", ".join(row["implemented_by"]) or "-")
        _print(rows, table, as_json)


def _plugins_command(app: typer.Typer, host: PluginHost) -> None:
    @app.command("plugins")
    def list_plugins(as_json: JsonFlag = False) -> None:
        """List installed plugins: distribution, version, entry point, hooks; and the ones that failed."""
        rows = {
            "plugins": [vars(p) for p in host.plugins],
            "failed": [{k: v for k, v in vars(f).items() if k != "detail"} for f in host.failures],
        }
        table = Table("plugin", "distribution", "version", "entry point", "hooks")
        for p in host.plugins:
            table.add_row(p.name, p.distribution, p.version, p.entry_point, "\n".join(p.hooks))
        for f in host.failures:
            table.add_row(f.name, f.distribution, "-", f.entry_point, f"[red]{escape(f.error)}[/red]")
        _print(rows, table, as_json)


def _backends_command(app: typer.Typer, host: PluginHost) -> None:
    @app.command("backends")
    def list_backends(as_json: JsonFlag = False) -> None:
        """List backends, the plugin providing each, and whether it can run on this machine."""
        rows = []
        known = len(host.failures)
        backends = collect_backends(host, strict=False)
        for failure in host.failures[known:]:  # clashes: shown, and the listing goes on
            stderr.print(f"[yellow]warning:[/yellow] {escape(failure.message())}", highlight=False)
        for name, (backend, plugin) in sorted(backends.items()):
            availability = backend.availability()
            rows.append({
                "name": name, "plugin": plugin, "description": backend.description,
                "available": availability.available, "reason": availability.reason,
                "options": option_table(backend.options_type),
            })
        table = Table("backend", "plugin", "runs here", "why / on what", "options (--backend-option NAME.KEY=VALUE)")
        for row in rows:
            options = "\n".join(f"{o['name']}: {o['type']} = {o['default']!r}" for o in row["options"]) or "-"
            table.add_row(row["name"], row["plugin"], "yes" if row["available"] else "[red]no[/red]", row["reason"],
                          escape(options))
        _print(rows, table, as_json)


def _merge_plugin_commands(app: typer.Typer, host: PluginHost) -> None:
    """Every plugin's commands, merged into `app`. A plugin whose commands fail to register, or a name
    two plugins claim (or one of the built-in listings), is left out with a warning naming both: one
    broken plugin must not take the whole CLI down, and neither claimant silently wins."""
    claims: dict[str, list[tuple[str, object]]] = {name: [("converter_core", None)] for name in BUILTIN_COMMANDS}
    for impl in host.hook.converter_register_commands.get_hookimpls():
        label = host.plugin_label(impl.plugin)
        plugin_app = typer.Typer()
        try:
            impl.function(cli=plugin_app)
        except BaseException as exc:  # noqa: BLE001 - not even sys.exit() in a plugin may end the CLI
            host.failures.append(PluginFailure(
                host.manager.get_name(impl.plugin) or label, label, "converter_register_commands",
                f"did not add its commands: {type(exc).__name__}: {exc}", traceback.format_exc(),
            ))
            continue
        entries = [(info.name or info.callback.__name__.replace("_", "-"), info) for info in plugin_app.registered_commands]
        entries += [(group.name or group.typer_instance.info.name, group) for group in plugin_app.registered_groups]
        for name, entry in entries:
            entry.name = name
            claims.setdefault(name, []).append((label, entry))
    for name, claimants in claims.items():
        if len(claimants) > 1:
            owners = " and ".join(label for label, _ in claimants)
            kept = "the built-in command stays" if claimants[0][1] is None else "neither is added"
            host.failures.append(PluginFailure(claimants[-1][0], claimants[-1][0], "converter_register_commands",
                                               f"clashes: the command {name!r} is claimed by {owners}; {kept}; "
                                               "uninstall one of them"))
            continue
        (_, entry), = claimants
        if entry is not None:
            (app.registered_groups if hasattr(entry, "typer_instance") else app.registered_commands).append(entry)


def build_app(host: PluginHost) -> typer.Typer:
    app = typer.Typer(
        name="convert",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode="rich",
    )
    app.callback()(_global_options)
    for add_listing in (_hooks_command, _plugins_command, _backends_command):
        add_listing(app, host)
    _merge_plugin_commands(app, host)
    return app


def _fail(message: str, code: int) -> int:
    stderr.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    if verbosity.debug:
        stderr.print(traceback.format_exc(), highlight=False, markup=False)
    return code


class Terminated(BaseException):
    """SIGTERM, handled like Ctrl-C: the run stops, its staging folder goes, an earlier output stays.
    A BaseException, so that no `except Exception` in plugin code swallows it (and Typer, which
    turns KeyboardInterrupt into exit 130, lets it through)."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code instead of exiting."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbosity.debug = "--debug" in argv
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return _run(argv)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str]) -> int:
    try:
        host = get_plugin_manager()
        app = build_app(host)
        for failure in host.failures:
            stderr.print(f"[yellow]warning:[/yellow] {escape(failure.message())}", highlight=False)
            if verbosity.debug and failure.detail:
                stderr.print(failure.detail, highlight=False, markup=False)
        # Standalone mode lets Typer handle usage errors (exit 2), --help and typer.Exit itself;
        # it ends with SystemExit, and lets every other exception through to the handlers below.
        typer.main.get_command(app).main(args=argv, prog_name="convert", standalone_mode=True)
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        stderr.print("interrupted")
        return 128 + signal.SIGINT
    except Terminated:
        stderr.print("terminated")
        return 128 + signal.SIGTERM
    except (InputError, PluginError, EnvironmentFailure) as exc:
        return _fail(str(exc), 2)
    except OSError as exc:  # the machine said no (a full disk, a read-only folder): not a bug, not a check
        return _fail(str(environment_error(exc) or f"environment error: {exc}"), 2)
    except CheckFailed as exc:
        return _fail(str(exc), 1)
    except ConverterError as exc:
        return _fail(str(exc), 1)
    except Exception as exc:
        return _fail(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", 3)


def main() -> None:
    sys.exit(run())
