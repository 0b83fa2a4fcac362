"""A user converts a BLIP VQA model and asks its pictures questions, without torch.

Every expected answer comes from transformers (`BlipForQuestionAnswering.generate`) or from a
computation with the transformers model's own modules, never from the converter's runtime. The
models are random but noisy, with a likelier [SEP], so answers differ per image and end at
different lengths (near-flat logits would make every search agree with every other).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import BertTokenizer, BlipConfig, BlipForQuestionAnswering, BlipImageProcessorPil
from transformers.models.blip.modeling_blip_text import BlipTextConfig, BlipTextLMHeadModel

from converter_core.cli import run
from converter_core.errors import InputError
from converter_core.pipeline import ConvertOptions, convert
from plugins.backends.web import WebBackend, WebOptions
from plugins.blip import wrappers
from plugins.blip.checkpoint import CheckpointError, load_blip_source
from plugins.blip.presets import random_source
from plugins.blip.recipes import BlipConversion
from plugins.blip.runtime import BlipRuntime
from tests.blip.checkpoint_builders import salesforce_name, salesforce_state_dict, save_hf_dir, save_pth
from tests.blip.test_runtime import drawn_image, noise_image, write_vocab

pytestmark = [
    pytest.mark.filterwarnings("ignore:# The axis name:UserWarning"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning"),
]

PAD, CLS, SEP = 0, 101, 102
QUESTIONS = ["what colour is the circle?", "how many squares", "is there a red square on a gray background?", "what"]
CANDIDATES = ["red", "blue", "one", "two circles", "three red squares", "gray background", "white", "green square"]


def blip_config(vision: int, vision_layers: int, text: int, text_layers: int, image: int, patch: int,
                vocab: int, positions: int) -> BlipConfig:
    """A BLIP config with 64-wide heads, [DEC] and [ENC] the last two ids, bert-base's special ids."""
    return BlipConfig(
        vision_config={"hidden_size": vision, "intermediate_size": 2 * vision, "num_hidden_layers": vision_layers,
                       "num_attention_heads": vision // 64, "image_size": image, "patch_size": patch,
                       "layer_norm_eps": 1e-6, "initializer_range": 0.02},
        text_config={"vocab_size": vocab, "hidden_size": text, "encoder_hidden_size": vision,
                     "intermediate_size": 2 * text, "num_hidden_layers": text_layers,
                     "num_attention_heads": text // 64, "max_position_embeddings": positions,
                     "bos_token_id": vocab - 2, "pad_token_id": PAD, "sep_token_id": SEP, "initializer_range": 0.02},
        initializer_range=0.02,
    )


# Two shapes: the tiny preset's, and one with another depth, width, image size and patch size.
SHAPES = {
    "tiny": blip_config(128, 2, 128, 2, image=64, patch=16, vocab=128, positions=64),
    "narrow": blip_config(64, 3, 64, 3, image=48, patch=8, vocab=150, positions=48),
}


