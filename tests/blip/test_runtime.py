"""The torch-free runtime captions and scores like transformers' BLIP, token for token.

A user converts a model, then captions images and matches texts with onnxruntime alone. Every
expected value comes from transformers (`generate`, the retrieval model, `BlipImageProcessorPil`,
`BertTokenizer`), never from the runtime.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import BertTokenizer, BlipImageProcessorPil

from converter_core.cli import run
from converter_core.errors import InputError
from converter_core.pipeline import ConvertOptions, convert
from plugins.blip.presets import random_source
from plugins.blip.recipes import BlipConversion
from plugins.blip.runtime import BlipRuntime
from plugins.blip.source import BlipSource

pytestmark = [
    pytest.mark.filterwarnings("ignore:# The axis name:UserWarning"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning"),
]

PAD, CLS, SEP = 0, 101, 102
PROMPT = "a picture of "
WORDS = ("a picture of one two three red green blue yellow circle circles square squares triangle triangles "
         "on white black gray background").split()
MAX_TOKENS = 12


def write_vocab(directory: Path, vocab_size: int) -> Path:
    """A BERT-style vocab.txt whose special ids are bert-base-uncased's, with [DEC] and [ENC] last."""
    vocab = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    vocab += [f"word{i}" for i in range(len(vocab), vocab_size - 2)] + ["[DEC]", "[ENC]"]
    directory.mkdir(parents=True)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return directory


def perturb(source: BlipSource, seed: int = 1) -> None:
    """Noise on every weight, and a likelier [SEP].

    With the preset's 0.02-std weights the tiny decoder all but ignores the image and never stops;
    with this noise the captions differ per image, repeat tokens, and end at different lengths, so
    the cross-attention cache, the repetition penalty and the stop handling are all exercised.
    """
    generator = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for model in (source.captioning, source.retrieval):
            for parameter in model.parameters():
                if id(parameter) not in seen:
                    seen.add(id(parameter))
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
        source.captioning.text_decoder.cls.predictions.bias[SEP] += 4.0


