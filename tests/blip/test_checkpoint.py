"""A user points the converter at a BLIP checkpoint and gets transformers models holding its weights."""

from __future__ import annotations

import builtins
import hashlib

import pytest
import torch
from torch.nn import functional as F

from converter_core.errors import InputError
from plugins.blip.checkpoint import CheckpointError, load_blip_source
from plugins.blip.presets import PRESETS, random_source
from tests.blip.checkpoint_builders import (
    salesforce_state_dict,
    save_hf_dir,
    save_pth,
    save_salesforce_safetensors,
)

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def tiny():
    return random_source("tiny", seed=0)


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(7)
    pixels = torch.randn(2, 3, TINY.image_size, TINY.image_size, generator=generator)
    ids = torch.randint(3, TINY.vocab_size, (2, 6), generator=generator)
    return pixels, ids


def outputs(source, pixels, ids):
    """What a user of the models would read: caption logits, ITM scores, ITC similarities."""
    found = {}
    with torch.no_grad():
        if source.captioning is not None:
            found["caption_logits"] = source.captioning(pixel_values=pixels, input_ids=ids).logits
        if source.retrieval is not None:
            found["itm"] = source.retrieval(input_ids=ids, pixel_values=pixels, use_itm_head=True).itm_score
            found["itc"] = source.retrieval(input_ids=ids, pixel_values=pixels, use_itm_head=False).itm_score
    return found


def assert_same_tensors(expected_model, loaded_model):
    expected, loaded = expected_model.state_dict(), loaded_model.state_dict()
    assert expected.keys() == loaded.keys()
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor), key
        assert loaded[key].dtype == torch.float32, key


def assert_same_outputs(expected_source, loaded_source, inputs):
    expected, loaded = outputs(expected_source, *inputs), outputs(loaded_source, *inputs)
    assert expected.keys() == loaded.keys()
    for name in expected:
        torch.testing.assert_close(loaded[name], expected[name], rtol=0, atol=1e-6, msg=name)


# --- Hugging Face directories -------------------------------------------------------------------


def test_hf_captioning_dir_loads_with_its_weights_and_outputs(tiny, inputs, tmp_path):
    folder = save_hf_dir(tiny.captioning, tmp_path / "blip-caption", tokenizer=True)

    source = load_blip_source([folder])

    assert source.format == "hf-dir"
    assert source.path == folder
    assert source.sha256 == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert source.tokenizer_dir == folder
    assert source.retrieval is None and "text_encoder" in source.absent
    assert not source.captioning.training
    assert_same_tensors(tiny.captioning, source.captioning)
    assert_same_outputs(random_source("tiny", parts=("captioning",)), source, inputs)
    assert source.tokens == {"DEC": TINY.vocab_size - 2, "ENC": TINY.vocab_size - 1, "SEP": 102, "PAD": 0, "CLS": 101}


def test_hf_retrieval_dir_loads_alone(tiny, inputs, tmp_path):
    folder = save_hf_dir(tiny.retrieval, tmp_path / "blip-itm")

    source = load_blip_source([folder])

    assert source.captioning is None and "text_decoder" in source.absent
    assert source.tokenizer_dir is None
    assert_same_tensors(tiny.retrieval, source.retrieval)
    assert_same_outputs(random_source("tiny", parts=("retrieval",)), source, inputs)


def test_captioning_and_retrieval_dirs_share_one_vision_tower(tiny, inputs, tmp_path):
    caption = save_hf_dir(tiny.captioning, tmp_path / "caption")
    itm = save_hf_dir(tiny.retrieval, tmp_path / "itm", tokenizer=True)

    source = load_blip_source([caption, itm])

    assert source.shared_vision
    assert source.retrieval.vision_model is source.captioning.vision_model
    assert source.absent == {}
    assert source.tokenizer_dir == itm
    assert [(f.path, f.format, f.parts) for f in source.files] == [
        (caption, "hf-dir", ("captioning",)),
        (itm, "hf-dir", ("retrieval",)),
    ]
    assert_same_outputs(tiny, source, inputs)


def test_vision_towers_that_differ_stay_separate(tiny, inputs, tmp_path):
    other = random_source("tiny", seed=1, parts=("retrieval",))
    caption = save_hf_dir(tiny.captioning, tmp_path / "caption")
    itm = save_hf_dir(other.retrieval, tmp_path / "itm")

    source = load_blip_source([caption, itm])

    assert not source.shared_vision
    assert source.retrieval.vision_model is not source.captioning.vision_model
    assert_same_tensors(tiny.captioning, source.captioning)
    assert_same_tensors(other.retrieval, source.retrieval)


def test_two_captioning_checkpoints_are_refused(tiny, tmp_path):
    a = save_hf_dir(tiny.captioning, tmp_path / "a")
    b = save_hf_dir(tiny.captioning, tmp_path / "b")
    with pytest.raises(InputError, match="both hold a captioning model"):
        load_blip_source([a, b])