def noisy(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Noise on every weight (biases and LayerNorms included) and a likelier [SEP]."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():  # tied parameters are one object, drawn once
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
        model.text_decoder.cls.predictions.bias[SEP] += 1.0
    return model.eval()


def images() -> list:
    return [noise_image(1), drawn_image("red", "gray"), noise_image(3, (33, 120)), drawn_image("blue", "white")]


@dataclass
class Converted:
    model: BlipForQuestionAnswering
    hf_dir: Path
    out: Path
    tokenizer: BertTokenizer
    processor: BlipImageProcessorPil
    tokens: dict[str, int]

    def question_inputs(self, questions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """BLIP_VQA's question: padding longest, truncation at 35, [ENC] over [CLS]."""
        encoded = self.tokenizer(questions, padding="longest", truncation=True, max_length=35, return_tensors="pt")
        ids = encoded.input_ids.clone()
        ids[:, 0] = self.tokens["ENC"]
        return ids, encoded.attention_mask

    def generate(self, pictures: list, questions: list[str], **kwargs) -> list[list[int]]:
        """transformers' answers: tokens after [DEC], up to and including the first [SEP]."""
        ids, mask = self.question_inputs(questions)
        pixel_values = self.processor(pictures, return_tensors="pt").pixel_values
        with torch.no_grad():
            rows = self.model.generate(input_ids=ids, pixel_values=pixel_values, attention_mask=mask,
                                       do_sample=False, max_length=10, min_length=1, **kwargs)
        return [row[1:row.index(SEP) + 1] if SEP in row else row[1:] for row in rows.tolist()]


def build(shape: str, folder: Path, validate: bool, backends: tuple[str, ...] = ()) -> Converted:
    config = SHAPES[shape]
    torch.manual_seed(0)  # transformers' initialisation draws from the global generator
    model = noisy(BlipForQuestionAnswering(config), seed=len(shape))
    hf_dir = save_hf_dir(model, folder / f"{shape}-hf")
    vocab = write_vocab(folder / f"{shape}-vocab", config.text_config.vocab_size)
    shutil.copy(vocab / "vocab.txt", hf_dir / "vocab.txt")
    out = folder / f"{shape}-onnx"
    options = ConvertOptions(output_dir=out, validate=validate, backends=backends)
    result = convert(BlipConversion(load_blip_source([hf_dir])), options)
    assert not result.failures
    size = config.vision_config.image_size
    processor = BlipImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.48145466, 0.4578275, 0.40821073],
                                      image_std=[0.26862954, 0.26130258, 0.27577711])
    vocab_size = config.text_config.vocab_size
    tokens = {"DEC": vocab_size - 2, "ENC": vocab_size - 1, "SEP": SEP, "PAD": PAD, "CLS": CLS}
    return Converted(model, hf_dir, out, BertTokenizer.from_pretrained(str(vocab)), processor, tokens)


WEB_MISSING = ", ".join(WebBackend()._missing(WebOptions())) or None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Converted:
    # Validated: every graph against PyTorch at the recipe's shape cases, and on the backends.
    return build("tiny", tmp_path_factory.mktemp("vqa"), validate=True, backends=("cpu", "mobile", "web"))


@pytest.fixture(scope="module")
def narrow(tmp_path_factory) -> Converted:
    return build("narrow", tmp_path_factory.mktemp("vqa"), validate=False)


# --------------------------------------------------------------------------------------------
# Conversion: the VQA graphs, each proven against PyTorch
# --------------------------------------------------------------------------------------------


def test_a_vqa_directory_converts_to_validated_vqa_graphs(tiny):
    manifest = json.loads((tiny.out / "manifest.json").read_text())

    assert set(manifest["modules"]) == {"vision_encoder", "question_encoder", "answer_decoder",
                                        "answer_decoder_with_past"}
    assert set(manifest["not_exported"]) == {"text_encoder", "text_decoder"}
    for name, module in manifest["modules"].items():
        assert module["validation"]["status"] == "passed", name
        assert len(module["validation"]["cases"]) >= 3, name
    assert manifest["generation"]["vqa"]["question_max_tokens"] == 35
    assert manifest["generation"]["vqa"]["blip_generate"]["max_length"] == 10
    mask = next(i for i in manifest["modules"]["answer_decoder_with_past"]["inputs"] if i["name"] == "question_mask")
    assert mask["shape"] == ["batch", "question"]
    statuses = {name: backend["status"] for name, backend in manifest["backends"].items()}
    # No page answers questions yet: the web site holds the VQA graphs, so it cannot be called checked.
    assert statuses == {"cpu": "passed", "mobile": "passed", "web": "skipped"}
    if WEB_MISSING is None:
        assert "not run in the browser: question_encoder, answer_decoder, answer_decoder_with_past" in \
            manifest["backends"]["web"]["reason"]
    assert (tiny.out / "mobile" / "answer_decoder_with_past.ort").is_file()


