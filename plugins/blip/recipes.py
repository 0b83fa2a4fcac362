"""One recipe per BLIP graph: everything the split, the wrap hook, calibration and the benchmarks need.

A recipe says which part of the checkpoint the graph needs, how to build its wrapper (built once,
by the wrap hook), its inputs and outputs with their named axes and dtypes, the shape cases
validation tries, the gates a rewritten graph must keep, its tolerance and opset. Names come from
`plugins.blip.graphs`, which the torch-free runtime reads too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from converter_core.specs import Gate, ModuleSpec, ShapeCase, TensorSpec
from plugins.blip import graphs, wrappers
from plugins.blip.source import BlipSource

Sizes = dict[str, int]
Inputs = dict[str, torch.Tensor]


@dataclass
class BlipConversion:
    """What `convert blip` hands the pipeline: the loaded source and the sizes it must serve."""

    source: BlipSource
    max_batch: int = 8
    max_text_len: int = 40
    # Images for static-quantisation calibration (None: the bundled fixture's drawn scenes).
    calibration_images: Path | None = None


@dataclass(frozen=True)
class GraphRecipe:
    name: str
    description: str
    part: Literal["vision", "retrieval_vision", "retrieval", "captioning", "vqa"]
    build: Callable[[BlipSource], nn.Module]
    make_inputs: Callable[..., Inputs]  # (config, image_size, seed, **sizes) -> inputs in argument order
    axes: Callable[[int], dict[str, dict[int, str]]]  # text layer count -> {tensor: {index: axis}}
    outputs: Callable[[object, int], dict[str, tuple[int | str, ...]]]  # (config, image size) -> name: shape
    example: Sizes  # the sizes the exporter traces with: every dynamic axis >= 2 (torch.export specialises 0 and 1)
    cases: tuple[Sizes, ...]  # sizes validation tries: 1 on every axis, sizes the trace never saw
    longest: Callable[[int], Sizes] | None  # the case at the longest text the graph serves (max_text_len)
    gates: tuple[Gate, ...]
    atol: float = 1e-4
    opset: int = 18
    output_dtypes: dict[str, str] = field(default_factory=dict)  # float32 unless named here

    def present(self, source: BlipSource) -> bool:
        return {
            "vision": True,
            "retrieval_vision": source.retrieval is not None and not source.shared_vision,
            "retrieval": source.retrieval is not None,
            "captioning": source.captioning is not None,
            "vqa": source.vqa is not None,
        }[self.part]


def _config(source: BlipSource):
    return source.model.config


def _head_dim(text_config) -> int:
    return text_config.hidden_size // text_config.num_attention_heads


# --------------------------------------------------------------------------------------------
# Example inputs (fixed seed), in each wrapper's argument order
# --------------------------------------------------------------------------------------------


def vision_inputs(config, batch: int = 2, image_size: int | None = None, seed: int = 0) -> Inputs:
    """`config` is a BlipConfig. The image size defaults to the model's own (the only valid one)."""
    size = image_size or config.vision_config.image_size
    generator = torch.Generator().manual_seed(seed)
    return {graphs.PIXEL_VALUES: torch.randn(batch, 3, size, size, generator=generator)}


def _image_embeds(config, batch: int, image_size: int | None, generator: torch.Generator) -> torch.Tensor:
    vision = config.vision_config
    tokens = graphs.image_token_count(image_size or vision.image_size, vision.patch_size)
    return torch.randn(batch, tokens, vision.hidden_size, generator=generator)