def test_checkpoints_of_different_image_sizes_need_an_image_size(tiny, tmp_path):
    caption = save_hf_dir(tiny.captioning, tmp_path / "caption")
    itm = save_hf_dir(random_source("tiny", image_size=96, parts=("retrieval",)).retrieval, tmp_path / "itm")
    with pytest.raises(InputError, match="different image sizes"):
        load_blip_source([caption, itm])

    source = load_blip_source([caption, itm], image_size=96)

    assert source.image_size == 96
    assert source.retrieval.vision_model.embeddings.position_embedding.shape == (1, 1 + 6 * 6, TINY.vision_hidden)


# --- original Salesforce files ------------------------------------------------------------------


def test_pretrain_pth_loads_both_parts_and_drops_training_state(tiny, inputs, tmp_path):
    state, training_keys = salesforce_state_dict(tiny.captioning, tiny.retrieval)
    assert "visual_encoder.blocks.0.attn.qkv.weight" in state and "visual_encoder_m.pos_embed" in state
    path = save_pth(state, tmp_path / "model_base.pth")

    source = load_blip_source([path])

    assert (source.format, source.path) == ("salesforce-pth", path)
    assert source.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert source.absent == {}
    assert sorted(source.dropped_keys) == training_keys
    assert source.retrieval.vision_model is source.captioning.vision_model
    assert_same_tensors(tiny.captioning, source.captioning)
    assert_same_tensors(tiny.retrieval, source.retrieval)
    vision = source.captioning.config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (128, 2, 2)
    assert vision.image_size == TINY.image_size and source.image_size == TINY.image_size
    assert vision.layer_norm_eps == 1e-6
    assert source.captioning.vision_model.post_layernorm.eps == 1e-6
    assert_same_outputs(tiny, source, inputs)


def test_captioning_pth_has_no_text_encoder(tiny, tmp_path):
    state, training_keys = salesforce_state_dict(tiny.captioning)
    path = save_pth(state, tmp_path / "model_base_caption_capfilt_large.pth")

    source = load_blip_source([path])

    assert source.retrieval is None
    assert set(source.absent) == {"text_encoder"}
    assert "model_base_caption_capfilt_large.pth has no text_encoder" in source.absent["text_encoder"]
    assert source.dropped_keys == training_keys == ["text_decoder.bert.embeddings.position_ids"]
    assert_same_tensors(tiny.captioning, source.captioning)


def test_retrieval_pth_has_no_text_decoder(tiny, tmp_path):
    state, training_keys = salesforce_state_dict(retrieval=tiny.retrieval)
    path = save_pth(state, tmp_path / "model_base_retrieval_coco.pth")

    source = load_blip_source([path])

    assert source.captioning is None and set(source.absent) == {"text_decoder"}
    queues = {"idx_queue", "image_queue", "text_queue", "ptr_queue", "temp"}
    assert queues | {"visual_encoder_m.pos_embed", "text_proj_m.weight"} <= set(source.dropped_keys)
    assert sorted(source.dropped_keys) == training_keys
    assert_same_tensors(tiny.retrieval, source.retrieval)


def test_bare_state_dict_and_safetensors_load_the_same(tiny, tmp_path):
    state, _ = salesforce_state_dict(tiny.captioning, tiny.retrieval)
    bare = save_pth(state, tmp_path / "bare.pth", wrapped=False)
    tensors = save_salesforce_safetensors(state, tmp_path / "model_base.safetensors")

    for path, format in ((bare, "salesforce-pth"), (tensors, "safetensors")):
        source = load_blip_source([path])
        assert source.format == format
        assert_same_tensors(tiny.captioning, source.captioning)
        assert_same_tensors(tiny.retrieval, source.retrieval)


def test_image_size_resizes_position_embeddings_bicubically(tiny, inputs, tmp_path):
    state, _ = salesforce_state_dict(tiny.captioning, tiny.retrieval)
    path = save_pth(state, tmp_path / "model.pth")

    source = load_blip_source([path], image_size=96)

    table = tiny.captioning.vision_model.embeddings.position_embedding.detach()  # 1 + 4 x 4 positions
    grid = table[0, 1:].T.reshape(1, TINY.vision_hidden, 4, 4)
    resized = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    expected = torch.cat([table[0, :1], resized.reshape(TINY.vision_hidden, 36).T])[None]
    loaded = source.captioning.vision_model.embeddings.position_embedding
    assert loaded.shape == (1, 37, TINY.vision_hidden)
    torch.testing.assert_close(loaded.detach(), expected, rtol=0, atol=1e-7)
    assert source.image_size == 96 and source.retrieval.config.vision_config.image_size == 96
    with torch.no_grad():
        embeds = source.captioning.vision_model(pixel_values=torch.zeros(1, 3, 96, 96)).last_hidden_state
    assert embeds.shape == (1, 37, TINY.vision_hidden)


def test_image_size_not_a_multiple_of_the_patch_is_refused(tiny, tmp_path):
    path = save_pth(salesforce_state_dict(tiny.captioning)[0], tmp_path / "model.pth")
    with pytest.raises(InputError, match="multiple of the patch size 16"):
        load_blip_source([path], image_size=100)


