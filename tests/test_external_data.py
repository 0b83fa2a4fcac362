"""Graphs over protobuf's 2 GB keep their weights in external-data files: forced here on the bundled
model, every stage (export, a pass, a backend, the runtime) must carry those files along."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx
import pytest

from converter_core.pipeline import ConvertOptions, convert, parse_pass_policy
from plugins.blip import fixture
from plugins.blip.conversion import load_source
from plugins.blip.recipes import BlipConversion
from plugins.blip.runtime import BlipRuntime


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def external_locations(path: Path) -> set[str]:
    model = onnx.load(str(path), load_external_data=False)
    return {entry.value for tensor in model.graph.initializer if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data if entry.key == "location"}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("external")
    source = load_source([], False, "base", None, 0, None)  # the bundled fixture
    policy = parse_pass_policy("text_decoder_with_past=int8-dynamic")
    external = convert(BlipConversion(source), ConvertOptions(root / "external", backends=("cpu",), passes=policy,
                                                              external_data_above=0))
    inline = convert(BlipConversion(source), ConvertOptions(root / "inline", validate=False, passes=policy))
    return external, inline


def test_every_graph_keeps_its_weights_in_a_hashed_data_file_and_still_validates(outputs):
    result, _ = outputs
    assert result.exit_code == 0, [str(f) for f in result.failures]
    out = result.output_dir
    manifest = json.loads((out / "manifest.json").read_text())
    for name, module in manifest["modules"].items():
        data = module["file"] + ".data"
        assert external_locations(out / module["file"]) == {data}, name
        assert module["data_files"] == [{"file": data, "sha256": sha256(out / data)}]
        assert module["validation"]["status"] == "passed"
    assert manifest["modules"]["text_decoder_with_past"]["passes"][0]["kept"]  # written by the pass, moved in place
    assert not list(out.glob(".*"))  # no pass leftovers, their data files included
    cpu = manifest["backends"]["cpu"]
    assert cpu["status"] == "passed", cpu["reason"]
    assert {f"cpu/{name}.onnx.data" for name in manifest["modules"]} <= set(cpu["files"])


def test_the_runtime_captions_alike_and_refuses_a_changed_data_file(outputs, tmp_path):
    external, inline = outputs
    images = [fixture.draw(scene) for scene in fixture.heldout_scenes(4)]
    got = BlipRuntime(external.output_dir).caption(images, beams=2)
    want = BlipRuntime(inline.output_dir).caption(images, beams=2)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]

    data = external.output_dir / "text_decoder.onnx.data"
    data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(Exception, match="text_decoder.onnx.data: its sha256 differs"):
        BlipRuntime(external.output_dir).caption(images[:1])