def text_encoder_inputs(config, batch: int = 2, text: int = 6, image_size: int | None = None, seed: int = 0) -> Inputs:
    """Random token ids (the wrapper replaces the first one anyway), a mask whose last row is padded
    after half its length when batch and text allow, random image embeddings."""
    text_config = config.text_config
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, text_config.vocab_size, (batch, text), generator=generator)
    attention_mask = torch.ones(batch, text, dtype=torch.int64)
    if batch > 1 and text > 1:
        keep = max(1, text // 2)
        attention_mask[-1, keep:] = 0
        input_ids[-1, keep:] = text_config.pad_token_id
    image_embeds = _image_embeds(config, batch, image_size, generator)
    return {graphs.INPUT_IDS: input_ids, graphs.ATTENTION_MASK: attention_mask, graphs.IMAGE_EMBEDS: image_embeds}


def decoder_first_inputs(config, batch: int = 2, text: int = 4, image_size: int | None = None, seed: int = 0) -> Inputs:
    """A shared prompt starting with the decoder BOS, random image embeddings."""
    text_config = config.text_config
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, text_config.vocab_size, (1, text), generator=generator)
    prompt[0, 0] = text_config.bos_token_id
    image_embeds = _image_embeds(config, batch, image_size, generator)
    return {graphs.INPUT_IDS: prompt.repeat(batch, 1), graphs.IMAGE_EMBEDS: image_embeds}


def decoder_past_inputs(config, batch: int = 2, new: int = 1, past: int = 4, image_size: int | None = None,
                        seed: int = 0) -> Inputs:
    """New token ids plus random self-attention caches of length `past` and cross keys/values."""
    text_config, vision = config.text_config, config.vision_config
    layers, heads = text_config.num_hidden_layers, text_config.num_attention_heads
    tokens = graphs.image_token_count(image_size or vision.image_size, vision.patch_size)
    generator = torch.Generator().manual_seed(seed)
    inputs = {graphs.INPUT_IDS: torch.randint(1, text_config.vocab_size, (batch, new), generator=generator)}
    for name in graphs.past_names(layers):
        inputs[name] = torch.randn(batch, heads, past, _head_dim(text_config), generator=generator)
    for name in graphs.cross_names(layers):
        inputs[name] = torch.randn(batch, heads, tokens, _head_dim(text_config), generator=generator)
    return inputs


def question_encoder_inputs(config, batch: int = 2, question: int = 6, image_size: int | None = None,
                            seed: int = 0) -> Inputs:
    """As the text encoder's: random ids, the last row padded after half its length, random image embeddings."""
    return text_encoder_inputs(config, batch=batch, text=question, image_size=image_size, seed=seed)