# --------------------------------------------------------------------------------------------
# Generate mode: the tokens of transformers' generate
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["tiny", "narrow"])
@pytest.mark.parametrize("beams", [1, 3])
def test_answers_are_the_tokens_of_transformers_generate(request, shape, beams):
    converted = request.getfixturevalue(shape)
    runtime = BlipRuntime(converted.out, threads=1)

    answers = runtime.answer(images(), QUESTIONS, beams=beams)

    expected = converted.generate(images(), QUESTIONS, num_beams=beams)
    assert [a.token_ids for a in answers] == expected
    # What makes the parity meaningful: answers differ, some stop early, questions are padded.
    assert len({tuple(tokens) for tokens in expected}) > 1
    assert any(tokens[-1] == SEP and len(tokens) < 9 for tokens in expected)
    assert len({len(converted.tokenizer(q).input_ids) for q in QUESTIONS}) > 1
    assert [a.text for a in answers] == [converted.tokenizer.decode(t, skip_special_tokens=True) for t in expected]


def test_one_image_answers_several_questions(tiny):
    runtime = BlipRuntime(tiny.out, threads=1)

    answers = runtime.answer([images()[1]], QUESTIONS)

    assert [a.token_ids for a in answers] == tiny.generate([images()[1]] * 4, QUESTIONS, num_beams=3)
    assert [a.question for a in answers] == QUESTIONS


# --------------------------------------------------------------------------------------------
# Rank mode: BLIP's VQA evaluation
# --------------------------------------------------------------------------------------------


def reference_rank(converted: Converted, picture, question: str, k: int, label_smoothing: float,
                   masked: bool = True) -> list[tuple[str, float]]:
    """BLIP_VQA.rank_answer with the transformers model's modules: top-k by first-token probability,
    then minus the decoder's loss over each whole answer. transformers 5 drops the decoder's
    cross-attention mask (BlipTextAttention does not pass it on), so the question's own mask is
    applied by cutting the padded question states off, which is what the mask means."""
    model = converted.model
    ids, mask = converted.question_inputs([question, *QUESTIONS])  # padded as in a batch
    ids, mask = ids[:1], mask[:1]
    pixel_values = converted.processor([picture], return_tensors="pt").pixel_values
    answers = converted.tokenizer(CANDIDATES, padding="longest", return_tensors="pt")
    answer_ids = answers.input_ids.clone()
    answer_ids[:, 0] = converted.tokens["DEC"]
    targets = answer_ids.masked_fill(answer_ids == PAD, -100)
    with torch.no_grad():
        embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state
        states = model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=embeds).last_hidden_state
        if masked:
            states = states[:, : int(mask.sum())]
        first = model.text_decoder(input_ids=answer_ids[:1, :1], encoder_hidden_states=states).logits[:, 0]
        probs = torch.softmax(first, dim=-1)[0, answer_ids[:, 1]]
        top = probs.topk(k).indices
        model.text_decoder.label_smoothing = label_smoothing
        try:
            loss = model.text_decoder(input_ids=answer_ids[top], attention_mask=answers.attention_mask[top],
                                      encoder_hidden_states=states.repeat(k, 1, 1), labels=targets[top],
                                      reduction="none").loss
        finally:
            model.text_decoder.label_smoothing = 0.0
    scored = [(CANDIDATES[i], -float(value)) for i, value in zip(top.tolist(), loss)]
    return sorted(scored, key=lambda item: -item[1])


def test_rank_mode_scores_candidates_as_blips_evaluation(tiny):
    runtime = BlipRuntime(tiny.out, threads=1)
    pictures = images()

    answers = runtime.answer(pictures, QUESTIONS, answers=CANDIDATES, k=5)

    for picture, question, answer in zip(pictures, QUESTIONS, answers):
        blip = reference_rank(tiny, picture, question, k=5, label_smoothing=0.1)
        likelihood = dict(reference_rank(tiny, picture, question, k=5, label_smoothing=0.0))
        assert [r.answer for r in answer.ranked] == [name for name, _ in blip]
        for ranked, (_, score) in zip(answer.ranked, blip):
            assert ranked.score == pytest.approx(score, abs=1e-4)
            assert ranked.log_likelihood == pytest.approx(likelihood[ranked.answer], abs=1e-4)
        assert answer.text == blip[0][0] and answer.token_ids == []
    assert len({a.text for a in answers}) > 1
    # The question's own mask matters in rank mode: without it the padded question scores otherwise.
    short = QUESTIONS.index("what")
    unmasked = reference_rank(tiny, pictures[short], "what", k=5, label_smoothing=0.1, masked=False)
    assert abs(unmasked[0][1] - answers[short].score) > 1e-3


