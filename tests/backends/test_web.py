"""The web backend as a user meets it: `convert blip --backend web` writes a site that, opened in a real
headless Chromium, captions and matches as `convert caption` / `convert match` do.

Expected values come from the Python runtime run as a user would (the `convert` CLI in a fresh
process) or from Pillow; the page is the Debian chromium package driven by playwright-core.
CI installs both (`apt-get install -y chromium`; `npm ci` in plugins/backends/web).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import urllib.parse
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from converter_core.errors import InputError
from converter_core.specs import BackendArtifacts, BackendContext, ExportedModule, ModuleSpec, ShapeCase, TensorSpec
from plugins.backends import web as web_backend
from plugins.backends.web import WebBackend, WebOptions, WebSite
from plugins.backends.web.browser import CHECK_PREFIX, SiteBrowser, check_ops, find_executable
from plugins.blip.runtime.preprocess import Preprocessor
from plugins.blip.web import validation_image
from tests.conftest import run_cli

MISSING = WebBackend().availability().reason if not WebBackend().availability().available else None
if MISSING is not None and os.environ.get("VLM_CONVERTER_CI"):
    # .ci/run installs Chromium and the npm packages: there, a browser test that skips hides a broken install.
    pytest.fail(f"CI must run the browser tests, but the web backend cannot run: {MISSING}", pytrace=False)
needs_browser = pytest.mark.skipif(MISSING is not None, reason=f"web backend not runnable here: {MISSING}")


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if MISSING is not None:
        pytest.skip(f"web backend not runnable here: {MISSING}")
    out = tmp_path_factory.mktemp("web") / "out"
    result = run_cli("blip", "-o", str(out), "--backend", "web", "--backend-option", "web.validation_images=4")
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def _browser(site: Path) -> SiteBrowser:
    return SiteBrowser(site, find_executable("chromium"), find_executable("node"), timeout_s=120)


def _run_requests(out: Path, requests: list[dict], files: dict[str, bytes]) -> list[dict]:
    files = {**files, "requests.json": json.dumps(requests).encode()}
    [page] = _browser(out / "web").open(["index.html?requests=" + CHECK_PREFIX + "requests.json"], files)
    assert page.status == "done", (page.error, page.console, page.results)
    return page.results["results"]


def _write(folder: Path, files: dict[str, bytes]) -> list[str]:
    folder.mkdir(exist_ok=True)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return [str(folder / name) for name in files]


@needs_browser
def test_the_site_is_self_contained_and_its_manifest_hashes_every_model(out: Path):
    manifest = json.loads((out / "manifest.json").read_text())
    record = manifest["backends"]["web"]
    assert record["status"] == "passed", record["reason"]
    assert "token-identical" in record["reason"]
    site = json.loads((out / "web" / "manifest.json").read_text())
    assert set(site["models"]) == set(manifest["modules"])
    for name, model in site["models"].items():
        content = (out / "web" / model["file"]).read_bytes()
        assert hashlib.sha256(content).hexdigest() == model["sha256"] == manifest["modules"][name]["sha256"]
    assert hashlib.sha256((out / "web" / "vocab.txt").read_bytes()).hexdigest() == site["tokenizer"]["sha256"]
    assert (out / "web" / site["runtime"]["wasm"]).stat().st_size > 1_000_000
    package = json.loads((Path(web_backend.__file__).parent / "package.json").read_text())
    assert site["onnxruntime_web"] == package["dependencies"]["onnxruntime-web"]
    # Offline: nothing the page loads comes from another origin.
    for name in ("index.html", "blip.js"):
        assert not re.search(r"""(src|href|import|fetch)[^\n]*['"]https?://""", (out / "web" / name).read_text())
    listed = set(record["files"])
    on_disk = {str(p.relative_to(out)) for p in (out / "web").rglob("*") if p.is_file()}
    assert on_disk == listed


@needs_browser
def test_the_browser_captions_20_heldout_scenes_as_convert_caption_does(out: Path, tmp_path: Path):
    images = [validation_image(index) for index in range(20)]
    assert all(Image.open(io.BytesIO(content)).size != (64, 64) for _, content, _ in images)
    paths = _write(tmp_path / "images", {name: content for name, content, _ in images})
    decode = [{"beams": 1, "max_tokens": 20}, {"beams": 3, "max_tokens": 20}]
    results = _run_requests(out, [{"image": CHECK_PREFIX + name, "decode": decode} for name, _, _ in images],
                            {name: content for name, content, _ in images})
    for column, beams in enumerate((1, 3)):
        done = run_cli("caption", str(out), *paths, "--beams", str(beams), "--json")
        assert done.returncode == 0, done.stderr
        for want, got in zip(json.loads(done.stdout), results):
            browser = got["captions"][column]
            assert browser["token_ids"] == want["token_ids"], (want["image"], beams)
            assert browser["text"] == want["caption"]
    # Most captions of the opaque images are the scenes' own words (those with alpha or a transparent
    # palette entry are composited onto white, which changes their background; squeezed ones miscount).
    from plugins.blip import fixture

    opaque = [(r, s) for r, s, (_, _, mode) in zip(results, fixture.heldout_scenes(20), images) if mode in ("RGB", "L")]
    right = sum(r["captions"][0]["text"] == s.caption for r, s in opaque)
    assert right >= len(opaque) // 2, [(r["captions"][0]["text"], s.caption) for r, s in opaque]


@needs_browser
def test_match_scores_in_the_browser_are_within_1e4_of_convert_match(out: Path, tmp_path: Path):
    from plugins.blip import fixture

    images = [validation_image(index) for index in range(4)]
    texts = [fixture.heldout_scenes(4)[i].caption for i in range(4)] + ["a dog", "Two RED circles, on a gray background!"]
    paths = _write(tmp_path / "images", {name: content for name, content, _ in images})
    results = _run_requests(out, [{"image": CHECK_PREFIX + name, "texts": texts} for name, _, _ in images],
                            {name: content for name, content, _ in images})
    for path, got in zip(paths, results):
        done = run_cli("match", str(out), path, *texts, "--json")
        assert done.returncode == 0, done.stderr
        for want, browser in zip(json.loads(done.stdout)["matches"], got["matches"]):
            assert browser["text"] == want["text"]
            assert abs(browser["itm_probability"] - want["itm_probability"]) <= 1e-4
            assert abs(browser["itc_similarity"] - want["itc_similarity"]) <= 1e-4


def _images_of_every_kind() -> dict[str, Image.Image]:
    rng = np.random.default_rng(5)
    noise = rng.integers(0, 256, (90, 130, 4), dtype=np.uint8)
    gradient = Image.linear_gradient("L").resize((130, 90))
    rgba = Image.fromarray(noise, "RGBA")
    return {
        "rgb.png": Image.fromarray(noise[..., :3]),
        "rgba.png": rgba,
        "l.png": Image.fromarray(noise[..., 0]),
        "la.png": Image.fromarray(noise[..., :2], "LA"),
        "p.png": Image.fromarray(noise[..., :3]).quantize(colors=40),
        "tiny.png": Image.fromarray(noise[:3, :2, :3]),
        "wide.png": Image.fromarray(np.repeat(noise[:20, :, :3], 6, axis=1)),  # 780 x 20
        "tall.png": Image.fromarray(noise[:, :9, :3]),  # 9 x 90: the height shrinks most (Pillow's other pass order)
        "gradient-16bit.png": Image.fromarray(np.asarray(gradient).astype(np.uint16) * 257),
    }


@needs_browser
def test_the_page_preprocesses_images_of_every_size_and_mode_as_python_does(out: Path):
    images = _images_of_every_kind()
    files = {}
    for name, image in images.items():
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", **({"transparency": 3} if name == "p.png" else {}))
        files[name] = buffer.getvalue()
    results = _run_requests(out, [{"image": CHECK_PREFIX + name, "pixels": True} for name in files], files)
    settings = json.loads((out / "manifest.json").read_text())["preprocessing"]
    for (name, content), got in zip(files.items(), results):
        want = Preprocessor(settings)([Image.open(io.BytesIO(content))])[0]
        pixels = np.asarray(got["pixel_values"], dtype=np.float32).reshape(want.shape)
        assert np.abs(pixels - want).max() <= 1e-4, name


@needs_browser
def test_a_link_with_an_image_and_texts_captions_and_matches_on_load(out: Path, tmp_path: Path):
    name, content, _ = validation_image(1)
    [path] = _write(tmp_path / "images", {name: content})
    link = "index.html?" + urllib.parse.urlencode([("image", CHECK_PREFIX + name), ("text", "one red circle"),
                                                   ("text", "three blue squares"), ("beams", "3")])
    [page] = _browser(out / "web").open([link], {name: content})
    assert page.status == "done", page.error
    [result] = page.results["results"]
    caption = json.loads(run_cli("caption", str(out), path, "--beams", "3", "--json").stdout)[0]
    assert result["captions"][0]["token_ids"] == caption["token_ids"]
    match = json.loads(run_cli("match", str(out), path, "one red circle", "three blue squares", "--json").stdout)
    assert [m["text"] for m in result["matches"]] == ["one red circle", "three blue squares"]
    for want, got in zip(match["matches"], result["matches"]):
        assert abs(got["itm_probability"] - want["itm_probability"]) <= 1e-4


@needs_browser
def test_the_page_refuses_a_model_file_changed_after_conversion(out: Path, tmp_path: Path):
    site = tmp_path / "site"
    shutil.copytree(out / "web", site)
    model = site / "models" / "text_encoder.onnx"
    data = bytearray(model.read_bytes())
    data[-10] ^= 0xFF
    model.write_bytes(bytes(data))
    name, content, _ = validation_image(0)
    [page] = _browser(site).open([f"index.html?image={CHECK_PREFIX}{name}"], {name: content})
    assert page.status == "error"
    assert "models/text_encoder.onnx" in page.results["error"] and "sha256" in page.results["error"]


def _artifacts(out: Path) -> BackendArtifacts:
    record = json.loads((out / "manifest.json").read_text())["backends"]["web"]
    return BackendArtifacts("web", record["files"], record["config"])


@needs_browser
@pytest.mark.parametrize("missing", ["chromium", "node"])
def test_without_chromium_or_node_validation_is_skipped_and_says_which(out: Path, missing: str):
    from plugins.blip.web import BlipWebTasks

    options = WebOptions(**{missing: "/nonexistent/" + missing})
    result = WebBackend().validate(_artifacts(out), out, {}, BackendContext("blip", {}, BlipWebTasks()), options=options)
    assert result.status == "skipped"
    assert f"/nonexistent/{missing}" in result.reason


def test_without_onnxruntime_web_installed_prepare_is_bad_input_naming_npm_ci(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(web_backend, "ort_web_version", lambda: None)

    class Tasks:
        def site(self, out_dir, metadata):
            return WebSite({}, {})

    with pytest.raises(InputError, match="npm ci"):
        WebBackend().prepare([], tmp_path, WebOptions(), BackendContext("blip", {}, Tasks()))


def _graph_with(op_type: str, domain: str, path: Path) -> Path:
    node = helper.make_node(op_type, ["x"], ["y"], domain=domain)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(domain, 1)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


@pytest.mark.skipif(find_executable("node") is None or WebBackend()._missing(WebOptions(chromium="sh")) != [],
                    reason="needs Node.js and the npm packages")
def test_the_op_check_names_an_op_the_wasm_ep_cannot_run_and_validation_fails(tmp_path: Path):
    graph = _graph_with("Frobnicate", "com.example", tmp_path / "frob.onnx")
    relu = tmp_path / "relu.onnx"
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]), opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(relu))
    check = check_ops({"frob": graph, "relu": relu}, find_executable("node"))
    assert check.errors["relu"] is None
    assert check.ops["frob"] == ["com.example.Frobnicate"]

    class Tasks:
        def site(self, out_dir, metadata):
            return WebSite({"index.html": b"<!doctype html>"}, {})

    spec = ModuleSpec("frob", (TensorSpec("x", "float32", (1,)),), (TensorSpec("y", "float32", (1,)),),
                      ShapeCase("x", {}), [])
    out = tmp_path / "out"
    out.mkdir()
    artifacts = WebBackend().prepare([ExportedModule(spec, graph)], out, WebOptions(), BackendContext("toy", {}, Tasks()))
    assert artifacts.config["op_check"]["modules"]["frob"]["ops"] == ["com.example.Frobnicate"]
    result = WebBackend().validate(artifacts, out, {}, BackendContext("toy", {}, Tasks()))
    assert result.status == "failed" and "Frobnicate" in result.reason and "frob" in result.reason


