"""BLIP's export recipe: which graphs a source yields, their inputs, outputs, axes and shape cases."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import BlipConfig

from converter_core.specs import Gate, ModuleSpec, ShapeCase, TensorSpec
from plugins.blip import wrappers
from plugins.blip.source import BlipSource

VISION_ENCODER = "vision_encoder"
TEXT_ENCODER = "text_encoder"
TEXT_DECODER = "text_decoder"
TEXT_DECODER_WITH_PAST = "text_decoder_with_past"
RETRIEVAL_VISION_ENCODER = "retrieval_vision_encoder"

# Example sizes for tracing are all >= 2 (torch.export specialises 0 and 1); the validation cases
# include 1 on every axis and sizes the trace never saw.
VISION_CASES = ({"batch": 1}, {"batch": 3}, {"batch": 2})
TEXT_ENCODER_CASES = ({"batch": 1, "text": 1}, {"batch": 3, "text": 9}, {"batch": 2, "text": 16})
DECODER_FIRST_CASES = ({"batch": 1, "text": 1}, {"batch": 3, "text": 5}, {"batch": 2, "text": 9})
DECODER_PAST_CASES = (
    {"batch": 1, "new": 1, "past": 1},
    {"batch": 3, "new": 1, "past": 7},
    {"batch": 2, "new": 3, "past": 2},
)


# What a rewritten (quantised, fp16) graph must keep, per module. The bar for the vision
# encoder is an image-embedding cosine of 0.999; ITM is a probability, so an absolute bound.
GATES = {
    VISION_ENCODER: (Gate("image_embeds", "cosine", 0.999),),
    RETRIEVAL_VISION_ENCODER: (Gate("image_embeds", "cosine", 0.999),),
    TEXT_ENCODER: (
        Gate("itm_probability", "max_abs", 0.01),
        Gate("text_features", "cosine", 0.99),
        Gate("image_features", "cosine", 0.99),
    ),
    TEXT_DECODER: (Gate("logits", "cosine", 0.99), Gate("logits", "argmax_agreement", 0.9)),
    TEXT_DECODER_WITH_PAST: (Gate("logits", "cosine", 0.99), Gate("logits", "argmax_agreement", 0.9)),
}


@dataclass
class BlipConversion:
    """What `convert blip` hands the pipeline: the loaded source and the sizes it must serve."""

    source: BlipSource
    max_batch: int = 8
    max_text_len: int = 40
    # Inputs made from real images and captions, per module, for static quantisation.
    calibration: dict[str, list[ShapeCase]] = field(default_factory=dict)


def _numpy(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: tensor.numpy() for name, tensor in tensors.items()}


def _case(sizes: dict[str, int], tensors: dict[str, torch.Tensor]) -> ShapeCase:
    return ShapeCase(" ".join(f"{axis}={size}" for axis, size in sizes.items()), _numpy(tensors))


def _tensor_specs(arrays: dict[str, np.ndarray], axes: dict[str, dict[int, str]]) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(name, str(array.dtype), tuple(axes.get(name, {}).get(i, n) for i, n in enumerate(array.shape)))
        for name, array in arrays.items()
    )


def _spec(name: str, wrapper: torch.nn.Module, example: dict[str, torch.Tensor], cases: list[ShapeCase],
          description: str, axis_ranges: dict[str, tuple[int, int, int]]) -> ModuleSpec:
    with torch.no_grad():  # output dtypes and fixed sizes, read off one run at the example sizes
        outputs = wrapper(*example.values())
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    named_axes = {axis for axes in wrapper.axes.values() for axis in axes.values()}
    return ModuleSpec(
        name=name,
        inputs=_tensor_specs(_numpy(example), wrapper.axes),
        outputs=_tensor_specs({n: o.numpy() for n, o in zip(wrapper.output_names, outputs)}, wrapper.axes),
        example=_case({"example": 0}, example),
        cases=cases,
        description=description,
        axis_ranges={axis: limits for axis, limits in axis_ranges.items() if axis in named_axes},
        gates=GATES[name],
    )


def module_specs(conversion: BlipConversion, wrapper_for) -> tuple[list[ModuleSpec], dict[str, str]]:
    """The graphs a source yields, and the modules it cannot yield with the reason."""
    source = conversion.source
    config: BlipConfig = (source.captioning or source.retrieval).config
    size = source.image_size
    tokens = wrappers.image_token_count(config.vision_config, size)
    ranges = {
        "batch": (1, 1, conversion.max_batch),
        "text": (1, 8, conversion.max_text_len),
        "new": (1, 1, conversion.max_text_len),
        "past": (1, conversion.max_text_len // 2, conversion.max_text_len),
        # Fixed by the image size; the graphs keep the axis symbolic, so a profile still needs it.
        "image_tokens": (tokens, tokens, tokens),
    }
    specs: list[ModuleSpec] = []
    not_exported = dict(source.absent)

    def add(name: str, make_inputs, example_sizes: dict[str, int], case_sizes, description: str) -> None:
        wrapper = wrapper_for(name)
        example = make_inputs(config, **example_sizes, image_size=size, seed=0)
        cases = [
            _case(sizes, make_inputs(config, **sizes, image_size=size, seed=seed))
            for seed, sizes in enumerate((*case_sizes,), start=1)
        ]
        spec = _spec(name, wrapper, example, cases, description, ranges)
        spec.calibration = conversion.calibration.get(name, [])
        specs.append(spec)

    vision = f"pixel_values [batch, 3, {size}, {size}] -> image_embeds (ViT last hidden state)"
    add(VISION_ENCODER, wrappers.vision_inputs, {"batch": 2}, VISION_CASES, vision)
    if not source.shared_vision:
        add(RETRIEVAL_VISION_ENCODER, wrappers.vision_inputs, {"batch": 2}, VISION_CASES,
            vision + " of the retrieval checkpoint, whose vision weights differ from the captioning one's")
    if source.retrieval is not None:
        add(TEXT_ENCODER, wrappers.text_encoder_inputs, {"batch": 2, "text": 6}, TEXT_ENCODER_CASES,
            "ITM probability ([ENC] first, cross-attending to the image) and normalised ITC features")
    if source.captioning is not None:
        add(TEXT_DECODER, wrappers.decoder_first_inputs, {"batch": 2, "text": 4}, DECODER_FIRST_CASES,
            "captioning decoder, first step: logits, self-attention cache, cross-attention keys/values")
        add(TEXT_DECODER_WITH_PAST, wrappers.decoder_past_inputs, {"batch": 2, "new": 2, "past": 4},
            DECODER_PAST_CASES, "captioning decoder, later steps: new tokens after a cached prefix")
    return specs, not_exported