# --- bad input ----------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pth"):
        load_blip_source([tmp_path / "nope.pth"])


def test_a_resnet_state_dict_is_not_blip(tmp_path):
    resnet = {"conv1.weight": torch.randn(8, 3, 7, 7), "bn1.weight": torch.ones(8), "fc.weight": torch.randn(10, 8)}
    path = save_pth(resnet, tmp_path / "resnet18.pth", wrapped=False)
    with pytest.raises(CheckpointError, match=r"resnet18\.pth: not a BLIP checkpoint.*conv1\.weight"):
        load_blip_source([path])


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file(tiny, tmp_path, suffix):
    state, _ = salesforce_state_dict(tiny.captioning)
    whole = tmp_path / f"whole{suffix}"
    (save_pth if suffix == ".pth" else save_salesforce_safetensors)(state, whole)
    half = tmp_path / f"half{suffix}"
    data = whole.read_bytes()
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"half\\{suffix}: .*truncated or corrupt"):
        load_blip_source([half])


@pytest.mark.parametrize(
    "key",
    [
        "visual_encoder.blocks.0.mlp.fc1.weight",  # read to infer the MLP width
        "visual_encoder.blocks.1.attn.proj.bias",
        "text_decoder.cls.predictions.transform.dense.bias",
    ],
)
def test_missing_key_is_named(tiny, tmp_path, key):
    state, _ = salesforce_state_dict(tiny.captioning)
    del state[key]
    path = save_pth(state, tmp_path / "incomplete.pth")
    with pytest.raises(CheckpointError, match=f"incomplete.pth: missing key.*{key}"):
        load_blip_source([path])


def test_unexpected_key_is_named(tiny, tmp_path):
    state, _ = salesforce_state_dict(tiny.captioning)
    state["visual_encoder.head.weight"] = torch.zeros(10, 128)
    path = save_pth(state, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"extra.pth: unexpected keys visual_encoder\.head\.weight"):
        load_blip_source([path])


def test_many_missing_keys_are_listed_briefly(tiny, tmp_path):
    state, _ = salesforce_state_dict(tiny.captioning)
    for key in [k for k in state if k.startswith("visual_encoder.blocks.1.")]:
        del state[key]
    state.update({f"extra.{i}": torch.zeros(1) for i in range(8)})
    path = save_pth(state, tmp_path / "damaged.pth")
    with pytest.raises(CheckpointError) as caught:
        load_blip_source([path])
    message = str(caught.value)
    assert "\n" not in message
    assert "and 3 more" in message  # 8 unexpected keys: five named


def test_hf_dir_with_missing_weights_names_them(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_hf_dir(tiny.retrieval, tmp_path / "itm")
    weights = load_file(folder / "model.safetensors")
    del weights["itm_head.bias"]
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors: missing keys itm_head\.bias"):
        load_blip_source([folder])


class _WritesAMarker:
    """Unpickling this would create a file: proof that the pickle ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def test_a_pickle_that_runs_code_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"visual_encoder.cls_token": torch.zeros(1, 1, 64), "x": _WritesAMarker(marker)}}, path)
    assert not marker.exists()

    with pytest.raises(CheckpointError, match=r"evil\.pth: refused.*open"):
        load_blip_source([path])
    assert not marker.exists()


def test_hf_dir_of_another_model_type(tmp_path):
    folder = tmp_path / "resnet-50"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "resnet"}')
    with pytest.raises(CheckpointError, match=r"resnet-50.*'resnet' model, not BLIP"):
        load_blip_source([folder])


def test_transformers_names_without_a_config_point_to_the_directory(tiny, tmp_path):
    path = save_pth(tiny.captioning.state_dict(), tmp_path / "hf.pth", wrapped=False)
    with pytest.raises(CheckpointError, match=r"hf\.pth: .*Hugging Face directory"):
        load_blip_source([path])


# --- random presets -----------------------------------------------------------------------------


def test_random_source_is_seeded_and_not_trivial():
    a, b, c = random_source("tiny", seed=3), random_source("tiny", seed=3), random_source("tiny", seed=4)
    assert_same_tensors(a.captioning, b.captioning)
    assert not torch.equal(a.captioning.vision_model.post_layernorm.bias, c.captioning.vision_model.post_layernorm.bias)
    assert a.retrieval.vision_model is a.captioning.vision_model
    layer = a.captioning.vision_model.encoder.layers[0]
    assert layer.self_attn.qkv.bias.abs().min() > 0
    assert not torch.equal(layer.layer_norm1.weight, torch.ones_like(layer.layer_norm1.weight))
    assert 0.015 < layer.mlp.fc1.weight.std() < 0.025
    assert (a.format, a.path, a.sha256) == ("random", None, None)
    only_retrieval = random_source("tiny", seed=3, parts=("retrieval",))
    assert_same_tensors(a.retrieval, only_retrieval.retrieval)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(InputError, match="tiny, base, large"):
        random_source("huge")