def noise_image(seed: int, size: tuple[int, int] = (80, 70)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def drawn_image(colour: str, background: str, size: tuple[int, int] = (96, 72)) -> Image.Image:
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    draw.ellipse((8, 8, 40, 40), fill=colour)
    draw.rectangle((50, 20, 80, 50), fill=colour)
    return image


def sample_images() -> list[Image.Image]:
    return [noise_image(1), noise_image(2, (64, 64)), noise_image(3, (33, 120)), noise_image(4, (200, 150)),
            drawn_image("red", "gray"), drawn_image("blue", "white")]


@dataclass
class Tiny:
    source: BlipSource
    out: Path
    tokenizer: BertTokenizer
    processor: BlipImageProcessorPil

    def generate(self, images: list[Image.Image], prompt: str | None, **kwargs) -> list[list[int]]:
        """transformers' tokens after the prompt, up to and including the first [SEP]."""
        pixel_values = self.processor(images, return_tensors="pt").pixel_values
        input_ids = None
        prompt_len = 1  # generate's default prompt is [DEC] alone
        if prompt is not None:
            input_ids = self.tokenizer([prompt] * len(images), return_tensors="pt").input_ids
            prompt_len = input_ids.shape[1] - 1  # generate puts [DEC] over [CLS] and drops [SEP]
        with torch.no_grad():
            rows = self.source.captioning.generate(pixel_values, input_ids=input_ids, do_sample=False, **kwargs)
        return [until_sep(row[prompt_len:]) for row in rows.tolist()]


def until_sep(tokens: list[int]) -> list[int]:
    return tokens[: tokens.index(SEP) + 1] if SEP in tokens else tokens


def processor_for(manifest: dict) -> BlipImageProcessorPil:
    settings = manifest["preprocessing"]
    size = settings["image_size"]
    return BlipImageProcessorPil(size={"height": size, "width": size}, image_mean=settings["mean"],
                                 image_std=settings["std"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    """The tiny preset, perturbed, converted once with a tokenizer (validation is other tests' job)."""
    folder = tmp_path_factory.mktemp("runtime")
    source = random_source("tiny", seed=0)
    perturb(source)
    source.tokenizer_dir = write_vocab(folder / "vocab", source.captioning.config.text_config.vocab_size)
    out = folder / "blip-tiny"
    convert(BlipConversion(source), ConvertOptions(output_dir=out, validate=False))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"]["files"] == ["tokenizer/vocab.txt"]
    tokenizer = BertTokenizer.from_pretrained(str(source.tokenizer_dir))
    return Tiny(source, out, tokenizer, processor_for(manifest))


@pytest.fixture(scope="module")
def runtime(tiny) -> BlipRuntime:
    return BlipRuntime(tiny.out, threads=1)


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


def test_preprocessing_equals_the_transformers_image_processor(tiny, runtime):
    transparent = Image.new("RGBA", (50, 40), (255, 0, 0, 0))
    ImageDraw.Draw(transparent).ellipse((5, 5, 30, 30), fill=(0, 0, 255, 160))
    images = [*sample_images(), noise_image(5).convert("L"), transparent, noise_image(6).convert("P")]

    pixel_values = runtime.pixel_values(images)

    expected = tiny.processor(images, return_tensors="np").pixel_values
    assert pixel_values.dtype == np.float32 and pixel_values.shape == expected.shape == (9, 3, 64, 64)
    assert np.abs(pixel_values - expected).max() <= 1e-5


# --------------------------------------------------------------------------------------------
# Captioning: the same tokens as generate
# --------------------------------------------------------------------------------------------

# (label, runtime options, generate options, the generate options whose result must differ):
# the last proves that an option changes the captions, or matching generate with it proves little.
CAPTION_CASES = [
    ("greedy", {}, {"num_beams": 1}, None),
    ("greedy, min 6 tokens", {"min_tokens": 6}, {"num_beams": 1, "min_new_tokens": 6}, {"num_beams": 1}),
    ("greedy, repetition penalty", {"repetition_penalty": 1.3}, {"num_beams": 1, "repetition_penalty": 1.3},
     {"num_beams": 1}),
    ("beam 3", {"beams": 3}, {"num_beams": 3}, {"num_beams": 1}),
    ("beam 3, min 6 tokens", {"beams": 3, "min_tokens": 6}, {"num_beams": 3, "min_new_tokens": 6},
     {"num_beams": 3}),
    # min_length counts the prompt ([DEC] a picture of: 4 tokens): the same rule said the other way.
    ("beam 3, min_length 10", {"beams": 3, "min_tokens": 6}, {"num_beams": 3, "min_length": 10}, None),
    ("beam 3, repetition penalty", {"beams": 3, "repetition_penalty": 1.3},
     {"num_beams": 3, "repetition_penalty": 1.3}, {"num_beams": 3}),
    ("beam 4, min 3 tokens, penalty", {"beams": 4, "min_tokens": 3, "repetition_penalty": 1.2},
     {"num_beams": 4, "min_new_tokens": 3, "repetition_penalty": 1.2}, None),
]


@pytest.mark.parametrize("label, options, generate_options, differs_from", CAPTION_CASES,
                         ids=[case[0] for case in CAPTION_CASES])
def test_captions_are_the_tokens_of_generate(tiny, runtime, label, options, generate_options, differs_from):
    images = sample_images()

    captions = runtime.caption(images, max_tokens=MAX_TOKENS, **options)

    expected = tiny.generate(images, PROMPT, max_new_tokens=MAX_TOKENS, **generate_options)
    assert [c.token_ids for c in captions] == expected
    if differs_from is not None:
        assert tiny.generate(images, PROMPT, max_new_tokens=MAX_TOKENS, **differs_from) != expected


@pytest.mark.parametrize("beams", [1, 3])
def test_captions_end_at_different_lengths_and_differ_per_image(tiny, runtime, beams):
    # What makes the parity above meaningful: some captions stop early ([SEP]), some run to the
    # limit, and the images get different captions.
    captions = [c.token_ids for c in runtime.caption(sample_images(), beams=beams, max_tokens=MAX_TOKENS)]

    assert any(c[-1] == SEP and len(c) < MAX_TOKENS for c in captions)
    assert any(len(c) == MAX_TOKENS and SEP not in c for c in captions)
    assert len({tuple(c) for c in captions}) >= 4


def test_captions_without_a_prompt_are_the_tokens_of_generate(tiny, runtime):
    images = sample_images()[:3]

    captions = runtime.caption(images, beams=2, max_tokens=MAX_TOKENS, prompt="")

    assert [c.token_ids for c in captions] == tiny.generate(images, None, num_beams=2, max_new_tokens=MAX_TOKENS)


def test_caption_text_is_what_follows_the_prompt(tiny, runtime):
    images = sample_images()[:4]

    captions = runtime.caption(images, max_tokens=MAX_TOKENS)

    prompt_ids = tiny.tokenizer(PROMPT).input_ids[:-1]
    prompt_text = tiny.tokenizer.decode(prompt_ids, skip_special_tokens=True)
    for caption, tokens in zip(captions, tiny.generate(images, PROMPT, max_new_tokens=MAX_TOKENS)):
        text = tiny.tokenizer.decode(prompt_ids + tokens, skip_special_tokens=True)
        assert text.startswith(prompt_text)
        assert caption.text == text[len(prompt_text):].strip()  # as BLIP cuts its prompt off
    assert any(caption.text for caption in captions)


def test_beam_scores_are_the_sequence_scores_of_generate(tiny, runtime):
    images = sample_images()[:3]

    captions = runtime.caption(images, beams=3, max_tokens=MAX_TOKENS)

    pixel_values = tiny.processor(images, return_tensors="pt").pixel_values
    input_ids = tiny.tokenizer([PROMPT] * 3, return_tensors="pt").input_ids
    with torch.no_grad():
        out = tiny.source.captioning.generate(pixel_values, input_ids=input_ids, num_beams=3, do_sample=False,
                                              max_new_tokens=MAX_TOKENS, output_scores=True,
                                              return_dict_in_generate=True)
    np.testing.assert_allclose([c.score for c in captions], out.sequences_scores.numpy(), atol=1e-4)


def test_caption_refuses_more_tokens_than_the_model_has_positions(runtime):
    positions = runtime.manifest["generation"]["max_position_embeddings"]
    with pytest.raises(InputError, match="positions"):
        runtime.caption([noise_image(1)], max_tokens=positions)


# --------------------------------------------------------------------------------------------
# Matching: ITM and ITC as the retrieval model computes them
# --------------------------------------------------------------------------------------------


def test_match_gives_the_retrieval_models_itm_probability_and_itc_similarity(tiny, runtime):
    image = drawn_image("red", "gray")
    texts = ["a picture of one red circle", "two blue squares on a white background", "gray", "three triangles"]

    matches = runtime.match(image, texts)

    retrieval = tiny.source.retrieval
    encoded = tiny.tokenizer(texts, padding=True, return_tensors="pt")
    pixel_values = tiny.processor([image] * len(texts), return_tensors="pt").pixel_values
    itm_ids = encoded.input_ids.clone()
    itm_ids[:, 0] = runtime.tokens["ENC"]
    with torch.no_grad():
        itm = retrieval(input_ids=itm_ids, pixel_values=pixel_values, attention_mask=encoded.attention_mask,
                        use_itm_head=True)
        itc = retrieval(input_ids=encoded.input_ids, pixel_values=pixel_values,
                        attention_mask=encoded.attention_mask, use_itm_head=False)
    itm_probability = torch.softmax(itm.itm_score, dim=-1)[:, 1].numpy()
    itc_similarity = itc.itm_score.diagonal().numpy()
    assert [m.text for m in matches] == texts
    assert np.abs(np.array([m.itm_probability for m in matches]) - itm_probability).max() <= 1e-4
    assert np.abs(np.array([m.itc_similarity for m in matches]) - itc_similarity).max() <= 1e-4
    assert itm_probability.max() - itm_probability.min() > 1e-3, "the texts must score differently"


# --------------------------------------------------------------------------------------------
# No torch
# --------------------------------------------------------------------------------------------

NO_TORCH = """
import importlib.abc, json, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} is not installed here")

sys.meta_path.insert(0, Refuse())
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("torch was importable")

from plugins.blip.runtime import BlipRuntime

runtime = BlipRuntime(sys.argv[1])
caption = runtime.caption([sys.argv[2]], beams=3, max_tokens=8)[0]
match = runtime.match(sys.argv[2], ["a red circle"])[0]
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in ("torch", "transformers"))
print(json.dumps({"token_ids": caption.token_ids, "itm": match.itm_probability, "loaded": loaded}))
"""


def test_the_runtime_runs_where_torch_cannot_be_imported(tiny, tmp_path):
    image = tmp_path / "shapes.png"
    drawn_image("red", "gray").save(image)

    result = subprocess.run([sys.executable, "-c", NO_TORCH, str(tiny.out), str(image)],
                            capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["loaded"] == []
    assert answer["token_ids"] == tiny.generate([Image.open(image)], PROMPT, num_beams=3, max_new_tokens=8)[0]


# --------------------------------------------------------------------------------------------
# The commands
# --------------------------------------------------------------------------------------------


def convert_cli(capsys, *args: str) -> tuple[int, str, str]:
    """`convert ARGS` in this process (the plugins are loaded already), with what it printed."""
    capsys.readouterr()
    code = run(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def image_files(tmp_path) -> list[Path]:
    paths = [tmp_path / "noise.png", tmp_path / "shapes.jpg"]
    noise_image(1).save(paths[0])
    drawn_image("blue", "white").save(paths[1], quality=95)
    return paths


def test_caption_command_prints_json(tiny, capsys, image_files):
    code, out, err = convert_cli(capsys, "caption", str(tiny.out), *map(str, image_files), "--beams", "3",
                                 "--max-tokens", "10", "--json")

    assert code == 0, err
    rows = json.loads(out)
    assert [row["image"] for row in rows] == [str(p) for p in image_files]
    expected = tiny.generate([Image.open(p) for p in image_files], PROMPT, num_beams=3, max_new_tokens=10)
    assert [row["token_ids"] for row in rows] == expected
    assert all(isinstance(row["caption"], str) and isinstance(row["score"], float) for row in rows)


def test_caption_command_prints_one_line_per_image(tiny, capsys, image_files):
    code, out, err = convert_cli(capsys, "caption", str(tiny.out), str(image_files[0]), "--prompt", "")

    assert code == 0, err
    assert out.startswith(f"{image_files[0]}: ")


def test_match_command_prints_json(tiny, capsys, image_files):
    code, out, err = convert_cli(capsys, "match", str(tiny.out), str(image_files[1]), "a blue square", "red", "--json")

    assert code == 0, err
    answer = json.loads(out)
    assert answer["image"] == str(image_files[1])
    assert [m["text"] for m in answer["matches"]] == ["a blue square", "red"]
    assert all(0 <= m["itm_probability"] <= 1 and -1 <= m["itc_similarity"] <= 1 for m in answer["matches"])


def test_a_bad_image_file_is_exit_2_naming_it(tiny, capsys, tmp_path, image_files):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")

    code, _, err = convert_cli(capsys, "caption", str(tiny.out), str(image_files[0]), str(broken))
    assert code == 2 and str(broken) in err and "not an image" in err

    code, _, err = convert_cli(capsys, "match", str(tiny.out), str(tmp_path / "missing.png"), "a cat")
    assert code == 2 and "missing.png: no such image file" in err


def test_a_directory_that_is_no_blip_output_is_exit_2(capsys, tmp_path, image_files):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = convert_cli(capsys, "caption", str(empty), str(image_files[0]))
    assert code == 2 and "no manifest.json" in err

    other = tmp_path / "toy"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"format_version": 1, "model_type": "toy", "modules": {}}))
    code, _, err = convert_cli(capsys, "match", str(other), str(image_files[0]), "a cat")
    assert code == 2 and '"toy" conversion, not a BLIP one' in err


def test_a_changed_or_missing_graph_is_exit_2(tiny, capsys, tmp_path, image_files):
    changed = shutil.copytree(tiny.out, tmp_path / "changed")
    with open(changed / "text_decoder.onnx", "ab") as handle:
        handle.write(b"\0")
    code, _, err = convert_cli(capsys, "caption", str(changed), str(image_files[0]))
    assert code == 2 and "text_decoder.onnx: its sha256 differs from the manifest's" in err

    (changed / "text_encoder.onnx").unlink()
    code, _, err = convert_cli(capsys, "match", str(changed), str(image_files[0]), "a cat")
    assert code == 2 and "text_encoder.onnx (module text_encoder) is missing" in err


def test_match_without_a_text_encoder_says_the_checkpoint_had_none(tiny, capsys, tmp_path, image_files):
    # What `convert blip` writes for a captioning-only checkpoint: no text_encoder, and why.
    captioning_only = shutil.copytree(tiny.out, tmp_path / "captioning-only")
    manifest = json.loads((captioning_only / "manifest.json").read_text())
    del manifest["modules"]["text_encoder"]
    manifest["not_exported"]["text_encoder"] = "the checkpoint holds no text_encoder weights"
    (captioning_only / "manifest.json").write_text(json.dumps(manifest))

    code, _, err = convert_cli(capsys, "match", str(captioning_only), str(image_files[0]), "a cat")

    assert code == 2 and "the checkpoint had no text encoder" in err


# --------------------------------------------------------------------------------------------
# Base size
# --------------------------------------------------------------------------------------------


def test_base_size_greedy_parity(tmp_path):
    """The base preset (ViT-B/16 at 384 px, BERT-base decoder, 30524 tokens): greedy tokens of
    generate for two images, after BLIP's own prompt ids from the manifest."""
    started = time.perf_counter()
    source = random_source("base", seed=0, parts=("captioning",))
    out = tmp_path / "blip-base"
    convert(BlipConversion(source, max_batch=2, max_text_len=32), ConvertOptions(output_dir=out, validate=False))
    runtime = BlipRuntime(out)
    images = [noise_image(7, (500, 375)), drawn_image("green", "black", (320, 400))]

    captions = runtime.caption(images, max_tokens=20)

    prompt_ids = runtime.manifest["generation"]["prompt_ids"]
    assert prompt_ids == [runtime.tokens["DEC"], 1037, 3861, 1997]
    pixel_values = processor_for(runtime.manifest)(images, return_tensors="pt").pixel_values
    tokenized = torch.tensor([[CLS, *prompt_ids[1:], SEP]] * 2)
    with torch.no_grad():
        rows = source.captioning.generate(pixel_values, input_ids=tokenized, max_new_tokens=20, num_beams=1,
                                          do_sample=False)
    assert [c.token_ids for c in captions] == [until_sep(row[len(prompt_ids):]) for row in rows.tolist()]
    print(f"base-size parity: {time.perf_counter() - started:.0f} s")  # shown with -s; see the closing note


# --------------------------------------------------------------------------------------------
# The bundled fixture model (trained): held-out images
# --------------------------------------------------------------------------------------------


def shipped_fixture():
    from plugins.blip import fixture

    assert fixture.checkpoint_path().is_file(), "the bundled fixture checkpoint is missing"
    return fixture


HELDOUT = 30


@pytest.fixture(scope="module")
def fixture_model(tmp_path_factory):
    """The bundled tiny BLIP, converted once with its tokenizer."""
    fixture = shipped_fixture()
    from plugins.blip.checkpoint import load_blip_source

    source = load_blip_source([fixture.checkpoint_path()])
    source.tokenizer_dir = fixture.tokenizer_dir()
    out = tmp_path_factory.mktemp("fixture") / "blip-fixture"
    convert(BlipConversion(source), ConvertOptions(output_dir=out, validate=False))
    manifest = json.loads((out / "manifest.json").read_text())
    tokenizer = BertTokenizer.from_pretrained(str(fixture.tokenizer_dir()))
    images = [fixture.draw(scene) for scene in fixture.heldout_scenes(HELDOUT)]
    return Tiny(source, out, tokenizer, processor_for(manifest)), images, fixture


@pytest.mark.parametrize("beams", [1, 3])
def test_fixture_heldout_captions_are_the_tokens_of_generate(fixture_model, beams):
    model, images, _ = fixture_model
    runtime = BlipRuntime(model.out, threads=1)

    captions = runtime.caption(images, beams=beams, max_tokens=MAX_TOKENS)

    expected = model.generate(images, PROMPT, num_beams=beams, max_new_tokens=MAX_TOKENS)
    assert [c.token_ids for c in captions] == expected  # 100% of the held-out images


def test_fixture_heldout_itm_probabilities(fixture_model):
    model, images, fixture = fixture_model
    assert model.source.retrieval is not None, "the fixture checkpoint has no text encoder"
    runtime = BlipRuntime(model.out, threads=1)
    retrieval = model.source.retrieval
    worst = 0.0
    for image, scene in zip(images[:10], fixture.heldout_scenes(10)):
        texts = [scene.caption, *scene.distractors()]
        matches = runtime.match(image, texts)
        encoded = model.tokenizer(texts, padding=True, return_tensors="pt")
        itm_ids = encoded.input_ids.clone()
        itm_ids[:, 0] = runtime.tokens["ENC"]
        pixel_values = model.processor([image] * len(texts), return_tensors="pt").pixel_values
        with torch.no_grad():
            itm = retrieval(input_ids=itm_ids, pixel_values=pixel_values, attention_mask=encoded.attention_mask,
                            use_itm_head=True)
        expected = torch.softmax(itm.itm_score, dim=-1)[:, 1].numpy()
        worst = max(worst, float(np.abs(np.array([m.itm_probability for m in matches]) - expected).max()))
    assert worst <= 1e-4


# --------------------------------------------------------------------------------------------
# The original BLIP's beam search (transformers 4.15), for users moving from the Salesforce code
# --------------------------------------------------------------------------------------------

TRANSFORMERS_4_15_FILES = ("generation_beam_search.py", "generation_logits_process.py")


@pytest.fixture(scope="module")
def transformers_4_15(tmp_path_factory):
    """transformers 4.15's own BeamSearchScorer and logits processors, from its wheel on PyPI: the
    code BLIP's `generate` ran. Only these two files are loaded, beside stubs for their imports."""
    import importlib
    import zipfile

    folder = tmp_path_factory.mktemp("transformers-4.15")
    downloaded = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "transformers==4.15.0",
                                 "-d", str(folder)], capture_output=True, text=True, timeout=600)
    assert downloaded.returncode == 0, downloaded.stderr
    package = folder / "transformers_4_15"
    (package / "utils").mkdir(parents=True)
    with zipfile.ZipFile(next(folder.glob("transformers-4.15.0-*.whl"))) as wheel:
        for name in TRANSFORMERS_4_15_FILES:
            (package / name).write_bytes(wheel.read(f"transformers/{name}"))
    (package / "__init__.py").write_text("")
    (package / "file_utils.py").write_text("def add_start_docstrings(*docstr):\n    return lambda fn: fn\n")
    (package / "utils" / "__init__.py").write_text("")
    (package / "utils" / "logging.py").write_text("import logging\nget_logger = logging.getLogger\n")
    sys.path.insert(0, str(folder))
    try:
        return (importlib.import_module("transformers_4_15.generation_beam_search"),
                importlib.import_module("transformers_4_15.generation_logits_process"))
    finally:
        sys.path.remove(str(folder))


