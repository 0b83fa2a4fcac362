"""The triton backend as a user meets it: a model repository that a real tritonserver (the
nvidia-pytriton wheel's, started on loopback) loads as it is and answers from as `convert caption`
and `convert match` do; configs that Triton's own schema parses and that agree with the graphs; and
honest verdicts where something could not be served."""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from PIL import Image
from tritonclient.grpc import model_config_pb2

from converter_core.specs import BackendArtifacts, BackendContext, ExportedModule, ModuleSpec, ShapeCase, TensorSpec
from plugins.backends.triton import TritonBackend, TritonOptions
from plugins.backends.triton_server import find_server, running_server
from plugins.blip.fixture import draw, heldout_scenes
from plugins.blip.serving_triton import BlipTritonTasks
from tests.conftest import run_cli

GRAPHS = ("vision_encoder", "text_encoder", "text_decoder", "text_decoder_with_past")
TASKS = ("blip_caption", "blip_match", "blip_embed")
ONNX_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.INT64: "TYPE_INT64"}


@pytest.fixture(scope="module")
def blip(tmp_path_factory) -> Path:
    """The bundled BLIP converted for a Python-backend-only server, validated live during the conversion."""
    out = tmp_path_factory.mktemp("blip") / "out"
    result = run_cli("blip", "-o", str(out), "--backend", "triton", "--backend-option", "triton.engine=python")
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.fixture
def toy(plugin_site):
    plugin_site("toy_vlm_plugin", "toy-vlm-plugin", "toy")


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _png(scene) -> bytes:
    buffer = io.BytesIO()
    draw(scene).save(buffer, format="PNG")
    return buffer.getvalue()


def _infer(client, model: str, inputs: dict[str, np.ndarray], parameters: dict | None = None) -> dict[str, np.ndarray]:
    import tritonclient.http as httpclient

    tensors = []
    for name, value in inputs.items():
        tensor = httpclient.InferInput(name, list(value.shape), "BYTES")
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    result = client.infer(model, tensors, parameters=parameters)
    return {out["name"]: result.as_numpy(out["name"]) for out in result.get_response()["outputs"]}


def _stats(client, model: str, at_least: int = 0) -> tuple[int, int]:
    """(inference_count, execution_count); Triton counts an execution after its responses left, so wait for them."""
    for _ in range(200):
        stats = client.get_inference_statistics(model)["model_stats"][0]
        if stats["inference_count"] >= at_least:
            break
        time.sleep(0.05)
    return stats["inference_count"], stats["execution_count"]


