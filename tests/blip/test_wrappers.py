"""The export wrappers compute what transformers' BLIP computes, and survive ONNX export.

Every expected value comes from transformers' own forward passes (or its `generate`), never from
the wrappers. The ONNX tests then check that each exported graph answers like its torch wrapper at
shapes the export did not see.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch.export import Dim
from torch.nn.functional import normalize
from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval

from plugins.blip import graphs, recipes, wrappers

# Sharing one Dim per axis name still makes the exporter say each shared name "will not be used".
# The treespec FutureWarning comes from torch.export's own internals.
pytestmark = [
    pytest.mark.filterwarnings("ignore:# The axis name:UserWarning"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning"),
]

# Token ids of the tiny vocabulary, where bert-base would have [PAD] 0, [CLS] 101, [SEP] 102,
# [DEC] 30522 and [ENC] 30523.
PAD, CLS, SEP, DEC, ENC = 0, 101, 102, 110, 111


def tiny_config() -> BlipConfig:
    return BlipConfig(
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=64,
            patch_size=16,
            layer_norm_eps=1e-6,
            initializer_range=0.02,  # transformers' default of 1e-10 makes the vision tower a constant
        ),
        text_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=120,
            max_position_embeddings=64,
            bos_token_id=DEC,
            sep_token_id=SEP,
            pad_token_id=PAD,
            encoder_hidden_size=32,
        ),
    )


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Noise on every parameter so that parity tests can fail.

    Freshly built models have zero biases, unit LayerNorms and 0.02-std matrices, under which the
    tiny attention is nearly uniform and the decoder nearly ignores the image: a wrong scale,
    mask or cache position would go unnoticed.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def config() -> BlipConfig:
    return tiny_config()


@pytest.fixture(scope="module")
def captioning(config) -> BlipForConditionalGeneration:
    torch.manual_seed(3)
    return randomise(BlipForConditionalGeneration(config), seed=3)


@pytest.fixture(scope="module")
def retrieval(config) -> BlipForImageTextRetrieval:
    torch.manual_seed(4)
    return randomise(BlipForImageTextRetrieval(config), seed=4)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5) -> None:
    assert actual.shape == expected.shape
    diff = (actual - expected).abs().max().item()
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol}"


# --------------------------------------------------------------------------------------------
# Wrappers against transformers
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def test_vision_encoder_gives_the_last_hidden_state(config, captioning):
    pixel_values = recipes.vision_inputs(config, batch=2)["pixel_values"]

    image_embeds = wrappers.VisionEncoder(captioning.vision_model).eval()(pixel_values)

    expected = captioning.vision_model(pixel_values=pixel_values).last_hidden_state
    assert image_embeds.shape == (2, 1 + (64 // 16) ** 2, 32)
    assert_close(image_embeds, expected, atol=0)


@torch.no_grad()
def test_text_encoder_matches_the_retrieval_model(config, retrieval):
    inputs = recipes.text_encoder_inputs(config, batch=3, text=7)
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    input_ids[:, 0] = CLS  # as a tokenizer gives it
    assert attention_mask[-1].sum() < 7, "one row must be padded"
    pixel_values = recipes.vision_inputs(config, batch=3, seed=1)["pixel_values"]
    image_embeds = retrieval.vision_model(pixel_values=pixel_values).last_hidden_state

    encoder = wrappers.TextEncoder(retrieval, enc_token_id=ENC, cls_token_id=CLS).eval()
    itm_probability, text_features, image_features = encoder(input_ids.clone(), attention_mask, image_embeds)

    itm_ids = input_ids.clone()
    itm_ids[:, 0] = ENC
    itm = retrieval(input_ids=itm_ids, pixel_values=pixel_values, attention_mask=attention_mask, use_itm_head=True)
    assert_close(itm_probability, torch.softmax(itm.itm_score, dim=-1)[:, 1])

    itc = retrieval(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, use_itm_head=False)
    assert_close(text_features, normalize(retrieval.text_proj(itc.question_embeds[:, 0]), dim=-1))
    assert_close(image_features, normalize(retrieval.vision_proj(itc.last_hidden_state[:, 0]), dim=-1))
    assert_close(image_features @ text_features.T, itc.itm_score)
    # The probabilities must depend on the inputs, or the comparison above proves little.
    assert itm_probability.max() - itm_probability.min() > 1e-3


@torch.no_grad()
def test_decoder_first_step_matches_the_text_decoder_and_its_cache(config, captioning):
    inputs = recipes.decoder_first_inputs(config, batch=2, text=5)
    layers = config.text_config.num_hidden_layers

    outputs = dict(zip(graphs.decoder_first_outputs(layers), wrappers.DecoderFirstStep(captioning)(**inputs)))

    expected = captioning.text_decoder(
        input_ids=inputs["input_ids"], encoder_hidden_states=inputs["image_embeds"], use_cache=True
    )
    assert_close(outputs["logits"], expected.logits)
    for i in range(layers):
        self_cache = expected.cache.self_attention_cache.layers[i]
        cross_cache = expected.cache.cross_attention_cache.layers[i]
        assert_close(outputs[f"present.{i}.self_key"], self_cache.keys)
        assert_close(outputs[f"present.{i}.self_value"], self_cache.values)
        assert_close(outputs[f"cross.{i}.key"], cross_cache.keys)
        assert_close(outputs[f"cross.{i}.value"], cross_cache.values)


@pytest.mark.parametrize("prefix", [1, 3, 5])
@pytest.mark.parametrize("new", [1, 2])
@torch.no_grad()
def test_decoder_with_past_continues_the_full_forward(config, captioning, prefix, new):
    inputs = recipes.decoder_first_inputs(config, batch=2, text=prefix + new, seed=prefix)
    input_ids, image_embeds = inputs["input_ids"], inputs["image_embeds"]
    layers = config.text_config.num_hidden_layers
    full = captioning.text_decoder(input_ids=input_ids, encoder_hidden_states=image_embeds, use_cache=True)

    first = wrappers.DecoderFirstStep(captioning)(input_ids[:, :prefix], image_embeds)
    past, cross = first[1 : 1 + 2 * layers], first[1 + 2 * layers :]
    logits, *present = wrappers.DecoderWithPast(captioning)(input_ids[:, prefix:], *past, *cross)

    assert_close(logits, full.logits[:, prefix:])
    for i in range(layers):
        assert_close(present[2 * i], full.cache.self_attention_cache.layers[i].keys)
        assert_close(present[2 * i + 1], full.cache.self_attention_cache.layers[i].values)


def greedy_caption(first_step, with_past, image_embeds, prompt, max_new_tokens, layers):
    """Greedy decoding as a runtime would do it: one first step, then one token at a time."""
    batch = image_embeds.shape[0]
    outputs = first_step(prompt.repeat(batch, 1), image_embeds)
    logits, present, cross = outputs[0], outputs[1 : 1 + 2 * layers], outputs[1 + 2 * layers :]
    tokens = prompt.repeat(batch, 1)
    done = torch.zeros(batch, dtype=torch.bool)
    for _ in range(max_new_tokens):
        next_token = torch.where(done, PAD, torch.as_tensor(logits[:, -1]).argmax(-1))
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        done |= next_token == SEP
        if done.all():
            break
        logits, *present = with_past(next_token[:, None], *present, *cross)
    return tokens


@torch.no_grad()
def test_cached_greedy_decoding_gives_the_tokens_of_generate(config, captioning):
    pixel_values = recipes.vision_inputs(config, batch=2)["pixel_values"]
    image_embeds = wrappers.VisionEncoder(captioning.vision_model)(pixel_values)
    # generate() takes tokenizer output: it puts [DEC] over [CLS] and drops the trailing [SEP].
    tokenized = torch.tensor([[CLS, 5, 6, 7, SEP]]).repeat(2, 1)
    expected = captioning.generate(
        pixel_values, input_ids=tokenized, max_new_tokens=10, num_beams=1, do_sample=False, min_length=0
    )

    tokens = greedy_caption(
        wrappers.DecoderFirstStep(captioning),
        wrappers.DecoderWithPast(captioning),
        image_embeds,
        torch.tensor([[DEC, 5, 6, 7]]),
        max_new_tokens=10,
        layers=config.text_config.num_hidden_layers,
    )

    assert tokens.tolist() == expected.tolist()
    # With this seed the two images get different captions and one ends early, so the image
    # cross-attention and the stop handling are both exercised.
    assert tokens[0].tolist() != tokens[1].tolist()
    assert (tokens == SEP).any()


def test_io_names_follow_the_layer_count():
    assert graphs.decoder_first_outputs(2) == [
        "logits",
        "present.0.self_key",
        "present.0.self_value",
        "present.1.self_key",
        "present.1.self_value",
        "cross.0.key",
        "cross.0.value",
        "cross.1.key",
        "cross.1.value",
    ]
    assert graphs.decoder_past_inputs(1) == [
        "input_ids",
        "past.0.self_key",
        "past.0.self_value",
        "cross.0.key",
        "cross.0.value",
    ]
    assert graphs.decoder_past_outputs(1) == ["logits", "present.0.self_key", "present.0.self_value"]


# --------------------------------------------------------------------------------------------
# ONNX export and onnxruntime parity
# --------------------------------------------------------------------------------------------


def io_names(wrapper: torch.nn.Module) -> tuple[list[str], list[str], dict[str, dict[int, str]]]:
    """The graph's input and output names and named axes (plugins.blip.graphs), for this wrapper."""
    if isinstance(wrapper, wrappers.VisionEncoder):
        return list(graphs.VISION_INPUTS), list(graphs.VISION_OUTPUTS), graphs.vision_axes()
    if isinstance(wrapper, wrappers.TextEncoder):
        return list(graphs.TEXT_ENCODER_INPUTS), list(graphs.TEXT_ENCODER_OUTPUTS), graphs.text_encoder_axes()
    layers = wrapper.num_layers
    if isinstance(wrapper, wrappers.DecoderFirstStep):
        return list(graphs.DECODER_FIRST_INPUTS), graphs.decoder_first_outputs(layers), graphs.decoder_first_axes(layers)
    return graphs.decoder_past_inputs(layers), graphs.decoder_past_outputs(layers), graphs.decoder_past_axes(layers)