def blip_4_15_beam_search(tiny: Tiny, transformers_4_15, images, prompt_ids: list[int], num_beams: int,
                          max_length: int, min_length: int, repetition_penalty: float = 1.0) -> list[list[int]]:
    """BLIP's `generate(num_beams=..., max_length=..., min_length=...)` as transformers 4.15 ran it:
    its `beam_search` loop (written out here, as in generation_utils.py) around its own scorer and
    processors, on the PyTorch model recomputing the whole sequence each step (no cache)."""
    beam_search, processors = transformers_4_15
    model = tiny.source.captioning
    batch = len(images)
    with torch.no_grad():
        pixel_values = tiny.processor(images, return_tensors="pt").pixel_values
        image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state.repeat_interleave(num_beams, 0)
        input_ids = torch.tensor([prompt_ids] * batch).repeat_interleave(num_beams, 0)
        scorer = beam_search.BeamSearchScorer(batch_size=batch, num_beams=num_beams, device="cpu")
        process = processors.LogitsProcessorList(
            ([processors.RepetitionPenaltyLogitsProcessor(repetition_penalty)] if repetition_penalty != 1.0 else [])
            + [processors.MinLengthLogitsProcessor(min_length, SEP)])
        beam_scores = torch.zeros((batch, num_beams))
        beam_scores[:, 1:] = -1e9
        beam_scores = beam_scores.view(-1)
        while True:
            logits = model.text_decoder(input_ids=input_ids, encoder_hidden_states=image_embeds).logits[:, -1, :]
            scores = process(input_ids, torch.nn.functional.log_softmax(logits, dim=-1))
            scores = (scores + beam_scores[:, None]).view(batch, -1)
            vocab = logits.shape[-1]
            scores, tokens = torch.topk(scores, 2 * num_beams, dim=1, largest=True, sorted=True)
            indices, tokens = tokens // vocab, tokens % vocab
            step = scorer.process(input_ids, scores, tokens, indices, pad_token_id=PAD, eos_token_id=SEP)
            beam_scores = step["next_beam_scores"]
            input_ids = torch.cat([input_ids[step["next_beam_indices"], :], step["next_beam_tokens"].unsqueeze(-1)], -1)
            if scorer.is_done or input_ids.shape[-1] >= max_length:
                break
        sequences = scorer.finalize(input_ids, beam_scores, tokens, indices, pad_token_id=PAD, eos_token_id=SEP,
                                    max_length=max_length)["sequences"]
    return [until_sep(row[len(prompt_ids):]) for row in sequences.tolist()]


