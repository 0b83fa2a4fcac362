"""Plugins as a third-party author and a user see them: installed, listed, broken, clashing."""

from __future__ import annotations

import json
import re

import pytest

from converter_core import hookspecs
from converter_core.errors import PluginError
from converter_core.plugins import load_plugins
from tests.conftest import REPO, run_cli

ALL_HOOKS = sorted(name for name in dir(hookspecs) if name.startswith("converter_"))


def test_third_party_plugin_adds_a_backend_and_a_command(plugin_site):
    plugin_site("toy_vlm_plugin", "toy-vlm-plugin", "toy")

    listed = run_cli("plugins", "--json")
    assert listed.returncode == 0, listed.stderr
    plugins = {p["name"]: p for p in json.loads(listed.stdout)["plugins"]}
    assert plugins["toy"]["distribution"] == "toy-vlm-plugin"
    assert plugins["toy"]["version"] == "0.1.0"
    assert plugins["toy"]["entry_point"] == "toy_vlm_plugin"
    assert plugins["toy"]["hooks"] == ALL_HOOKS
    assert plugins["backends"]["distribution"] == "vlm-converter"

    backends = {b["name"]: b for b in json.loads(run_cli("backends", "--json").stdout)}
    assert backends["toy-remote"]["available"] is False
    assert backends["toy-remote"]["reason"] == "no toy accelerator is attached to this machine"
    assert backends["toy-remote"]["plugin"] == "toy (toy-vlm-plugin)"
    assert backends["cpu"]["available"] is True

    help_text = run_cli("--help")
    assert help_text.returncode == 0
    assert re.search(r"\btoy\b.*two-module toy model", help_text.stdout)

    table = run_cli("backends")
    assert "toy-remote" in table.stdout and "no toy accelerator" in table.stdout


def test_a_plugin_that_fails_to_import_is_named_and_the_rest_keep_working(plugin_site):
    plugin_site("broken_import_plugin", "broken-plugin", "broken")
    plugin_site("toy_vlm_plugin", "toy-vlm-plugin", "toy")

    result = run_cli("plugins", "--json")
    assert result.returncode == 0
    assert "plugin 'broken' (broken_import_plugin, from broken-plugin) not loaded: import failed: " \
           "ModuleNotFoundError" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    listing = json.loads(result.stdout)
    assert [f["name"] for f in listing["failed"]] == ["broken"]
    assert {"toy", "backends"} <= {p["name"] for p in listing["plugins"]}
    assert "toy" in run_cli("--help").stdout


def test_a_plugin_with_an_unknown_hook_is_refused_by_name(plugin_site):
    plugin_site("misspelt_hook_plugin", "misspelt-plugin", "misspelt")
    result = run_cli("backends", "--json")
    assert result.returncode == 0
    message = " ".join(result.stderr.split())
    assert "plugin 'misspelt' (misspelt_hook_plugin, from misspelt-plugin) not loaded" in message
    assert "implements hooks that do not exist: converter_register_backend" in message
    assert [b["name"] for b in json.loads(result.stdout)] == ["cpu", "mobile", "tensorrt", "triton", "web"]


def test_two_plugins_with_the_same_backend_or_command_name_is_an_error_naming_both(plugin_site, tmp_path):
    plugin_site("toy_vlm_plugin", "toy-vlm-plugin", "toy")
    plugin_site("clashing_plugin", "clashing-plugin", "clashing")

    # The listing still works, so the user can find the culprit, and names both sides of each clash.
    result = run_cli("backends")
    assert result.returncode == 0, result.stderr
    message = " ".join(result.stderr.split())
    assert "the command 'toy' is claimed by clashing (clashing-plugin) and toy (toy-vlm-plugin)" in message
    assert "two plugins register the backend 'cpu': backends (vlm-converter) and clashing (clashing-plugin)" in message
    assert "Traceback" not in result.stderr
    # Neither claimant of a command wins; asking for the contested backend is refused, naming both.
    assert run_cli("toy", "-o", str(tmp_path / "out")).returncode == 2
    host = load_plugins()
    from converter_core.pipeline import ConvertOptions, convert

    with pytest.raises(PluginError, match="two plugins register the backend 'cpu'"):
        convert(object(), ConvertOptions(tmp_path / "out", backends=("cpu",)), host)

    from converter_core.plugins import collect_backends

    try:
        collect_backends(host)
    except PluginError as error:
        assert "two plugins register the backend 'cpu'" in str(error)
        assert "backends (vlm-converter)" in str(error) and "clashing (clashing-plugin)" in str(error)
    else:
        raise AssertionError("a second 'cpu' backend was accepted")


def test_every_hook_is_documented_in_the_readme_and_implemented_somewhere(plugin_site):
    readme = (REPO / "README.md").read_text()
    for hook in ALL_HOOKS:
        assert f"`{hook}" in readme, f"{hook} is not in the README's hook reference"
        assert getattr(hookspecs, hook).__doc__.strip(), f"{hook} has no docstring"

    plugin_site("toy_vlm_plugin", "toy-vlm-plugin", "toy")
    host = load_plugins()
    listing = json.loads(run_cli("hooks", "--json").stdout)
    assert sorted(row["name"] for row in listing) == ALL_HOOKS
    for row in listing:
        assert row["implemented_by"], f"no plugin implements {row['name']}"
        assert row["description"]
    builtin_and_toy = {p.name for p in host.plugins} - {"toy"}
    assert builtin_and_toy, "no built-in plugin was loaded through the entry-point group"


def test_builtin_plugins_load_through_the_entry_point_group():
    pyproject = (REPO / "pyproject.toml").read_text()
    section = pyproject.split("[project.entry-points.vlm_converter]")[1].split("\n[")[0]
    declared = dict(re.findall(r"^(\S+) = \"(\S+)\"", section, flags=re.M))
    host = load_plugins()
    loaded = {p.name: p for p in host.plugins}
    assert declared and set(declared) <= set(loaded)
    for name, module in declared.items():
        assert loaded[name].entry_point == module and loaded[name].distribution == "vlm-converter"
    assert not host.failures


def test_usage_errors_exit_2_without_traceback():
    result = run_cli("no-such-command")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert run_cli("--help").returncode == 0

