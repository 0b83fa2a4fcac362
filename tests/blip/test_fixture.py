"""The bundled tiny BLIP really captions and matches: read through the real loader, run in PyTorch.

Images are preprocessed by transformers' BlipImageProcessor and text by its BertTokenizer, not by the
fixture's own helpers, so the accuracies below do not depend on the code that trained the model.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import BertTokenizer, BlipImageProcessor

from plugins.blip import fixture
from plugins.blip.checkpoint import load_blip_source
from plugins.blip.conversion import load_source
from plugins.blip.fixture import scenes
from plugins.blip.plugin import converter_split_model
from plugins.blip.recipes import BlipConversion
from tests.conftest import REPO

HELDOUT = 100
PROMPT = "a picture of"
REQUIRED = 0.9  # of held-out scenes: exact greedy captions, ITM ranking the right caption first


@pytest.fixture(scope="module")
def model():
    source = load_blip_source([fixture.checkpoint_path()])
    tokenizer = BertTokenizer.from_pretrained(str(fixture.tokenizer_dir()))
    processor = BlipImageProcessor(size={"height": 64, "width": 64})  # BLIP's bicubic resize and statistics
    held_out = fixture.heldout_scenes(HELDOUT)
    pixels = processor([fixture.draw(scene) for scene in held_out], return_tensors="pt").pixel_values
    return source, tokenizer, held_out, pixels


def test_greedy_captions_of_held_out_scenes_are_exactly_right(model):
    source, tokenizer, held_out, pixels = model
    prompt = tokenizer([PROMPT] * len(held_out), return_tensors="pt").input_ids  # [CLS] a picture of [SEP]

    with torch.no_grad():
        generated = source.captioning.generate(pixel_values=pixels, input_ids=prompt, max_new_tokens=12,
                                               do_sample=False, num_beams=1)  # fmt: skip
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)  # the prompt, then the caption
    captions = [text.removeprefix(PROMPT).strip() for text in texts]

    wrong = [f"{scene.caption!r} -> {got!r}" for got, scene in zip(captions, held_out) if got != scene.caption]
    assert len(held_out) - len(wrong) >= REQUIRED * len(held_out), wrong


def test_itm_ranks_the_right_caption_above_four_one_attribute_distractors(model):
    source, tokenizer, held_out, pixels = model
    texts = [text for scene in held_out for text in (scene.caption, *scene.distractors())]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    input_ids = encoded.input_ids.clone()
    input_ids[:, 0] = tokenizer.convert_tokens_to_ids("[ENC]")  # ITM reads the text with [ENC] first

    with torch.no_grad():
        itm = source.retrieval(
            input_ids=input_ids,
            attention_mask=encoded.attention_mask,
            pixel_values=pixels.repeat_interleave(5, dim=0),
            use_itm_head=True,
        ).itm_score

    match = torch.softmax(itm, dim=-1)[:, 1].view(len(held_out), 5)  # right caption first, then 4 distractors
    first = (match[:, 0] > match[:, 1:].amax(dim=1)).sum().item()
    assert first >= REQUIRED * len(held_out)


def test_distractors_differ_from_the_caption_in_one_word():
    for scene in fixture.heldout_scenes(20):
        words = scene.caption.split()
        for distractor in scene.distractors():
            changed = [(a, b) for a, b in zip(words, distractor.split()) if a != b]
            # a count change may also change the noun's number ("circle" -> "circles")
            assert 1 <= len(changed) <= 2 and distractor != scene.caption


def test_scenes_are_drawn_the_same_way_every_time_without_torch():
    # A fresh interpreter in which `import torch` fails: the drawer and the held-out set need none.
    code = (
        "import sys, hashlib; sys.modules['torch'] = None\n"
        "from plugins.blip import fixture\n"
        "images = [fixture.draw(s) for s in fixture.heldout_scenes(5)]\n"
        "print(hashlib.sha256(fixture.pixel_values(images).tobytes()).hexdigest())\n"
    )
    runs = [subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True) for _ in range(2)]
    assert all(run.returncode == 0 for run in runs), runs[0].stderr
    assert runs[0].stdout == runs[1].stdout

    scene = fixture.heldout_scenes(1)[0]
    image = fixture.draw(scene)
    assert image.mode == "RGB" and image.size == (64, 64)
    assert image.tobytes() == fixture.draw(scenes.scene(scene.seed)).tobytes()


def test_held_out_seeds_are_never_training_seeds():
    last_run = fixture.HELDOUT_SEED_BASE // fixture.TRAINING_SEEDS_PER_RUN - 1
    last_training = fixture.training_scene(last_run, fixture.TRAINING_SEEDS_PER_RUN - 1).seed
    assert last_training < min(scene.seed for scene in fixture.heldout_scenes(200))
    with pytest.raises(ValueError):
        fixture.training_scene(last_run + 1, 0)


def test_checkpoint_is_small_and_in_the_salesforce_layout():
    path = fixture.checkpoint_path()
    assert path.stat().st_size < 10 * 2**20

    data = torch.load(path, map_location="cpu", weights_only=True)

    assert list(data) == ["model"]
    state = data["model"]
    modules = {key.split(".")[0] for key in state}
    assert modules == {"visual_encoder", "text_encoder", "text_decoder", "vision_proj", "text_proj", "itm_head"}
    assert state["visual_encoder.patch_embed.proj.weight"].shape == (128, 3, 8, 8)
    assert state["visual_encoder.pos_embed"].shape == (1, 65, 128)  # 8 x 8 patches + [CLS]
    assert "visual_encoder.blocks.3.attn.qkv.weight" in state and "visual_encoder.norm.weight" in state


def test_loader_reads_the_shape_the_fixture_was_trained_at():
    source = load_blip_source([fixture.checkpoint_path()])
    vocab = (fixture.tokenizer_dir() / "vocab.txt").read_text().splitlines()

    vision, text = source.captioning.config.vision_config, source.captioning.config.text_config
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers) == (64, 8, 128, 4)
    assert (text.hidden_size, text.num_attention_heads, text.num_hidden_layers) == (128, 2, 4)
    assert text.vocab_size == len(vocab)
    assert source.retrieval.vision_model is source.captioning.vision_model
    assert {name: vocab[index] for name, index in source.tokens.items()} == {
        "DEC": "[DEC]", "ENC": "[ENC]", "SEP": "[SEP]", "PAD": "[PAD]", "CLS": "[CLS]",
    }  # fmt: skip


def test_convert_blip_without_a_checkpoint_takes_the_fixture_and_its_tokenizer():
    source = load_source([], random_weights=False, preset="base", image_size=None, seed=0, tokenizer=None)

    plan = converter_split_model(BlipConversion(source))

    vocab = (fixture.tokenizer_dir() / "vocab.txt").read_text().splitlines()
    assert source.path == fixture.checkpoint_path()
    assert plan.metadata["tokenizer"]["files"] == ["tokenizer/tokenizer_config.json", "tokenizer/vocab.txt"]
    assert plan.metadata["generation"]["prompt_ids"] == [vocab.index(word) for word in ("[DEC]", "a", "picture", "of")]
    assert {spec.name for spec in plan.modules} == {"vision_encoder", "text_encoder", "text_decoder",
                                                    "text_decoder_with_past"}  # fmt: skip


def test_vision_stage_labels_are_the_attributes_the_caption_names():
    from plugins.blip.fixture import train

    drawn = fixture.heldout_scenes(30)
    labels = train.attribute_labels(drawn)
    classes = scenes.ATTRIBUTE_VALUES
    for index, item in enumerate(drawn):
        named = {name: classes[name][int(labels[name][index])] for name in classes}
        assert scenes.caption(**named) == item.caption


def test_the_training_script_is_deterministic_and_writes_what_the_loader_reads(tmp_path):
    # A few steps of both stages, twice: the same weights, a checkpoint the real loader reads, and a
    # report of what was measured on it (the accuracies after 30 steps are whatever they are).
    from plugins.blip.fixture import train

    reports = [train.train(30, tmp_path / run, seed=3, vision_steps=30) for run in ("a", "b")]
    assert reports[0]["checkpoint"]["sha256"] == reports[1]["checkpoint"]["sha256"]
    report = reports[0]
    assert report["vision_stage"]["steps"] == 30 and set(report["vision_stage"]["heldout_attribute_accuracy"]) == {
        "count", "colour", "shape", "background"}  # fmt: skip
    assert 0 <= report["greedy_exact_match"] <= 100 and report["total_seconds"] > report["joint_train_seconds"]
    source = load_blip_source([tmp_path / "a" / fixture.CHECKPOINT])
    assert source.retrieval is not None and source.captioning.config.vision_config.image_size == 64