def test_a_bad_web_option_is_exit_2_with_one_line(tmp_path: Path):
    result = run_cli("blip", "-o", str(tmp_path / "out"), "--backend", "web", "--backend-option", "web.threads=0")
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "threads" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["web.validation_images=none", "web.timeout_s=-1", "web.colour=red"])
def test_web_options_of_the_wrong_type_or_name_are_bad_input(option: str):
    from converter_core.options import resolve_backend_options

    key, value = option.split("=")
    with pytest.raises(InputError, match="web"):
        resolve_backend_options({"web": WebOptions}, {key: value})


def test_a_model_family_without_a_browser_runtime_is_told_so(plugin_site, tmp_path: Path):
    plugin_site("toy_vlm_plugin", "toy-vlm-plugin", "toy")
    result = run_cli("toy", "-o", str(tmp_path / "out"), "--backend", "web")
    assert result.returncode == 2
    assert "no browser runtime" in result.stderr


@needs_browser
def test_int8_graphs_as_the_int8_dynamic_pass_writes_them_run_in_onnxruntime_web(out: Path, tmp_path: Path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graphs = {}
    for name in ("vision_encoder", "text_decoder_with_past"):
        graphs[name] = tmp_path / f"{name}.int8.onnx"
        quantize_dynamic(out / f"{name}.onnx", graphs[name], op_types_to_quantize=["MatMul", "Gemm"],
                         weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})
        assert any(n.op_type == "MatMulInteger" for n in onnx.load(str(graphs[name])).graph.node)
    check = check_ops(graphs, find_executable("node"))
    assert check.errors == {name: None for name in graphs}


