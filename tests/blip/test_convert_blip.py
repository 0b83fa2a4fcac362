"""`convert blip` as a user runs it: real checkpoint layouts in, verified graphs and a manifest out."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from converter_core.pipeline import ConvertOptions, convert
from plugins.blip.checkpoint import load_blip_source
from plugins.blip.presets import random_source
from plugins.blip.recipes import BlipConversion
from tests.blip.checkpoint_builders import salesforce_state_dict, save_hf_dir, save_pth
from tests.conftest import run_cli

ALL_GRAPHS = {"vision_encoder", "text_encoder", "text_decoder", "text_decoder_with_past"}


@pytest.fixture(scope="module")
def tiny():
    return random_source("tiny", seed=5)


@pytest.fixture(scope="module")
def pretrain_pth(tiny, tmp_path_factory) -> Path:
    state, _ = salesforce_state_dict(tiny.captioning, tiny.retrieval)
    return save_pth(state, tmp_path_factory.mktemp("ckpt") / "model_base.pth")


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_salesforce_pretrain_pth_gives_three_verified_modules(tiny, pretrain_pth, tmp_path):
    out = tmp_path / "out"
    result = run_cli("blip", "--checkpoint", str(pretrain_pth), "-o", str(out))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())

    assert manifest["format_version"] == 1
    assert manifest["model_type"] == "blip"
    assert manifest["source"]["format"] == "salesforce-pth"
    assert manifest["source"]["path"] == str(pretrain_pth)
    assert manifest["source"]["sha256"] == hashlib.sha256(pretrain_pth.read_bytes()).hexdigest()
    assert set(manifest["modules"]) == ALL_GRAPHS
    for name, module in manifest["modules"].items():
        assert (out / module["file"]).is_file()
        assert module["sha256"] == hashlib.sha256((out / module["file"]).read_bytes()).hexdigest()
        validation = module["validation"]
        assert validation["status"] == "passed", (name, validation)
        assert len(validation["cases"]) >= 3 and validation["atol"] == 1e-4
        assert all(check["passed"] and check["max_abs_diff"] <= 1e-4 for check in validation["outputs"].values())
    assert manifest["not_exported"] == {}
    assert manifest["dropped_training_state"] > 0

    vision = manifest["modules"]["vision_encoder"]
    assert vision["inputs"] == [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 64, 64]}]
    assert vision["outputs"][0]["shape"] == ["batch", 1 + (64 // 16) ** 2, 128]
    past = {t["name"]: t["shape"] for t in manifest["modules"]["text_decoder_with_past"]["inputs"]}
    assert past["input_ids"] == ["batch", "new"]
    assert past["past.0.self_key"] == ["batch", 2, "past", 64]
    assert "cross.1.value" in past
    # Every axis was tried at size 1 as well as at sizes the export never saw.
    cases = manifest["modules"]["text_decoder_with_past"]["validation"]["cases"]
    assert "batch=1 new=1 past=1" in cases

    assert manifest["preprocessing"]["image_size"] == 64
    assert manifest["preprocessing"]["mean"] == [0.48145466, 0.4578275, 0.40821073]
    assert manifest["tokens"] == {"DEC": 126, "ENC": 127, "SEP": 102, "PAD": 0, "CLS": 101}
    assert manifest["generation"]["prompt"] == "a picture of "
    assert manifest["backends"] == {}
    assert {"torch", "onnxruntime", "transformers"} <= set(manifest["libraries"])

    # Independent check: the exported graphs against the transformers models themselves.
    generator = torch.Generator().manual_seed(11)
    pixels = torch.randn(1, 3, 64, 64, generator=generator)
    with torch.no_grad():
        expected_embeds = tiny.captioning.vision_model(pixel_values=pixels).last_hidden_state.numpy()
        (embeds,) = _session(out / "vision_encoder.onnx").run(None, {"pixel_values": pixels.numpy()})
        np.testing.assert_allclose(embeds, expected_embeds, atol=1e-4)

        ids = torch.tensor([[101, 7, 8, 9, 102]])
        itm_ids = ids.clone()
        itm_ids[:, 0] = 127
        hf = tiny.retrieval(input_ids=itm_ids, pixel_values=pixels, attention_mask=torch.ones_like(ids))
        expected_itm = torch.softmax(hf.itm_score, dim=-1)[:, 1].numpy()
        itm, _, _ = _session(out / "text_encoder.onnx").run(
            None, {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy()), "image_embeds": embeds}
        )
        np.testing.assert_allclose(itm, expected_itm, atol=1e-4)

        prompt = torch.tensor([[126, 5, 6]])
        expected_logits = tiny.captioning.text_decoder(
            input_ids=prompt, encoder_hidden_states=torch.from_numpy(embeds)
        ).logits.numpy()
        logits = _session(out / "text_decoder.onnx").run(["logits"], {"input_ids": prompt.numpy(), "image_embeds": embeds})[0]
        np.testing.assert_allclose(logits, expected_logits, atol=1e-4)


def test_hf_directories_given_together_yield_all_modules(tiny, tmp_path):
    captioning = save_hf_dir(tiny.captioning, tmp_path / "blip-captioning")
    retrieval = save_hf_dir(tiny.retrieval, tmp_path / "blip-itm")
    source = load_blip_source([captioning, retrieval])
    result = convert(BlipConversion(source), ConvertOptions(tmp_path / "out", validate=False))
    assert set(result.modules) == ALL_GRAPHS
    assert {r.validation.status for r in result.modules.values()} == {"skipped"}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [f["parts"] for f in manifest["checkpoint_files"]] == [["captioning"], ["retrieval"]]


def test_a_captioning_checkpoint_says_why_there_is_no_text_encoder(tiny, tmp_path):
    state, _ = salesforce_state_dict(tiny.captioning, None)
    checkpoint = save_pth(state, tmp_path / "model_base_caption_capfilt_large.pth")
    out = tmp_path / "out"
    result = run_cli("blip", "-c", str(checkpoint), "-o", str(out), "--no-validate")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["modules"]) == {"vision_encoder", "text_decoder", "text_decoder_with_past"}
    assert "captioning checkpoint" in manifest["not_exported"]["text_encoder"]
    assert "not exported: text_encoder" in result.stdout


class _RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("problem", ["missing", "not-blip", "truncated", "unexpected-key", "pickle-runs-code"])
def test_bad_checkpoints_exit_2_naming_the_file_and_write_nothing(problem, tiny, pretrain_pth, tmp_path):
    bad = tmp_path / "bad.pth"
    marker = tmp_path / "code-ran"
    if problem == "not-blip":
        torch.save({"model": {"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(10, 4)}}, bad)
    elif problem == "truncated":
        data = pretrain_pth.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif problem == "unexpected-key":
        state, _ = salesforce_state_dict(tiny.captioning, tiny.retrieval)
        state["text_decoder.extra_head.weight"] = torch.zeros(2, 2)
        save_pth(state, bad)
    elif problem == "pickle-runs-code":
        payload = _RunsCode()
        payload.marker = str(marker)
        bad.write_bytes(pickle.dumps({"model": payload}))
    out = tmp_path / "out"
    result = run_cli("blip", "--checkpoint", str(bad), "-o", str(out))
    assert result.returncode == 2, (result.stdout, result.stderr)
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "bad.pth" in error_lines[0]
    assert "Traceback" not in result.stderr
    if problem == "unexpected-key":
        assert "text_decoder.extra_head.weight" in result.stderr
    assert not marker.exists()
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ([] if problem == "missing" else ["bad.pth"]), "something was written"


def test_a_difference_above_tolerance_exits_1_naming_module_and_output(pretrain_pth, tmp_path):
    out = tmp_path / "out"
    result = run_cli("blip", "-c", str(pretrain_pth), "-o", str(out), "--atol", "1e-12")
    assert result.returncode == 1
    message = " ".join(result.stderr.split())
    assert "check failed: vision_encoder: output 'image_embeds' at batch=" in message
    assert "> tolerance 1e-12" in message
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["modules"]["vision_encoder"]["validation"]["status"] == "failed"


def test_another_image_size_interpolates_positions_and_exports_that_size(pretrain_pth, tmp_path):
    source = load_blip_source([pretrain_pth], image_size=32)
    result = convert(BlipConversion(source), ConvertOptions(tmp_path / "out"))
    assert result.exit_code == 0
    vision = result.modules["vision_encoder"]
    assert vision.spec.inputs[0].shape == ("batch", 3, 32, 32)
    assert vision.spec.outputs[0].shape == ("batch", 5, 128)
    assert vision.validation.status == "passed"


def test_random_weights_need_a_known_preset_and_exclude_a_checkpoint(tmp_path):
    result = run_cli("blip", "--random-weights", "--preset", "huge", "-o", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "unknown BLIP preset 'huge'; choose one of: tiny, base, large" in result.stderr
    both = run_cli("blip", "--random-weights", "-c", "x.pth", "-o", str(tmp_path / "out"))
    assert both.returncode == 2 and "not both" in both.stderr