def _question(config, batch: int, question: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random question states and a question mask whose last row is padded after half its length."""
    states = torch.randn(batch, question, config.text_config.hidden_size, generator=generator)
    mask = torch.ones(batch, question, dtype=torch.int64)
    if batch > 1 and question > 1:
        mask[-1, max(1, question // 2):] = 0
    return states, mask


def answer_first_inputs(config, batch: int = 2, text: int = 3, question: int = 5, image_size: int | None = None,
                        seed: int = 0) -> Inputs:
    """[DEC] then random answer tokens, random question states under a partly padded mask."""
    text_config = config.text_config
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, text_config.vocab_size, (batch, text), generator=generator)
    input_ids[:, 0] = text_config.bos_token_id
    states, mask = _question(config, batch, question, generator)
    return {graphs.INPUT_IDS: input_ids, graphs.QUESTION_STATES: states, graphs.QUESTION_MASK: mask}


def answer_past_inputs(config, batch: int = 2, new: int = 1, past: int = 3, question: int = 5,
                       image_size: int | None = None, seed: int = 0) -> Inputs:
    """New token ids, random caches of length `past`, cross keys/values over `question` tokens, its mask."""
    text_config = config.text_config
    layers, heads, head_dim = text_config.num_hidden_layers, text_config.num_attention_heads, _head_dim(text_config)
    generator = torch.Generator().manual_seed(seed)
    inputs = {graphs.INPUT_IDS: torch.randint(1, text_config.vocab_size, (batch, new), generator=generator)}
    for name in graphs.past_names(layers):
        inputs[name] = torch.randn(batch, heads, past, head_dim, generator=generator)
    for name in graphs.cross_names(layers):
        inputs[name] = torch.randn(batch, heads, question, head_dim, generator=generator)
    inputs[graphs.QUESTION_MASK] = _question(config, batch, question, generator)[1]
    return inputs


# --------------------------------------------------------------------------------------------
# Output shapes, by axis name where dynamic
# --------------------------------------------------------------------------------------------


def _vision_outputs(config, image_size: int) -> dict[str, tuple[int | str, ...]]:
    vision = config.vision_config
    return {graphs.IMAGE_EMBEDS: ("batch", graphs.image_token_count(image_size, vision.patch_size), vision.hidden_size)}


def _text_encoder_outputs(config, image_size: int) -> dict[str, tuple[int | str, ...]]:
    projection = config.image_text_hidden_size
    return {graphs.ITM_PROBABILITY: ("batch",), graphs.TEXT_FEATURES: ("batch", projection),
            graphs.IMAGE_FEATURES: ("batch", projection)}


def _decoder_first_outputs(config, image_size: int) -> dict[str, tuple[int | str, ...]]:
    text = config.text_config
    layers, heads, head_dim = text.num_hidden_layers, text.num_attention_heads, _head_dim(text)
    return {graphs.LOGITS: ("batch", "text", text.vocab_size),
            **{name: ("batch", heads, "text", head_dim) for name in graphs.present_names(layers)},
            **{name: ("batch", heads, "image_tokens", head_dim) for name in graphs.cross_names(layers)}}


def _decoder_past_outputs(config, image_size: int) -> dict[str, tuple[int | str, ...]]:
    text = config.text_config
    layers, heads, head_dim = text.num_hidden_layers, text.num_attention_heads, _head_dim(text)
    return {graphs.LOGITS: ("batch", "new", text.vocab_size),
            **{name: ("batch", heads, "past + new", head_dim) for name in graphs.present_names(layers)}}


def _question_encoder_outputs(config, image_size: int) -> dict[str, tuple[int | str, ...]]:
    return {graphs.QUESTION_STATES: ("batch", "question", config.text_config.hidden_size)}


def _answer_first_outputs(config, image_size: int) -> dict[str, tuple[int | str, ...]]:
    text = config.text_config
    layers, heads, head_dim = text.num_hidden_layers, text.num_attention_heads, _head_dim(text)
    return {graphs.LOGITS: ("batch", "text", text.vocab_size),
            **{name: ("batch", heads, "text", head_dim) for name in graphs.present_names(layers)},
            **{name: ("batch", heads, "question", head_dim) for name in graphs.cross_names(layers)}}


# What a rewritten (quantised, fp16) graph must keep. The bar for the vision encoder is an
# image-embedding cosine of 0.999; ITM is a probability, so an absolute bound.
VISION_GATES = (Gate(graphs.IMAGE_EMBEDS, "cosine", 0.999),)
DECODER_GATES = (Gate(graphs.LOGITS, "cosine", 0.99), Gate(graphs.LOGITS, "argmax_agreement", 0.9))
VISION_CASES = ({"batch": 1}, {"batch": 3}, {"batch": 2})
VISION_DESCRIPTION = "pixel_values [batch, 3, S, S] -> image_embeds (ViT last hidden state)"

RECIPES = (
    GraphRecipe(
        graphs.VISION_ENCODER, VISION_DESCRIPTION, "vision",
        build=lambda source: wrappers.VisionEncoder(_config_model(source).vision_model),
        make_inputs=vision_inputs, axes=lambda layers: graphs.vision_axes(), outputs=_vision_outputs,
        example={"batch": 2}, cases=VISION_CASES, longest=None, gates=VISION_GATES,
    ),
    GraphRecipe(
        graphs.RETRIEVAL_VISION_ENCODER,
        VISION_DESCRIPTION + " of the retrieval checkpoint, whose vision weights differ from the captioning one's",
        "retrieval_vision",
        build=lambda source: wrappers.VisionEncoder(source.retrieval.vision_model),
        make_inputs=vision_inputs, axes=lambda layers: graphs.vision_axes(), outputs=_vision_outputs,
        example={"batch": 2}, cases=VISION_CASES, longest=None, gates=VISION_GATES,
    ),
    GraphRecipe(
        graphs.TEXT_ENCODER,
        "ITM probability ([ENC] first, cross-attending to the image) and normalised ITC features", "retrieval",
        build=lambda source: wrappers.TextEncoder(source.retrieval, source.tokens["ENC"], source.tokens["CLS"]),
        make_inputs=text_encoder_inputs, axes=lambda layers: graphs.text_encoder_axes(),
        outputs=_text_encoder_outputs, example={"batch": 2, "text": 6},
        cases=({"batch": 1, "text": 1}, {"batch": 3, "text": 9}, {"batch": 2, "text": 16}),
        longest=lambda longest: {"batch": 2, "text": longest},
        gates=(Gate(graphs.ITM_PROBABILITY, "max_abs", 0.01), Gate(graphs.TEXT_FEATURES, "cosine", 0.99),
               Gate(graphs.IMAGE_FEATURES, "cosine", 0.99)),
    ),
    GraphRecipe(
        graphs.TEXT_DECODER,
        "captioning decoder, first step: logits, self-attention cache, cross-attention keys/values", "captioning",
        build=lambda source: wrappers.DecoderFirstStep(source.captioning),
        make_inputs=decoder_first_inputs, axes=graphs.decoder_first_axes, outputs=_decoder_first_outputs,
        example={"batch": 2, "text": 4},
        cases=({"batch": 1, "text": 1}, {"batch": 3, "text": 5}, {"batch": 2, "text": 9}),
        longest=lambda longest: {"batch": 1, "text": longest}, gates=DECODER_GATES,
    ),
    GraphRecipe(
        graphs.TEXT_DECODER_WITH_PAST,
        "captioning decoder, later steps: new tokens after a cached prefix", "captioning",
        build=lambda source: wrappers.DecoderWithPast(source.captioning),
        make_inputs=decoder_past_inputs, axes=graphs.decoder_past_axes, outputs=_decoder_past_outputs,
        example={"batch": 2, "new": 2, "past": 4},
        cases=({"batch": 1, "new": 1, "past": 1}, {"batch": 3, "new": 1, "past": 7}, {"batch": 2, "new": 3, "past": 2}),
        longest=lambda longest: {"batch": 1, "new": 1, "past": longest - 1}, gates=DECODER_GATES,
    ),
    GraphRecipe(
        graphs.QUESTION_ENCODER,
        "VQA question encoder ([ENC] first, cross-attending to the image) -> question states", "vqa",
        build=lambda source: wrappers.QuestionEncoder(source.vqa, source.tokens["ENC"]),
        make_inputs=question_encoder_inputs, axes=lambda layers: graphs.question_encoder_axes(),
        outputs=_question_encoder_outputs, example={"batch": 2, "question": 6},
        cases=({"batch": 1, "question": 1}, {"batch": 3, "question": 9}, {"batch": 2, "question": 16}),
        longest=lambda longest: {"batch": 2, "question": _question_limit(longest)},
        gates=(Gate(graphs.QUESTION_STATES, "cosine", 0.99),),
    ),
    GraphRecipe(
        graphs.ANSWER_DECODER,
        "VQA answer decoder, first step (or whole answers to rank), cross-attending to the question states "
        "under a given mask", "vqa",
        build=lambda source: wrappers.AnswerDecoderFirstStep(source.vqa),
        make_inputs=answer_first_inputs, axes=graphs.answer_first_axes, outputs=_answer_first_outputs,
        example={"batch": 2, "text": 3, "question": 5},
        cases=({"batch": 1, "text": 1, "question": 1}, {"batch": 3, "text": 4, "question": 7},
               {"batch": 2, "text": 1, "question": 12}),
        longest=lambda longest: {"batch": 1, "text": longest, "question": _question_limit(longest)},
        gates=DECODER_GATES,
    ),
    GraphRecipe(
        graphs.ANSWER_DECODER_WITH_PAST,
        "VQA answer decoder, later steps: new tokens after a cached prefix", "vqa",
        build=lambda source: wrappers.AnswerDecoderWithPast(source.vqa),
        make_inputs=answer_past_inputs, axes=graphs.answer_past_axes, outputs=_decoder_past_outputs,
        example={"batch": 2, "new": 2, "past": 3, "question": 5},
        cases=({"batch": 1, "new": 1, "past": 1, "question": 1}, {"batch": 3, "new": 1, "past": 6, "question": 7},
               {"batch": 2, "new": 3, "past": 2, "question": 12}),
        longest=lambda longest: {"batch": 1, "new": 1, "past": longest - 1, "question": _question_limit(longest)},
        gates=DECODER_GATES,
    ),
)
RECIPE = {recipe.name: recipe for recipe in RECIPES}


def _question_limit(max_text_len: int) -> int:
    """The longest question served: BLIP_VQA's 35 tokens, or fewer when the texts served are shorter
    (the runtime's tokenizer cuts at both)."""
    return min(graphs.QUESTION_MAX_TOKENS, max_text_len)


def _config_model(source: BlipSource):
    return source.model


def _numpy(tensors: Inputs) -> dict[str, np.ndarray]:
    return {name: tensor.numpy() for name, tensor in tensors.items()}


def _case(sizes: Sizes, tensors: Inputs) -> ShapeCase:
    return ShapeCase(" ".join(f"{axis}={size}" for axis, size in sizes.items()), _numpy(tensors))


def axis_ranges(conversion: BlipConversion) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every axis the graphs have: the sizes the output is meant to serve."""
    source = conversion.source
    vision = _config(source).vision_config
    tokens = graphs.image_token_count(source.image_size, vision.patch_size)
    return {
        "batch": (1, 1, conversion.max_batch),
        "text": (1, 8, conversion.max_text_len),
        "new": (1, 1, conversion.max_text_len),
        "past": (1, conversion.max_text_len // 2, conversion.max_text_len),
        # Fixed by the image size; the graphs keep the axis symbolic, so a profile still needs it.
        "image_tokens": (tokens, tokens, tokens),
        "question": (1, min(16, _question_limit(conversion.max_text_len)), _question_limit(conversion.max_text_len)),
    }


def module_spec(recipe: GraphRecipe, conversion: BlipConversion) -> ModuleSpec:
    """The recipe as the core reads it, for this source and these served sizes; no wrapper is built."""
    source = conversion.source
    config, size = _config(source), source.image_size
    axes = recipe.axes(config.text_config.num_hidden_layers)
    example = _numpy(recipe.make_inputs(config, **recipe.example, image_size=size, seed=0))
    sizes = [*recipe.cases, *([recipe.longest(conversion.max_text_len)] if recipe.longest else [])]
    cases = [_case(case, recipe.make_inputs(config, **case, image_size=size, seed=seed))
             for seed, case in enumerate(sizes, start=1)]
    inputs = tuple(TensorSpec(name, str(array.dtype), tuple(axes.get(name, {}).get(i, n)
                                                           for i, n in enumerate(array.shape)))
                   for name, array in example.items())
    outputs = tuple(TensorSpec(name, recipe.output_dtypes.get(name, "float32"), shape)
                    for name, shape in recipe.outputs(config, size).items())
    named = {axis for tensor in (*inputs, *outputs) for axis in tensor.shape if isinstance(axis, str)}
    return ModuleSpec(
        name=recipe.name, inputs=inputs, outputs=outputs,
        example=ShapeCase("example", example), cases=cases, atol=recipe.atol, opset=recipe.opset,
        description=recipe.description,
        axis_ranges={axis: limits for axis, limits in axis_ranges(conversion).items() if axis in named},
        gates=recipe.gates,
    )


def module_specs(conversion: BlipConversion) -> list[ModuleSpec]:
    """The graphs the source yields, in export order."""
    return [module_spec(recipe, conversion) for recipe in RECIPES if recipe.present(conversion.source)]
