"""The tensorrt backend as a user meets it: on a machine without TensorRT it writes a configuration that
is ready for one, says plainly why it could not check it, and never pretends it did."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converter_core.errors import InputError
from converter_core.specs import (
    BackendArtifacts,
    ExportedModule,
    Gate,
    ModuleReferences,
    ModuleSpec,
    Reference,
    ShapeCase,
    TensorSpec,
)
from plugins.backends import tensorrt
from plugins.backends.tensorrt import TensorrtBackend, TensorrtOptions, provider_options
from plugins.backends.tensorrt_environment import TensorrtEnvironment, probe
from plugins.backends.tensorrt_graph_check import check_graph
from tests.conftest import prepare, run_cli, validate


@pytest.fixture
def toy(plugin_site):
    plugin_site("toy_vlm_plugin", "toy-vlm-plugin", "toy")
    import toy_vlm_plugin

    return toy_vlm_plugin


@pytest.fixture(autouse=True)
def fresh_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Each test looks at the machine afresh, and engine caches go to a directory of its own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    probe.cache_clear()
    yield
    probe.cache_clear()


def test_convert_toy_writes_profiles_and_reports_the_missing_provider(toy, tmp_path: Path):
    out = tmp_path / "out"
    result = run_cli("toy", "-o", str(out), "--backend", "tensorrt")
    assert result.returncode == 0, result.stderr

    manifest = json.loads((out / "manifest.json").read_text())
    section = manifest["backends"]["tensorrt"]
    assert section["status"] == "skipped"
    assert section["available"] is False
    assert "TensorrtExecutionProvider is not among this onnxruntime's providers" in section["reason"]
    for provider in ort.get_available_providers():
        assert provider in section["reason"]
    assert "TensorRT 10" in section["reason"]

    # The toy declares batch (1, 2, 8) and tokens (1, 16, 64); its last axis is 8 wide.
    session = json.loads((out / "tensorrt" / "session.json").read_text())
    assert session == section["config"]  # the manifest records the configuration as written
    encoder = session["modules"]["encoder"]["provider_options"]
    assert encoder["trt_profile_min_shapes"] == "features:1x1x8"
    assert encoder["trt_profile_opt_shapes"] == "features:2x16x8"
    assert encoder["trt_profile_max_shapes"] == "features:8x64x8"
    head = session["modules"]["head"]["provider_options"]
    assert (head["trt_profile_min_shapes"], head["trt_profile_max_shapes"]) == ("hidden:1x1x8", "hidden:8x64x8")
    assert encoder["trt_fp16_enable"] == "False" and session["precision"] == "fp32"
    assert encoder["trt_max_workspace_size"] == str(4 * 2**30)
    assert all(isinstance(value, str) for value in encoder.values())  # what the EP's C API takes
    cache = Path(encoder["trt_engine_cache_path"])
    assert cache.is_dir() and cache.is_relative_to(tmp_path / "cache" / "vlm-converter" / "tensorrt")
    assert encoder["trt_engine_cache_path"] != head["trt_engine_cache_path"]
    assert encoder["trt_timing_cache_path"] == head["trt_timing_cache_path"]  # timings are shared across models
    precheck = json.loads((out / "tensorrt" / "precheck.json").read_text())
    assert precheck["encoder"]["whole_graph"] and precheck["head"]["whole_graph"]
    assert sorted(section["files"]) == ["tensorrt/precheck.json", "tensorrt/session.json"]

    strict = run_cli("toy", "-o", str(tmp_path / "strict"), "--backend", "tensorrt", "--require-validation")
    assert strict.returncode == 1
    assert "backend tensorrt was not validated" in " ".join(strict.stderr.split())


def test_availability_is_decided_by_a_session_not_by_the_provider_list(monkeypatch: pytest.MonkeyPatch):
    availability = TensorrtBackend().availability()
    assert availability.available is False
    assert f"providers: {', '.join(ort.get_available_providers())}" in availability.reason
    for library in ("libnvinfer.so.10", "libnvonnxparser.so.10", "libcudnn.so.9", "libcublas.so.13"):
        assert library in availability.reason

    # onnxruntime-gpu on a machine without a GPU lists the EP, and a session asked for it runs on CPU.
    probe.cache_clear()
    listed = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: listed)
    with pytest.warns(UserWarning):
        availability = TensorrtBackend().availability()
    assert availability.available is False
    assert "TensorrtExecutionProvider is listed by" in availability.reason
    assert "a session asked for it runs on CPUExecutionProvider" in availability.reason


def _graph_with_if_and_unique() -> onnx.ModelProto:
    then_branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["then_out"], name="keep")], "then",
        [], [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, ["n"])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["else_out"], name="flip")], "else",
        [], [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, ["n"])],
    )
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0, name="sum"),
            helper.make_node("Greater", ["total", "zero"], ["positive"], name="is_positive"),
            helper.make_node("If", ["positive"], ["chosen"], then_branch=then_branch, else_branch=else_branch,
                             name="choose_branch"),
            helper.make_node("Unique", ["ids"], ["unique_ids"], name="dedupe"),
        ],
        "control_flow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("chosen", TensorProto.FLOAT, ["n"]),
         helper.make_tensor_value_info("unique_ids", TensorProto.INT64, [None])],
        [numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _module(tmp_path: Path, model: onnx.ModelProto, name: str, axis_ranges: dict) -> ExportedModule:
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    inputs = tuple(
        TensorSpec(v.name, "float32" if v.type.tensor_type.elem_type == TensorProto.FLOAT else "int64",
                   tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim))
        for v in model.graph.input
    )
    outputs = tuple(TensorSpec(v.name, "float32", ()) for v in model.graph.output)
    example = ShapeCase("none", {})
    return ExportedModule(ModuleSpec(name, inputs, outputs, example, [], axis_ranges=axis_ranges), path)


def test_the_precheck_names_what_tensorrt_cannot_take_before_any_build(tmp_path: Path):
    module = _module(tmp_path, _graph_with_if_and_unique(), "branchy", {"n": (1, 4, 16)})
    artifacts = prepare(TensorrtBackend(), [module], tmp_path, {})

    findings = json.loads((tmp_path / "tensorrt" / "precheck.json").read_text())["branchy"]["findings"]
    by_node = {f.get("node"): f for f in findings}
    assert by_node["choose_branch"]["op"] == "If" and by_node["choose_branch"]["kind"] == "control-flow"
    assert by_node["dedupe"] == {**by_node["dedupe"], "op": "Unique", "severity": "unsupported"}
    assert "choose_branch/then_branch/keep" not in by_node  # an Identity in a branch is fine, not reported
    notes = " ".join(f["detail"] for f in findings if f["kind"] == "int64")
    assert "ids" in notes and "unique_ids" in notes
    assert artifacts.config["modules"]["branchy"]["whole_graph_in_tensorrt"] is False
    assert "dedupe (Unique)" in artifacts.config["modules"]["branchy"]["precheck"]
    # An unnamed node (hand-written graphs, like the toy's head, have them) is found by op and position.
    unnamed = helper.make_graph([helper.make_node("Unique", ["x"], ["y"])], "g",
                                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])])
    (finding,) = check_graph(helper.make_model(unnamed, opset_imports=[helper.make_opsetid("", 17)]), "m").findings
    assert finding.node == "<unnamed Unique #0>"


def _layer_norms() -> onnx.ModelProto:
    """A decomposed layer norm (Pow feeding ReduceMean) next to an ONNX LayerNormalization."""
    graph = helper.make_graph(
        [
            helper.make_node("Pow", ["x", "two"], ["squares"], name="square"),
            helper.make_node("ReduceMean", ["squares", "last"], ["variance"], name="mean_square"),
            helper.make_node("LayerNormalization", ["x", "scale"], ["normed"], axis=-1, name="norm"),
            helper.make_node("Add", ["normed", "variance"], ["y"], name="mix"),
        ],
        "norms",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two"),
         numpy_helper.from_array(np.array([-1], dtype=np.int64), "last"),
         numpy_helper.from_array(np.ones(4, dtype=np.float32), "scale")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_fp16_keeps_layer_norms_in_float32_and_int8_needs_a_quantised_graph(tmp_path: Path):
    module = _module(tmp_path, _layer_norms(), "norms", {"batch": (1, 2, 4)})
    config = prepare(TensorrtBackend(), [module], tmp_path, {"precision": "fp16"}).config
    options = config["modules"]["norms"]["provider_options"]
    assert options["trt_fp16_enable"] == "True" and options["trt_layer_norm_fp32_fallback"] == "True"
    kept = {entry["node"] for entry in config["modules"]["norms"]["fp32_nodes"]}
    assert kept == {"square", "mean_square", "norm"}

    with pytest.raises(InputError, match="int8 needs a quantised graph.*norms has none"):
        prepare(TensorrtBackend(), [module], tmp_path, {"precision": "int8"})
    with pytest.raises(InputError, match="precision='bf17': expected one of 'fp32', 'fp16', 'int8'"):
        prepare(TensorrtBackend(), [module], tmp_path, {"precision": "bf17"})


def test_an_axis_without_a_range_is_an_error_naming_module_and_axis(tmp_path: Path):
    module = _module(tmp_path, _layer_norms(), "norms", {})
    with pytest.raises(InputError, match="module 'norms' has no size range for its dynamic axis 'batch'"):
        prepare(TensorrtBackend(), [module], tmp_path, {})
    # `--backend-option axis_ranges.batch=1,1,2` supplies it, and the configuration says so.
    config = prepare(TensorrtBackend(), [module], tmp_path, {"axis_ranges.batch": "1,1,2"}).config
    assert config["modules"]["norms"]["axis_ranges"]["batch"] == {"min": 1, "opt": 1, "max": 2, "from": "option"}
    assert config["modules"]["norms"]["provider_options"]["trt_profile_max_shapes"] == "x:2x4"


def _machine(gpu: str = "NVIDIA H100 80GB HBM3") -> TensorrtEnvironment:
    return TensorrtEnvironment("onnxruntime-gpu 1.31.1", ("TensorrtExecutionProvider",), ("TensorrtExecutionProvider",),
                               None, gpu, "nvidia-smi", {}, "10.16.1")


def test_a_cache_is_reused_only_for_the_same_model_options_and_machine(tmp_path: Path):
    spec = _module(tmp_path, _layer_norms(), "norms", {}).spec
    ranges = {"batch": (1, 2, 4)}
    cache = {"cache_dir": tmp_path / "c"}

    def engine_dir(sha="a" * 64, options=None, machine=None, ranges=ranges):
        typed = TensorrtOptions(**{**cache, **(options or {})})
        chosen, _ = provider_options(spec, ranges, sha, typed, machine or _machine())
        return chosen["trt_engine_cache_path"], chosen["trt_timing_cache_path"]

    engine, timing = engine_dir()
    assert engine_dir() == (engine, timing)  # same model, options and machine: the cache is found again
    assert engine_dir(sha="b" * 64)[0] != engine  # another model
    assert engine_dir(sha="b" * 64)[1] == timing  # ... shares the kernel timings
    assert engine_dir(options={"precision": "fp16"})[0] != engine
    assert engine_dir(options={"workspace_gib": 8})[0] != engine
    assert engine_dir(ranges={"batch": (1, 2, 8)})[0] != engine
    other_gpu = engine_dir(machine=_machine("NVIDIA L4"))
    assert other_gpu[0] != engine and other_gpu[1] != timing


CPU_SESSION = ort.InferenceSession


class CpuStandIn:
    """Stands in for a TensorRT session so that `validate`'s own logic runs here: it computes on the CPU
    EP (optionally off by `error`) and reports TensorRT as its provider, as a working EP would."""

    error = 0.0
    noise = 0.0  # times a standard normal, element by element

    def __init__(self, path, sess_options=None, providers=()):
        assert providers[0][0] == "TensorrtExecutionProvider"
        self.session = CPU_SESSION(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    def get_providers(self):
        return ["TensorrtExecutionProvider", "CPUExecutionProvider"]

    def get_outputs(self):
        return self.session.get_outputs()

    def run(self, names, inputs):
        rng = np.random.default_rng(0)
        return [(out + self.error + self.noise * rng.standard_normal(out.shape)).astype(out.dtype)
                for out in self.session.run(names, inputs)]


def test_validate_compares_every_case_inside_the_profile_with_pytorch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    module = _module(tmp_path, _layer_norms(), "norms", {"batch": (1, 2, 4)})
    backend = TensorrtBackend()
    artifacts: BackendArtifacts = prepare(backend, [module], tmp_path)
    # PyTorch's answer, computed by hand with numpy: layer norm of x plus the mean of its squares.
    cases = []
    for batch in (1, 3, 6):  # 6 lies outside the profile's max of 4
        x = np.random.default_rng(batch).standard_normal((batch, 4)).astype(np.float32)
        normed = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
        cases.append(Reference(ShapeCase(f"batch={batch}", {"x": x}), {"y": normed + (x**2).mean(-1, keepdims=True)}))
    references = {"norms": ModuleReferences(module.spec, 1e-5, cases)}

    skipped = validate(backend, artifacts, tmp_path, references)
    assert skipped.status == "skipped" and "CPUExecutionProvider" in skipped.reason

    monkeypatch.setattr(tensorrt, "probe", lambda: _machine())
    monkeypatch.setattr(ort, "InferenceSession", CpuStandIn)
    passed = validate(backend, artifacts, tmp_path, references)
    assert passed.status == "passed", passed.reason
    record = passed.details["modules"]["norms"]
    assert record["cases"] == ["batch=1", "batch=3"] and record["outside_profile"] == ["batch=6"]
    assert record["outputs"]["y"]["max_abs_diff"] < 1e-5

    monkeypatch.setattr(CpuStandIn, "error", 0.05)  # beyond fp32's 1e-3 + 1e-3 * |y|
    failed = validate(backend, artifacts, tmp_path, references)
    assert failed.status == "failed" and "norms: output 'y' at batch=1" in failed.reason
    assert failed.details["modules"]["norms"]["outputs"]["y"]["max_abs_diff"] == pytest.approx(0.05, rel=1e-3)


def test_a_module_a_kept_int8_pass_changed_is_judged_by_its_gates_on_tensorrt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """As in every other backend: the float tolerance for float graphs, the module's gates for a graph
    an INT8/fp16 pass changed on purpose (its drifted copy of the comparison had ignored them)."""
    module = _module(tmp_path, _layer_norms(), "norms", {"batch": (1, 2, 4)})
    spec = dataclasses.replace(module.spec, gates=(Gate("y", "cosine", 0.999),))
    module = dataclasses.replace(module, spec=spec)
    cases = []
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 4)).astype(np.float32)
        normed = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
        cases.append(Reference(ShapeCase(f"batch={batch}", {"x": x}), {"y": normed + (x**2).mean(-1, keepdims=True)}))
    float_refs = ModuleReferences(spec, 1e-5, cases)
    int8_refs = dataclasses.replace(float_refs, by_gates=True)
    backend = TensorrtBackend()
    artifacts = prepare(backend, [module], tmp_path)
    monkeypatch.setattr(tensorrt, "probe", lambda: _machine())
    monkeypatch.setattr(ort, "InferenceSession", CpuStandIn)
    monkeypatch.setattr(CpuStandIn, "error", 0.02)  # an INT8 engine's kind of difference: cosine ~0.9999

    assert validate(backend, artifacts, tmp_path, {"norms": float_refs}).status == "failed"
    passed = validate(backend, artifacts, tmp_path, {"norms": int8_refs})
    assert passed.status == "passed", passed.reason
    record = passed.details["modules"]["norms"]
    assert record["judged_by_gates"]["y:cosine"] >= 0.999 and record["max_abs_diff"] > 1e-3

    monkeypatch.setattr(CpuStandIn, "noise", 0.5)  # a broken engine
    failed = validate(backend, artifacts, tmp_path, {"norms": int8_refs})
    assert failed.status == "failed" and "gate failed: y:cosine" in failed.reason