def export(wrapper: torch.nn.Module, example: dict[str, torch.Tensor], path) -> ort.InferenceSession:
    """torch.onnx.export through torch.export with one shared Dim per named axis."""
    input_names, output_names, named_axes = io_names(wrapper)
    dims: dict[str, Dim] = {}
    dynamic_shapes = tuple(
        {axis: dims.setdefault(name, Dim(name)) for axis, name in named_axes.get(input_name, {}).items()}
        for input_name in input_names
    )
    assert list(example) == input_names
    for input_name, axes in zip(input_names, dynamic_shapes):
        assert all(example[input_name].shape[axis] >= 2 for axis in axes), "torch.export specialises sizes 0 and 1"
    with torch.no_grad():
        torch.onnx.export(
            wrapper.eval(),
            tuple(example.values()),
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=18,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def assert_onnx_matches_torch(session: ort.InferenceSession, wrapper: torch.nn.Module, inputs) -> float:
    input_names, output_names, _ = io_names(wrapper)
    assert [i.name for i in session.get_inputs()] == input_names
    assert [o.name for o in session.get_outputs()] == output_names
    actual = session.run(None, {name: tensor.numpy() for name, tensor in inputs.items()})
    with torch.no_grad():
        expected = wrapper(*inputs.values())
    expected = expected if isinstance(expected, tuple) else (expected,)
    worst = 0.0
    for name, got, want in zip(output_names, actual, expected):
        assert got.shape == tuple(want.shape), name
        diff = float(np.abs(got - want.numpy()).max())
        assert diff <= 1e-4, f"{name}: max abs diff {diff:.3g}"
        worst = max(worst, diff)
    return worst


def with_image_tokens(inputs: dict[str, torch.Tensor], tokens: int) -> dict[str, torch.Tensor]:
    """The same inputs with every image-token axis cut to `tokens` (a graph must not assume 17)."""
    cut = {}
    for name, tensor in inputs.items():
        if name == "image_embeds":
            cut[name] = tensor[:, :tokens].contiguous()
        elif name.startswith("cross."):
            cut[name] = tensor[:, :, :tokens].contiguous()
        else:
            cut[name] = tensor
    return cut


def test_vision_encoder_exports_with_dynamic_batch(config, captioning, tmp_path):
    wrapper = wrappers.VisionEncoder(captioning.vision_model)
    session = export(wrapper, recipes.vision_inputs(config, batch=2), tmp_path / "vision.onnx")

    assert session.get_inputs()[0].shape == ["batch", 3, 64, 64]
    for batch in (1, 2, 3):
        assert_onnx_matches_torch(session, wrapper, recipes.vision_inputs(config, batch=batch, seed=batch))


def test_text_encoder_exports_with_dynamic_batch_text_and_image_tokens(config, retrieval, tmp_path):
    wrapper = wrappers.TextEncoder(retrieval, enc_token_id=ENC, cls_token_id=CLS)
    session = export(wrapper, recipes.text_encoder_inputs(config, batch=2, text=5), tmp_path / "text.onnx")

    for batch, text in ((1, 1), (1, 4), (3, 7)):
        assert_onnx_matches_torch(session, wrapper, recipes.text_encoder_inputs(config, batch, text, seed=text))
    assert_onnx_matches_torch(session, wrapper, with_image_tokens(recipes.text_encoder_inputs(config, 2, 3), 5))


@pytest.fixture(scope="module")
def decoder_sessions(config, captioning, tmp_path_factory):
    folder = tmp_path_factory.mktemp("decoder")
    first, with_past = wrappers.DecoderFirstStep(captioning), wrappers.DecoderWithPast(captioning)
    return {
        "first": (first, export(first, recipes.decoder_first_inputs(config, 2, 3), folder / "first.onnx")),
        "past": (with_past, export(with_past, recipes.decoder_past_inputs(config, 2, 2, 3), folder / "past.onnx")),
    }


def test_decoder_first_step_exports_with_dynamic_batch_text_and_image_tokens(config, decoder_sessions):
    wrapper, session = decoder_sessions["first"]

    for batch, text in ((1, 1), (1, 4), (3, 7)):
        assert_onnx_matches_torch(session, wrapper, recipes.decoder_first_inputs(config, batch, text, seed=text))
    assert_onnx_matches_torch(session, wrapper, with_image_tokens(recipes.decoder_first_inputs(config, 2, 2), 5))


def test_decoder_with_past_exports_with_dynamic_batch_new_past_and_image_tokens(config, decoder_sessions):
    wrapper, session = decoder_sessions["past"]

    present = session.get_outputs()[1]
    assert present.name == "present.0.self_key" and present.shape[2] == "past + new"
    for batch, new, past in ((1, 1, 1), (2, 1, 5), (3, 3, 1), (1, 2, 9)):
        assert_onnx_matches_torch(session, wrapper, recipes.decoder_past_inputs(config, batch, new, past, seed=past))
    assert_onnx_matches_torch(session, wrapper, with_image_tokens(recipes.decoder_past_inputs(config, 2, 1, 4), 5))


def test_onnx_decoder_graphs_caption_like_generate(config, captioning, decoder_sessions):
    def run(session):
        def call(*tensors):
            feeds = {i.name: np.asarray(t) for i, t in zip(session.get_inputs(), tensors)}
            return session.run(None, feeds)

        return call

    pixel_values = recipes.vision_inputs(config, batch=2)["pixel_values"]
    with torch.no_grad():
        image_embeds = captioning.vision_model(pixel_values=pixel_values).last_hidden_state
        expected = captioning.generate(
            pixel_values,
            input_ids=torch.tensor([[CLS, 5, 6, 7, SEP]]).repeat(2, 1),
            max_new_tokens=10,
            num_beams=1,
            do_sample=False,
            min_length=0,
        )

    tokens = greedy_caption(
        run(decoder_sessions["first"][1]),
        run(decoder_sessions["past"][1]),
        image_embeds.numpy(),
        torch.tensor([[DEC, 5, 6, 7]]),
        max_new_tokens=10,
        layers=config.text_config.num_hidden_layers,
    )

    assert tokens.tolist() == expected.tolist()
