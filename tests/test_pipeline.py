"""The whole pipeline on a model that is not BLIP: the toy model of a third-party plugin."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from converter_core import hookimpl
from converter_core.errors import InputError
from converter_core.pipeline import ConvertOptions, PassRequest, convert, parse_pass_policy
from converter_core.plugins import load_plugins
from converter_core.validate import OutputMismatch
from tests.conftest import run_cli


@pytest.fixture
def toy(plugin_site):
    plugin_site("toy_vlm_plugin", "toy-vlm-plugin", "toy")
    import toy_vlm_plugin

    return toy_vlm_plugin


def _pytorch_by_hand(model, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The toy model's two stages computed directly from its weights, not through the wrappers."""
    x = torch.from_numpy(features)
    linear, _, norm = model.encoder
    hidden = torch.nn.functional.layer_norm(
        torch.nn.functional.gelu(x @ linear.weight.T + linear.bias), (x.shape[-1],), norm.weight, norm.bias, norm.eps
    )
    logits = hidden.mean(dim=1) @ model.head.weight.T + model.head.bias
    return hidden.detach().numpy(), logits.detach().numpy()


def test_convert_toy_with_the_cli_writes_verified_graphs_and_a_manifest(toy, tmp_path: Path):
    out = tmp_path / "out"
    result = run_cli("toy", "-o", str(out), "--backend", "cpu", "--backend", "toy-remote")
    assert result.returncode == 0, result.stderr
    assert "encoder" in result.stdout and "passed" in result.stdout  # the summary table

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["model_type"] == "toy"
    assert manifest["not_exported"] == {"decoder": "the toy model has no decoder"}
    assert manifest["toy"] == {"classes": 3}
    assert (out / "labels.txt").read_text() == "zero\none\ntwo\n"
    encoder = manifest["modules"]["encoder"]
    assert encoder["inputs"] == [{"name": "features", "dtype": "float32", "shape": ["batch", "tokens", 8]}]
    assert encoder["validation"]["status"] == "passed"
    assert len(encoder["validation"]["cases"]) == 3
    assert encoder["validation"]["outputs"]["hidden"]["max_abs_diff"] < 1e-5
    assert manifest["modules"]["head"]["validation"]["status"] == "passed"
    assert manifest["backends"]["cpu"]["status"] == "passed"
    assert manifest["backends"]["toy-remote"] == {
        **manifest["backends"]["toy-remote"],
        "status": "skipped", "reason": "no toy accelerator is attached to this machine", "available": False,
    }
    # The backend got the toy plugin's task layer through `converter_backend_tasks`.
    assert manifest["backends"]["toy-remote"]["config"]["task"].startswith("classify token features into 3 classes")
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest["libraries"])

    # The graphs run on sizes the export never saw and agree with the model computed by hand.
    model = toy.ToyModel(0)
    features = np.random.default_rng(7).standard_normal((1, 11, 8)).astype(np.float32)
    hidden_expected, logits_expected = _pytorch_by_hand(model, features)
    (hidden,) = ort.InferenceSession(str(out / "encoder.onnx")).run(None, {"features": features})
    (logits,) = ort.InferenceSession(str(out / "head.onnx")).run(None, {"hidden": hidden})
    np.testing.assert_allclose(hidden, hidden_expected, atol=1e-5)
    np.testing.assert_allclose(logits, logits_expected, atol=1e-5)
    (cpu_hidden,) = ort.InferenceSession(str(out / "cpu" / "encoder.onnx")).run(None, {"features": features})
    np.testing.assert_allclose(cpu_hidden, hidden_expected, atol=1e-5)


def test_require_validation_turns_a_skipped_backend_into_exit_1(toy, tmp_path: Path):
    out = tmp_path / "out"
    result = run_cli("toy", "-o", str(out), "--backend", "toy-remote", "--require-validation")
    assert result.returncode == 1
    assert "toy-remote was not validated" in " ".join(result.stderr.split())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backends"]["toy-remote"]["status"] == "skipped"


def test_no_validate_never_reports_passed(toy, tmp_path: Path):
    out = tmp_path / "out"
    assert run_cli("toy", "-o", str(out), "--no-validate", "--backend", "cpu").returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    statuses = [m["validation"]["status"] for m in manifest["modules"].values()]
    statuses += [b["status"] for b in manifest["backends"].values()]
    assert statuses == ["skipped"] * 3