# --------------------------------------------------------------------------------------------
# Loading: the Salesforce layout, strict keys
# --------------------------------------------------------------------------------------------


def salesforce_vqa_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {salesforce_name(key): value.detach().clone() for key, value in model.state_dict().items()}


def graph_outputs(source, seed: int = 0) -> list[torch.Tensor]:
    """The three VQA wrappers on the same inputs: what the exported graphs compute."""
    config = source.vqa.config
    generator = torch.Generator().manual_seed(seed)
    tokens = 1 + (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    embeds = torch.randn(2, tokens, config.vision_config.hidden_size, generator=generator)
    ids = torch.randint(1, 100, (2, 5), generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        states = wrappers.QuestionEncoder(source.vqa, source.tokens["ENC"])(ids, mask, embeds)
        answer = torch.tensor([[source.tokens["DEC"], 5, 7]] * 2)
        first = wrappers.AnswerDecoderFirstStep(source.vqa)(answer, states, mask)
    return [states, *first]


def test_the_salesforce_layout_loads_as_the_hf_directory_of_the_same_weights(tiny, tmp_path):
    state = salesforce_vqa_state(tiny.model)
    assert {key.split(".")[0] for key in state} == {"visual_encoder", "text_encoder", "text_decoder"}
    assert "visual_encoder.blocks.0.attn.qkv.weight" in state
    path = save_pth(state, tmp_path / "model_base_vqa_capfilt_large.pth")

    original, hf = load_blip_source([path]), load_blip_source([tiny.hf_dir])

    assert original.vqa is not None and original.captioning is None and original.retrieval is None
    assert original.files[0].parts == ("vqa",) and original.format == "salesforce-pth"
    for ours, theirs in zip(graph_outputs(original), graph_outputs(hf)):
        assert torch.equal(ours, theirs)


def test_a_vision_tower_wider_than_the_text_keeps_the_answer_decoder_at_the_text_width(tmp_path):
    # BLIP_VQA's decoder reads the question states (text width); transformers' class would build it
    # at the vision width. Built here the original way, then saved in the original layout.
    config = blip_config(192, 1, 128, 2, image=32, patch=16, vocab=128, positions=40)
    torch.manual_seed(0)
    model = BlipForQuestionAnswering(config)
    decoder_config = BlipTextConfig.from_dict({**config.text_config.to_dict(), "encoder_hidden_size": 128})
    model.text_decoder = BlipTextLMHeadModel(decoder_config)
    model.tie_weights()
    noisy(model, seed=3)
    state = salesforce_vqa_state(model)
    assert state["text_decoder.bert.encoder.layer.0.crossattention.self.key.weight"].shape == (128, 128)
    assert state["text_encoder.encoder.layer.0.crossattention.self.key.weight"].shape == (128, 192)

    source = load_blip_source([save_pth(state, tmp_path / "wide_vqa.pth")])

    states, logits, *_ = graph_outputs(source, seed=4)
    generator = torch.Generator().manual_seed(4)
    embeds = torch.randn(2, 5, 192, generator=generator)
    ids = torch.randint(1, 100, (2, 5), generator=generator)
    ids[:, 0] = 127
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        expected_states = model.text_encoder(input_ids=ids, attention_mask=mask,
                                             encoder_hidden_states=embeds).last_hidden_state
        expected_logits = model.text_decoder(input_ids=torch.tensor([[126, 5, 7]]),
                                             encoder_hidden_states=expected_states[:1]).logits
    torch.testing.assert_close(states, expected_states, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[:1], expected_logits, rtol=0, atol=1e-5)


def test_a_vqa_checkpoint_missing_a_decoder_weight_is_refused_by_name(tiny, tmp_path):
    state = salesforce_vqa_state(tiny.model)
    del state["text_decoder.bert.encoder.layer.1.crossattention.self.value.bias"]
    state["text_encoder.encoder.layer.0.extra.weight"] = torch.zeros(2)

    with pytest.raises(CheckpointError, match=r"missing keys text_decoder\.bert\.encoder\.layer\.1\.crossattention"
                                              r"\.self\.value\.bias; unexpected keys text_encoder\.encoder\.layer\.0"
                                              r"\.extra\.weight; is it a complete BLIP vqa checkpoint"):
        load_blip_source([save_pth(state, tmp_path / "broken.pth")])


def test_bad_vqa_input_is_exit_2_with_one_line(tiny, tmp_path, capsys):
    broken = tmp_path / "broken-hf"
    shutil.copytree(tiny.hf_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["BlipForConditionalGeneration"]
    (broken / "config.json").write_text(json.dumps(config))
    picture = tmp_path / "picture.png"
    images()[1].save(picture)
    empty = tmp_path / "answers.txt"
    empty.write_text("\n  \n")

    cases = [
        ["blip", "-c", str(broken), "-o", str(tmp_path / "out")],  # the config says captioning, the weights VQA
        ["ask", str(tiny.out), str(picture)],  # no question
        ["ask", str(tiny.out), str(picture), "   "],
        ["ask", str(tiny.out), str(picture), "what?", "--answers", str(empty)],
        ["ask", str(tiny.out), str(picture), "what?", "--beams", "0"],
        ["ask", str(tiny.out), str(tmp_path / "missing.png"), "what?"],
    ]
    manifest = json.loads((tiny.out / "manifest.json").read_text())
    edited = {"bad-k": lambda m: m["generation"]["vqa"]["rank"].update(k="many"),
              "no-vqa": lambda m: m["modules"].pop("question_encoder")}
    for name, edit in edited.items():
        shutil.copytree(tiny.out, tmp_path / name)
        changed = json.loads(json.dumps(manifest))
        edit(changed)
        (tmp_path / name / "manifest.json").write_text(json.dumps(changed))
        cases.append(["ask", str(tmp_path / name), str(picture), "what?"])
    for argv in cases:
        capsys.readouterr()
        assert run(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err and "Traceback" not in err, argv
        if argv[1].endswith(("bad-k", "no-vqa")):
            assert ("generation.vqa.rank.k must be an integer" in err) or ("has no question_encoder" in err), err
    assert not (tmp_path / "out").exists()


def test_a_vqa_checkpoint_with_a_captioning_one_is_refused(tiny, tmp_path):
    captioning = random_source("tiny", parts=("captioning",)).captioning
    caption_file = save_pth(salesforce_state_dict(captioning)[0], tmp_path / "caption.pth")

    with pytest.raises(InputError, match="is a VQA checkpoint; this version converts it on its own"):
        load_blip_source([tiny.hf_dir, caption_file])


# --------------------------------------------------------------------------------------------
# convert ask
# --------------------------------------------------------------------------------------------


def test_convert_ask_prints_the_answer_as_json(tiny, tmp_path, capsys):
    picture = tmp_path / "picture.png"
    images()[1].save(picture)
    candidates = tmp_path / "answers.txt"
    candidates.write_text("\n".join(CANDIDATES) + "\n")
    runtime = BlipRuntime(tiny.out, threads=1)

    capsys.readouterr()
    assert run(["ask", str(tiny.out), str(picture), QUESTIONS[0], "--json"]) == 0
    generated = json.loads(capsys.readouterr().out)
    assert run(["ask", str(tiny.out), str(picture), QUESTIONS[0], "--answers", str(candidates), "--k", "4",
                "--json"]) == 0
    ranked = json.loads(capsys.readouterr().out)

    expected = tiny.generate([images()[1]], [QUESTIONS[0]], num_beams=3)[0]
    assert generated["token_ids"] == expected and generated["question"] == QUESTIONS[0]
    assert generated["answer"] == tiny.tokenizer.decode(expected, skip_special_tokens=True)
    best = reference_rank(tiny, images()[1], QUESTIONS[0], k=4, label_smoothing=0.1)
    assert [row["answer"] for row in ranked["ranked"]] == [name for name, _ in best]
    assert ranked["answer"] == best[0][0] == runtime.answer([picture], [QUESTIONS[0]], answers=CANDIDATES, k=4)[0].text