# Settings under which hypotheses of different lengths compete, so that the conventions can differ.
BLIP_BEAM_CASES = [(3, 12, 4, 1.0), (3, 16, 8, 1.0), (4, 14, 6, 1.2), (2, 10, 5, 1.0)]


def test_beam_scoring_blip_gives_the_original_blips_captions(tiny, runtime, transformers_4_15):
    images = sample_images() + [noise_image(seed, (50 + seed, 64)) for seed in range(5, 17)]
    prompt_ids = runtime.prompt_ids()
    differs = 0
    for beams, max_new, min_new, penalty in BLIP_BEAM_CASES:
        whole = {"max_length": len(prompt_ids) + max_new, "min_length": len(prompt_ids) + min_new}
        expected = blip_4_15_beam_search(tiny, transformers_4_15, images, prompt_ids, beams, repetition_penalty=penalty,
                                         **whole)
        got = runtime.caption(images, beams=beams, max_tokens=max_new, min_tokens=min_new,
                              repetition_penalty=penalty, beam_scoring="blip")
        assert [c.token_ids for c in got] == expected, (beams, max_new, min_new, penalty)
        default = runtime.caption(images, beams=beams, max_tokens=max_new, min_tokens=min_new,
                                  repetition_penalty=penalty)
        differs += sum(a.token_ids != b.token_ids for a, b in zip(got, default))
    assert differs > 0, "no case where the two conventions disagree: the parity above proves little"


def test_blip_defaults_are_blips_generate_and_the_manifest_states_the_units(tiny, runtime, transformers_4_15,
                                                                            capsys, tmp_path):
    generation = runtime.manifest["generation"]
    assert generation["blip_generate"]["max_length"] == 30 and "prompt included" in generation["blip_generate"]["unit"]
    assert "after the prompt" in generation["runtime_defaults"]["unit"]
    images = sample_images()[:3]
    paths = []
    for index, image in enumerate(images):
        paths.append(tmp_path / f"{index}.png")
        image.save(paths[-1])
    prompt_ids = runtime.prompt_ids()
    expected = blip_4_15_beam_search(tiny, transformers_4_15, [Image.open(p).convert("RGB") for p in paths], prompt_ids,
                                     3, max_length=30, min_length=10)
    assert run(["caption", str(tiny.out), *map(str, paths), "--blip-defaults", "--json"]) == 0
    assert [row["token_ids"] for row in json.loads(capsys.readouterr().out)] == expected
    assert run(["caption", str(tiny.out), str(paths[0]), "--blip-defaults", "--beams", "2"]) == 2
    assert "--blip-defaults sets beams itself" in " ".join(capsys.readouterr().err.split())
