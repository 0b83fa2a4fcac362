"""The mobile backend as a user meets it: fixed-shape .ort files that ONNX Runtime loads and that agree
with the model, the operator list for a reduced build, and a plain report on NNAPI and CoreML."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from converter_core.errors import InputError
from converter_core.pipeline import ConvertOptions, convert
from converter_core.plugins import load_plugins
from converter_core.specs import ExportedModule, ModuleSpec, ShapeCase, TensorSpec
from plugins.backends.mobile import MobileBackend
from tests.conftest import prepare, run_cli


@pytest.fixture
def toy(plugin_site):
    plugin_site("toy_vlm_plugin", "toy-vlm-plugin", "toy")
    import toy_vlm_plugin

    return toy_vlm_plugin


def _by_hand(model, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The toy's encoder and head computed from its weights, not through any graph."""
    x = torch.from_numpy(features)
    linear, _, norm = model.encoder
    hidden = torch.nn.functional.layer_norm(
        torch.nn.functional.gelu(x @ linear.weight.T + linear.bias), (x.shape[-1],), norm.weight, norm.bias, norm.eps
    )
    logits = hidden.mean(dim=1) @ model.head.weight.T + model.head.bias
    return hidden.detach().numpy(), logits.detach().numpy()


def _nnapi_supported() -> set[str]:
    """The ops onnxruntime's NNAPI table lists, read straight from the file its checker reads."""
    import onnxruntime.tools.mobile_helpers as helpers

    table = (Path(helpers.__file__).parent / "nnapi_supported_ops.md").read_text()
    return {line.split("|")[1].strip().split(":")[-1] for line in table.splitlines() if line.startswith("|ai.onnx:")}


def test_convert_toy_for_mobile_writes_ort_models_that_match_the_model(toy, tmp_path: Path):
    out = tmp_path / "out"
    result = run_cli("toy", "-o", str(out), "--backend", "mobile")
    assert result.returncode == 0, result.stderr

    # Batch 1 on a device; tokens at the opt size of the toy's range (1, 16, 64).
    encoder = ort.InferenceSession(str(out / "mobile" / "encoder.ort"), providers=["CPUExecutionProvider"])
    head = ort.InferenceSession(str(out / "mobile" / "head.ort"), providers=["CPUExecutionProvider"])
    assert encoder.get_inputs()[0].shape == [1, 16, 8]
    features = np.random.default_rng(11).standard_normal((1, 16, 8)).astype(np.float32)
    hidden_expected, logits_expected = _by_hand(toy.ToyModel(0), features)
    (hidden,) = encoder.run(None, {"features": features})
    (logits,) = head.run(None, {"hidden": hidden})
    np.testing.assert_allclose(hidden, hidden_expected, atol=1e-5)
    np.testing.assert_allclose(logits, logits_expected, atol=1e-5)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        encoder.run(None, {"features": features[:, :5]})  # a fixed-shape model takes its shape only

    operators = (out / "mobile" / "required_operators.config").read_text()
    assert "LayerNormalization" in operators and "ReduceMean" in operators  # one from each toy graph
    assert str(tmp_path) not in operators  # no path of the machine that converted

    report = json.loads((out / "mobile" / "usability.json").read_text())
    nnapi = report["encoder"]["execution_providers"]["NNAPI"]
    # The toy's encoder has a LayerNormalization; NNAPI's table has none, so it must stop NNAPI there.
    assert "Add" in _nnapi_supported() and "LayerNormalization" not in _nnapi_supported()
    assert "ai.onnx:LayerNormalization" in nnapi["unsupported_ops"]
    assert nnapi["nodes_left_on_cpu"]["LayerNormalization"] == ["node_layer_norm"]
    assert nnapi["partitions"] == len(nnapi["partition_sizes"]) >= 1
    assert set(report["head"]["execution_providers"]) == {"NNAPI", "CoreML MLProgram", "CoreML NeuralNetwork"}
    markdown = (out / "mobile" / "usability.md").read_text()
    assert "## encoder (features 1x16x8)" in markdown and "LayerNormalization (node_layer_norm)" in markdown
    assert "**Recommendation:**" in markdown

    section = json.loads((out / "manifest.json").read_text())["backends"]["mobile"]
    assert section["status"] == "passed"
    # No PyTorch case of the toy has batch=1 tokens=16: the reference says so instead of claiming PyTorch.
    assert section["details"]["modules"]["encoder"]["reference"] == "exported-onnx"
    assert "no PyTorch case has that shape" in section["reason"]
    tokens = section["config"]["modules"]["encoder"]["sizes"]["tokens"]
    assert tokens == {"size": 16, "from": "opt of the axis range (spec)"}
    assert sorted(section["files"]) == sorted([
        "mobile/encoder.ort", "mobile/head.ort", "mobile/required_operators.config", "mobile/usability.json",
        "mobile/usability.md", "mobile/mobile.json",
    ])


def test_a_fixed_shape_that_pytorch_was_run_at_is_checked_against_pytorch(toy, tmp_path: Path):
    out = tmp_path / "out"
    options = ConvertOptions(out, backends=("mobile",), backend_options={"fixed_sizes": {"tokens": 1}})
    result = convert(toy.ToyModel(0), options, load_plugins())
    assert result.exit_code == 0
    validation = result.backends["mobile"].validation
    assert validation.status == "passed"
    # The toy's cases include batch=1 tokens=1, so both modules are compared with PyTorch itself.
    for module in ("encoder", "head"):
        assert validation.details["modules"][module]["reference"] == "pytorch"
        assert validation.details["modules"][module]["cases"] == ["batch=1 tokens=1"]
    session = ort.InferenceSession(str(out / "mobile" / "head.ort"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 1, 8]


def test_an_axis_without_a_size_is_an_error_naming_module_and_axis(tmp_path: Path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["ids"], ["out"], name="relu")], "g",
        [helper.make_tensor_value_info("ids", TensorProto.FLOAT, ["batch", "text"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "text"])],
    )
    path = tmp_path / "texty.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    tensor = TensorSpec("ids", "float32", ("batch", "text"))
    spec = ModuleSpec("texty", (tensor,), (TensorSpec("out", "float32", ("batch", "text")),), ShapeCase("-", {}), [])
    with pytest.raises(InputError, match="module 'texty' has no size for its dynamic axis 'text'"):
        prepare(MobileBackend(), [ExportedModule(spec, path)], tmp_path)
    artifacts = prepare(MobileBackend(), [ExportedModule(spec, path)], tmp_path, {"fixed_sizes": {"text": 7}})
    assert artifacts.config["modules"]["texty"]["inputs"] == {"ids": [1, 7]}
