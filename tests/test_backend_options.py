"""Backend options as a user types them: typed, checked, scoped, listed; a misspelt one is never ignored."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from converter_core.errors import InputError
from converter_core.options import option_table, parse_option_items, resolve_backend_options
from plugins.backends.cpu import CpuOptions
from plugins.backends.tensorrt import TensorrtOptions
from tests.conftest import run_cli


@pytest.fixture
def toy(plugin_site):
    plugin_site("toy_vlm_plugin", "toy-vlm-plugin", "toy")


def one_line(text: str) -> str:
    return " ".join(text.split())


def test_a_misspelt_option_is_exit_2_naming_the_backend_and_its_options(toy, tmp_path: Path):
    result = run_cli("toy", "-o", str(tmp_path / "out"), "--backend", "tensorrt", "--backend-option", "precison=fp16")
    assert result.returncode == 2
    message = one_line(result.stderr)
    assert "unknown backend option 'precison'" in message
    assert "backend tensorrt takes precision, workspace_gib, cache_dir, axis_ranges" in message
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_a_scoped_option_reaches_only_its_backend(toy, tmp_path: Path):
    out = tmp_path / "out"
    result = run_cli("toy", "-o", str(out), "--backend", "tensorrt", "--backend", "cpu",
                     "--backend-option", "tensorrt.precision=fp16", "--backend-option", "cpu.threads=1")
    assert result.returncode == 0, result.stderr
    backends = json.loads((out / "manifest.json").read_text())["backends"]
    assert backends["tensorrt"]["options"]["precision"] == "fp16"
    assert backends["tensorrt"]["config"]["precision"] == "fp16"
    assert backends["cpu"]["options"] == {"threads": 1}
    assert backends["cpu"]["config"]["intra_op_num_threads"] == 1


@pytest.mark.parametrize("item, expected", [
    ("tensorrt.precision=bf17", "backend tensorrt: option precision='bf17': expected one of 'fp32', 'fp16', 'int8'"),
    ("cpu.threads=two", "backend cpu: option threads='two': expected an integer"),
    ("cpu.threads=-1", "backend cpu: threads must be >= 0, got -1"),
    ("tensorrt.workspace_gib=nan", "option workspace_gib='nan': expected a finite number"),
    ("mobile.fixed_sizes.batch=1", "unknown backend option 'mobile.fixed_sizes.batch' (backends asked for: tensorrt, cpu)"),
    ("threads", "bad --backend-option 'threads': expected KEY=VALUE"),
])
def test_a_bad_value_is_exit_2_with_one_line(toy, tmp_path: Path, item: str, expected: str):
    result = run_cli("toy", "-o", str(tmp_path / "out"), "--backend", "tensorrt", "--backend", "cpu",
                     "--backend-option", item)
    assert result.returncode == 2, result.stderr
    assert expected in one_line(result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_an_unscoped_key_goes_to_every_backend_that_has_it():
    options = resolve_backend_options({"tensorrt": TensorrtOptions, "cpu": CpuOptions},
                                      parse_option_items(["axis_ranges.batch=1,2,8", "threads=3"]))
    assert options["tensorrt"].axis_ranges == {"batch": (1, 2, 8)}
    assert options["cpu"] == CpuOptions(threads=3)
    with pytest.raises(InputError, match="axis_ranges.batch='1,2'.*expected 3 comma-separated values"):
        resolve_backend_options({"tensorrt": TensorrtOptions}, {"axis_ranges.batch": "1,2"})


def test_python_callers_may_pass_the_options_object():
    given = TensorrtOptions(precision="fp16")
    assert resolve_backend_options({"tensorrt": TensorrtOptions}, {"tensorrt": given})["tensorrt"] is given


@dataclass(frozen=True)
class Every:
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    sizes: tuple[int, ...] = (1,)
    where: Path | None = None
    table: dict[str, float] = field(default_factory=dict)


def test_every_supported_type_reads_from_text():
    options = resolve_backend_options({"x": Every}, parse_option_items(
        ["flag=yes", "mode=b", "sizes=1,2,4", "where=~/cache", "table.alpha=0.5", "table.beta=2"]))["x"]
    assert options == Every(True, "b", (1, 2, 4), Path("~/cache").expanduser(), {"alpha": 0.5, "beta": 2.0})
    rows = {row["name"]: row for row in option_table(Every)}
    assert rows["mode"]["type"] == "'a' | 'b'" and rows["sizes"]["type"] == "(int, ...)"
    assert rows["where"]["type"] == "Path | none" and rows["table"]["default"] == {}
    with pytest.raises(InputError, match="flag='maybe': expected true or false"):
        resolve_backend_options({"x": Every}, {"flag": "maybe"})


def test_convert_backends_lists_each_backends_options_with_types_and_defaults():
    result = run_cli("backends", "--json")
    assert result.returncode == 0, result.stderr
    backends = {row["name"]: row for row in json.loads(result.stdout)}
    tensorrt = {option["name"]: option for option in backends["tensorrt"]["options"]}
    assert tensorrt["precision"] == {**tensorrt["precision"], "type": "'fp32' | 'fp16' | 'int8'", "default": "fp32"}
    assert tensorrt["workspace_gib"]["default"] == 4.0 and tensorrt["workspace_gib"]["help"]
    assert {option["name"] for option in backends["mobile"]["options"]} == {
        "fixed_sizes", "axis_ranges", "ort_optimization_style"}
    assert backends["cpu"]["options"][0]["name"] == "threads"