def test_the_served_repository_captions_and_matches_as_the_runtime_does(blip: Path, tmp_path: Path):
    import tritonclient.http as httpclient

    manifest = _manifest(blip)
    triton = manifest["backends"]["triton"]
    assert triton["status"] == "passed", triton["reason"]
    assert set(triton["config"]["models"]) == {*GRAPHS, *TASKS}
    # Validation served the repository and left nothing behind that the manifest does not list.
    assert not list((blip / "triton").rglob("__pycache__"))
    assert sorted(str(p.relative_to(blip)) for p in (blip / "triton").rglob("*") if p.is_file()) == \
        sorted(name for name in manifest["files"] if name.startswith("triton/"))

    scenes = heldout_scenes(20)
    paths = []
    for index, scene in enumerate(scenes):
        paths.append(tmp_path / f"scene{index}.png")
        paths[-1].write_bytes(_png(scene))
    expected = json.loads(run_cli("caption", str(blip), *map(str, paths), "--json").stdout)

    server, why = find_server()
    assert server is not None, why
    with running_server(server, blip / "triton") as address:
        client = httpclient.InferenceServerClient(address)
        before = _stats(client, "blip_caption")
        answers: list = [None] * len(paths)
        start = threading.Barrier(16)

        def work(worker: int) -> None:
            own = httpclient.InferenceServerClient(address, network_timeout=120.0)
            start.wait()
            for index in range(worker, len(paths), 16):
                answers[index] = _infer(own, "blip_caption", {"image": np.array([[paths[index].read_bytes()]],
                                                                                 dtype=np.object_)})

        threads = [threading.Thread(target=work, args=(w,)) for w in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        after = _stats(client, "blip_caption", at_least=before[0] + 20)

        for answer, row in zip(answers, expected):
            ids = [int(t) for t in answer["token_ids"][0] if t != -1]
            assert (answer["caption"][0][0].decode(), ids) == (row["caption"], row["token_ids"])
        inferences, executions = after[0] - before[0], after[1] - before[1]
        assert inferences == 20 and executions < inferences  # Triton batched concurrent requests

        # Beam search, a prompt, and two images in one request, as `convert caption` with the same settings.
        answer = _infer(client, "blip_caption", {"image": np.array([[paths[0].read_bytes()], [paths[1].read_bytes()]],
                                                                   dtype=np.object_)},
                        {"beams": 3, "max_tokens": 12, "prompt": "a picture of "})
        beams = json.loads(run_cli("caption", str(blip), str(paths[0]), str(paths[1]), "--beams", "3",
                                   "--max-tokens", "12", "--json").stdout)
        assert [c.decode() for c in answer["caption"][:, 0]] == [row["caption"] for row in beams]

        texts = [scenes[2].caption, *scenes[2].distractors()]
        answer = _infer(client, "blip_match", {"image": np.array([[paths[2].read_bytes()]], dtype=np.object_),
                                               "texts": np.array([[t.encode() for t in texts]], dtype=np.object_)})
        matches = json.loads(run_cli("match", str(blip), str(paths[2]), *texts, "--json").stdout)["matches"]
        np.testing.assert_allclose(answer["itm_probability"][0], [m["itm_probability"] for m in matches], atol=1e-5)
        np.testing.assert_allclose(answer["itc_similarity"][0], [m["itc_similarity"] for m in matches], atol=1e-5)
        assert int(np.argmax(answer["itm_probability"][0])) == 0  # the right caption first

        embedding = _infer(client, "blip_embed", {"image": np.array([[paths[3].read_bytes()]], dtype=np.object_)})
        embedding = embedding["image_embedding"][0]

        refused = pytest.raises(Exception, match="not an image")
        with refused:
            _infer(client, "blip_caption", {"image": np.array([[b"not a picture"]], dtype=np.object_)})
        assert _infer(client, "blip_caption", {"image": np.array([[paths[0].read_bytes()]], dtype=np.object_)})

    # The embedding, computed here from the graphs with a text of our own (the image side must not depend on it).
    vision = ort.InferenceSession(str(blip / "vision_encoder.onnx"), providers=["CPUExecutionProvider"])
    from plugins.blip.runtime import BlipRuntime

    runtime = BlipRuntime(blip)
    embeds = vision.run(None, {"pixel_values": runtime.pixel_values([Image.open(paths[3])])})[0]
    ids, mask = runtime.tokenizer.batch([scenes[3].caption])
    encoder = ort.InferenceSession(str(blip / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    features = encoder.run(["image_features"], {"input_ids": ids, "attention_mask": mask, "image_embeds": embeds})[0]
    np.testing.assert_allclose(embedding, features[0], atol=1e-5)
    assert abs(float(np.linalg.norm(embedding)) - 1) < 1e-5
    assert not list((blip / "triton").rglob("__pycache__"))


def test_the_default_repository_serves_its_task_models_and_names_the_graphs_this_server_cannot_load(blip, tmp_path):
    # The same graphs, prepared again for Triton's ONNX Runtime backend, as the pipeline would.
    out = tmp_path / "out"
    shutil.copytree(blip, out, ignore=shutil.ignore_patterns("triton"))
    modules = []
    for name, entry in _manifest(out)["modules"].items():
        tensors = [tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in entry[kind])
                   for kind in ("inputs", "outputs")]
        spec = ModuleSpec(name, *tensors, example=ShapeCase("none", {}), cases=[])
        modules.append(ExportedModule(spec, out / entry["file"]))
    backend = TritonBackend()
    context = BackendContext("blip", tasks=BlipTritonTasks())
    options = TritonOptions(max_batch_size=8)
    artifacts = backend.prepare(modules, out, options, context)
    verdict = backend.validate(artifacts, out, {}, context)

    assert verdict.status == "skipped", verdict.reason
    assert ("not checked live: vision_encoder, text_encoder, text_decoder, text_decoder_with_past (this tritonserver "
            "has no onnxruntime backend; it has: python)") in verdict.reason
    served = verdict.details["served"]
    assert served["blip_caption"]["token_identical"] and served["blip_caption"]["images"] == 20
    assert served["blip_caption"]["execution_count"] < served["blip_caption"]["inference_count"]
    assert served["blip_match"]["max_abs_diff"] <= 1e-5 and served["blip_embed"]["unit_norm_error"] <= 1e-5
    assert not list((out / "triton").rglob("__pycache__"))


def _graph_io(path: Path, batched: bool) -> dict[str, tuple[str, list[int]]]:
    """name -> (Triton type, the dims a Triton config must give), read from the ONNX file."""
    graph = onnx.load(str(path), load_external_data=False).graph
    io_ = {}
    for value in (*graph.input, *graph.output):
        dims = [-1 if d.dim_param else d.dim_value for d in value.type.tensor_type.shape.dim]
        io_[value.name] = (ONNX_TYPES[value.type.tensor_type.elem_type], dims[1:] if batched else dims)
    return io_


def test_every_config_parses_with_tritons_schema_and_agrees_with_its_graph(blip: Path):
    for name in (*GRAPHS, *TASKS):
        config = text_format.Parse((blip / "triton" / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert config.name == name
        assert config.max_batch_size == 8  # convert blip's --max-batch default
        assert config.dynamic_batching.max_queue_delay_microseconds == 1000
        assert [model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group] == ["KIND_CPU"]
        assert config.backend == "python" and (blip / "triton" / name / "1" / "model.py").is_file()
        if name in TASKS:
            continue
        expected = _graph_io(blip / "triton" / name / "1" / "model.onnx", batched=True)
        got = {}
        for entry in (*config.input, *config.output):
            dims = list(entry.reshape.shape) if entry.HasField("reshape") else list(entry.dims)
            got[entry.name] = (model_config_pb2.DataType.Name(entry.data_type), dims)
            if entry.HasField("reshape"):
                assert list(entry.dims) == [1] and dims == []  # [batch] in the graph: Triton needs a dim
        assert got == expected, name
    caption = text_format.Parse((blip / "triton" / "blip_caption" / "config.pbtxt").read_text(),
                                model_config_pb2.ModelConfig())
    assert [(i.name, model_config_pb2.DataType.Name(i.data_type)) for i in caption.input] == [("image", "TYPE_STRING")]
    readme = (blip / "triton" / "README.md").read_text()
    assert "tritonserver --model-repository" in readme and "blip_caption" in readme


def test_the_default_repository_is_for_the_onnxruntime_backend_and_says_what_it_could_not_serve(toy, tmp_path):
    out = tmp_path / "out"
    result = run_cli("toy", "-o", str(out), "--backend", "triton", "--backend-option", "triton.max_batch_size=4",
                     "--backend-option", "triton.preferred_batch_sizes=2,4")
    assert result.returncode == 0, result.stderr
    triton = _manifest(out)["backends"]["triton"]
    # The wheel's server has the Python backend only: the graphs were checked, not served.
    assert triton["status"] == "skipped"
    assert "encoder, head (this tritonserver has no onnxruntime backend; it has: python)" in triton["reason"]
    assert "config.pbtxt files parse" in triton["reason"]
    config = text_format.Parse((out / "triton" / "encoder" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 4
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4]
    assert not config.optimization.HasField("execution_accelerators")
    assert [(i.name, list(i.dims)) for i in config.input] == [("features", [-1, 8])]
    assert onnx.load(str(out / "triton" / "encoder" / "1" / "model.onnx")).graph.input[0].name == "features"

    required = run_cli("toy", "-o", str(tmp_path / "out2"), "--backend", "triton", "--require-validation")
    assert required.returncode == 1 and "not validated" in required.stderr


def test_gpu_instances_with_tensorrt_write_the_accelerator_settings(toy, tmp_path):
    out = tmp_path / "out"
    result = run_cli("toy", "-o", str(out), "--backend", "triton", "--backend-option", "triton.instance_kind=gpu",
                     "--backend-option", "triton.accelerator=tensorrt", "--backend-option", "triton.precision=fp16",
                     "--backend-option", "triton.workspace_gib=2")
    assert result.returncode == 0, result.stderr
    config = text_format.Parse((out / "triton" / "head" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert [model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group] == ["KIND_GPU"]
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    assert accelerator.parameters["precision_mode"] == "FP16"
    assert accelerator.parameters["max_workspace_size_bytes"] == str(2 << 30)


def test_without_a_tritonserver_the_live_check_is_skipped_never_passed(toy, tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "nowhere" / "tritonserver"
    result = run_cli("toy", "-o", str(out), "--backend", "triton", "--backend-option", "triton.engine=python",
                     "--backend-option", f"triton.server={missing}")
    assert result.returncode == 0, result.stderr
    triton = _manifest(out)["backends"]["triton"]
    assert triton["status"] == "skipped"
    assert f"not served: no tritonserver at {missing}" in triton["reason"]


def test_a_config_that_disagrees_with_its_graph_fails_validation_naming_model_and_tensor(toy, tmp_path):
    out = tmp_path / "out"
    assert run_cli("toy", "-o", str(out), "--backend", "triton", "--backend-option", "triton.engine=python",
                   "--backend-option", f"triton.server={tmp_path / 'none'}").returncode == 0
    recorded = _manifest(out)["backends"]["triton"]
    artifacts = BackendArtifacts("triton", recorded["files"], recorded["config"])
    encoder = out / "triton" / "encoder" / "config.pbtxt"
    encoder.write_text(encoder.read_text().replace("dims: 8", "dims: 9", 1))
    head = out / "triton" / "head" / "config.pbtxt"
    head.write_text(head.read_text().replace("TYPE_FP32", "TYPE_FP16", 1))

    verdict = TritonBackend().validate(artifacts, out, {}, BackendContext("toy"))
    assert verdict.status == "failed"
    assert "model encoder: input 'features' has dims [-1, 9] in config.pbtxt, the graph's are [-1, 8]" in verdict.reason
    assert "model head: input 'hidden' is TYPE_FP16 in config.pbtxt, the graph's is TYPE_FP32" in verdict.reason

    head.write_text("name: 'head'\nmax_batch_size: [")
    verdict = TritonBackend().validate(artifacts, out, {}, BackendContext("toy"))
    assert verdict.status == "failed" and "head/config.pbtxt does not parse as a Triton ModelConfig" in verdict.reason


@pytest.mark.parametrize("option, message", [
    ("triton.engine=tensorflow", "backend triton: option engine='tensorflow': expected one of 'onnxruntime', 'python'"),
    ("triton.accelerator=tensorrt", "accelerator=tensorrt runs in Triton's ONNX Runtime backend on a GPU"),
    ("triton.instances=0", "instances must be >= 1, got 0"),
    ("triton.preferred_batch_sizes=0,4", "preferred_batch_sizes must be >= 1"),
])
def test_bad_options_are_exit_2_with_one_line(toy, tmp_path, option: str, message: str):
    result = run_cli("toy", "-o", str(tmp_path / "out"), "--backend", "triton", "--backend-option", option)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