def test_a_pass_is_kept_within_tolerance_and_reverted_beyond_it(toy, tmp_path: Path):
    host = load_plugins()
    out = tmp_path / "out"
    options = ConvertOptions(out, passes=parse_pass_policy("toy-identity,head=toy-ruin"))
    assert options.passes == (PassRequest("toy-identity"), PassRequest("toy-ruin", ("head",)))
    result = convert(toy.ToyModel(0), options, host)
    assert result.exit_code == 0
    head_passes = {r.pass_name: r for r in result.modules["head"].passes}
    assert head_passes["toy-identity"].kept
    assert not head_passes["toy-ruin"].kept and head_passes["toy-ruin"].reason.startswith("gate failed")
    assert [r.pass_name for r in result.modules["encoder"].passes] == ["toy-identity"]
    # The reverted pass left the head as it was: it still matches the model.
    features = np.random.default_rng(3).standard_normal((2, 4, 8)).astype(np.float32)
    hidden_expected, logits_expected = _pytorch_by_hand(toy.ToyModel(0), features)
    (logits,) = ort.InferenceSession(str(out / "head.onnx")).run(None, {"hidden": hidden_expected})
    np.testing.assert_allclose(logits, logits_expected, atol=1e-5)
    recorded = json.loads((out / "manifest.json").read_text())["modules"]["head"]["passes"]
    assert [(p["pass_name"], p["kept"]) for p in recorded] == [("toy-identity", True), ("toy-ruin", False)]


class WrongHeadExporter:
    """Writes a head graph whose bias is off by 0.01: validation must catch it."""

    @hookimpl
    def converter_export_module(self, wrapper, spec, path):
        if spec.name != "head":
            return None
        import toy_vlm_plugin

        toy_vlm_plugin.converter_export_module(wrapper, spec, path)
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(path))
        for initializer in model.graph.initializer:
            if initializer.name == "bias":
                initializer.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(initializer) + np.float32(0.01), "bias"))
        onnx.save(model, str(path))
        return True


def test_a_graph_that_differs_from_pytorch_fails_with_a_typed_error_and_the_manifest_says_so(toy, tmp_path: Path):
    host = load_plugins()
    host.manager.register(WrongHeadExporter(), name="wrong-head")
    out = tmp_path / "out"
    result = convert(toy.ToyModel(0), ConvertOptions(out), host)
    assert result.exit_code == 1
    (failure,) = result.failures
    assert isinstance(failure, OutputMismatch)
    assert (failure.module, failure.output) == ("head", "logits")
    assert "max abs diff 0.01 > tolerance 1e-05" in str(failure)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["modules"]["head"]["validation"]["status"] == "failed"
    assert manifest["modules"]["head"]["validation"]["outputs"]["logits"]["max_abs_diff"] == pytest.approx(0.01, rel=1e-3)
    assert manifest["modules"]["encoder"]["validation"]["status"] == "passed"


def test_a_failed_run_leaves_an_earlier_good_output_untouched(toy, tmp_path: Path):
    host = load_plugins()
    out = tmp_path / "out"
    convert(toy.ToyModel(0), ConvertOptions(out), host)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def interrupt(stage: str) -> None:
        if stage.startswith("head: exporting"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(toy.ToyModel(1), ConvertOptions(out), host, on_stage=interrupt)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "site"]  # no partial directory left


def test_a_directory_the_tool_did_not_write_is_never_replaced(toy, tmp_path: Path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    result = run_cli("toy", "-o", str(precious))
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert "was not written by vlm-converter" in message and "thesis.tex" in message
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_bad_names_are_input_errors(toy, tmp_path: Path):
    result = run_cli("toy", "-o", str(tmp_path / "out"), "--backend", "warp-drive")
    assert result.returncode == 2
    assert "unknown backend 'warp-drive'; available: cpu, mobile, tensorrt, toy-remote" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="names unknown modules"):
        convert(toy.ToyModel(0), ConvertOptions(tmp_path / "o", passes=parse_pass_policy("decoder=toy-identity")), load_plugins())
    with pytest.raises(InputError, match="no installed plugin can split a str"):
        convert("not a model", ConvertOptions(tmp_path / "o"), load_plugins())


def test_a_pass_that_needs_calibration_gets_the_plans_inputs_and_no_other_pass_makes_them(toy, tmp_path: Path):
    toy.CALIBRATION_CALLS.clear()
    policy = parse_pass_policy("head=toy-calibrated,encoder=toy-identity")
    result = convert(toy.ToyModel(0), ConvertOptions(tmp_path / "a", passes=policy), load_plugins())
    (probe,) = result.modules["head"].passes
    assert probe.details == {"calibration_cases": 4, "labels": ["batch=2 tokens=4"] * 4}
    assert toy.CALIBRATION_CALLS == [("head",)]  # asked once, for the module the static pass runs on

    toy.CALIBRATION_CALLS.clear()
    convert(toy.ToyModel(0), ConvertOptions(tmp_path / "b", passes=parse_pass_policy("toy-identity")), load_plugins())
    assert toy.CALIBRATION_CALLS == []