class _HashDecoder:
    """Logits as an integer hash of each row's tokens so far (tests/backends/web/fake_search.mjs computes
    the same), so that both searches see identical scores and only their rules can differ."""

    vocab, eos = 40, 3

    def logits(self, history: list[int]) -> np.ndarray:
        s = 17
        for t in history:
            s = (s * 31 + int(t) + 7) % 1000003
        v = np.arange(self.vocab)
        out = (((s * 131 + v * 977 + (s % 89) * v * v) % 1000003) / 1000003 * 6).astype(np.float32)
        out[self.eos] = np.float32(np.float64(out[self.eos]) + len(history) * 0.1)
        return out

    def start(self, input_ids: np.ndarray, image_embeds: np.ndarray):
        from plugins.blip.runtime.decoding import Cache

        return np.stack([self.logits(list(row)) for row in input_ids]), Cache([input_ids.copy()], [])

    def advance(self, tokens: np.ndarray, cache):
        from plugins.blip.runtime.decoding import Cache

        rows = np.concatenate([cache.self_kv[0], tokens.reshape(-1, 1)], axis=1)
        return np.stack([self.logits(list(row)) for row in rows]), Cache([rows], [])


@needs_browser
def test_the_page_searches_by_the_python_runtimes_rules(out: Path):
    from plugins.blip.runtime.decoding import DecodingOptions, decode

    cases = []
    for beams, max_tokens, min_tokens, repetition, length in [
            (1, 12, 0, 1.0, 1.0), (1, 15, 8, 1.3, 1.0), (2, 10, 0, 1.0, 1.0), (3, 14, 4, 1.0, 1.0),
            (3, 12, 0, 1.2, 0.5), (4, 9, 2, 0.8, 2.0), (5, 15, 10, 1.5, 1.0), (3, 6, 6, 1.0, 1.0)]:
        for prompt in ([1, 9, 20, 7], [1], [1, 33]):
            cases.append({"prompt": prompt, "options": {"beams": beams, "maxTokens": max_tokens, "minTokens": min_tokens,
                                                        "repetitionPenalty": repetition, "lengthPenalty": length}})
    import subprocess

    done = subprocess.run([find_executable("node"), str(Path(__file__).parent / "web" / "fake_search.mjs"), str(out / "web")],
                          input=json.dumps(cases), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for case, got in zip(cases, json.loads(done.stdout), strict=True):
        o = case["options"]
        options = DecodingOptions(beams=o["beams"], max_tokens=o["maxTokens"], min_tokens=o["minTokens"],
                                  repetition_penalty=o["repetitionPenalty"], length_penalty=o["lengthPenalty"])
        [want] = decode(_HashDecoder(), np.zeros((1, 1, 1), np.float32), case["prompt"], options, eos_id=3, pad_id=0)
        assert got == want.token_ids, case
