"""BLIP shapes by name (`tiny`, `base`, `large`), their transformers configs, and random-weight models.

The checkpoint loader builds its configs through `BlipDims` too, so a preset and a checkpoint of the
same shape get the same config.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TypeVar

import torch
from torch import nn
from transformers import (
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    BlipTextConfig,
    PreTrainedModel,
)
from transformers.initialization import no_init_weights

from converter_core.errors import InputError
from plugins.blip.graphs import TEXT_DECODER, TEXT_ENCODER
from plugins.blip.source import BlipSource

HEAD_DIM = 64  # ViT and BERT both use 64-wide heads; checkpoints do not record the head count
VISION_LAYER_NORM_EPS = 1e-6  # the original ViT's; transformers defaults to 1e-5
INIT_STD = 0.02
CLS_TOKEN_ID = 101  # bert-base-uncased; BlipTextConfig has no field for it
PARTS = ("captioning", "retrieval")  # what random_source builds by default
ALL_PARTS = (*PARTS, "vqa")

M = TypeVar("M", bound=PreTrainedModel)


@dataclass(frozen=True)
class BlipDims:
    """The shape of a BLIP model: everything a config needs that a checkpoint's tensors tell.

    Attention heads are hidden / 64. The last two vocabulary ids are `[DEC]` and `[ENC]`, as in
    bert-base-uncased + BLIP's two added tokens (30522, 30523 of 30524).
    """

    vision_hidden: int
    vision_layers: int
    vision_mlp: int
    image_size: int
    text_hidden: int
    text_layers: int
    text_intermediate: int
    vocab_size: int
    max_positions: int
    image_text_hidden: int = 256
    patch_size: int = 16

    def config(self) -> BlipConfig:
        if self.vocab_size <= CLS_TOKEN_ID + 3:
            raise InputError(f"a BLIP vocabulary needs more than {CLS_TOKEN_ID + 3} ids, got {self.vocab_size}")
        return BlipConfig(
            vision_config={
                "hidden_size": self.vision_hidden,
                "intermediate_size": self.vision_mlp,
                "num_hidden_layers": self.vision_layers,
                "num_attention_heads": self.vision_hidden // HEAD_DIM,
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "layer_norm_eps": VISION_LAYER_NORM_EPS,
                "initializer_range": INIT_STD,
            },
            text_config={
                "vocab_size": self.vocab_size,
                "hidden_size": self.text_hidden,
                "encoder_hidden_size": self.vision_hidden,
                "intermediate_size": self.text_intermediate,
                "num_hidden_layers": self.text_layers,
                "num_attention_heads": self.text_hidden // HEAD_DIM,
                "max_position_embeddings": self.max_positions,
                "bos_token_id": self.vocab_size - 2,  # [DEC]
                "pad_token_id": 0,
                "sep_token_id": 102,
                "initializer_range": INIT_STD,
            },
            image_text_hidden_size=self.image_text_hidden,
            initializer_range=INIT_STD,
        )


PRESETS: dict[str, BlipDims] = {
    # Head width 64 like the real models, so a tiny checkpoint's head count is inferred the same way.
    "tiny": BlipDims(
        vision_hidden=128, vision_layers=2, vision_mlp=256, image_size=64,
        text_hidden=128, text_layers=2, text_intermediate=256, vocab_size=128, max_positions=64,
        image_text_hidden=64,
    ),
    "base": BlipDims(
        vision_hidden=768, vision_layers=12, vision_mlp=3072, image_size=384,
        text_hidden=768, text_layers=12, text_intermediate=3072, vocab_size=30524, max_positions=512,
    ),
    "large": BlipDims(
        vision_hidden=1024, vision_layers=24, vision_mlp=4096, image_size=384,
        text_hidden=768, text_layers=12, text_intermediate=3072, vocab_size=30524, max_positions=512,
    ),
}  # fmt: skip


def preset_dims(name: str, *, image_size: int | None = None) -> BlipDims:
    """The named preset, at `image_size` when given. Unknown name or bad size -> InputError."""
    if name not in PRESETS:
        raise InputError(f"unknown BLIP preset {name!r}; choose one of: {', '.join(PRESETS)}")
    dims = PRESETS[name]
    if image_size is not None:
        check_image_size(image_size, dims.patch_size)
        dims = replace(dims, image_size=image_size)
    return dims


def check_image_size(image_size: int, patch_size: int) -> None:
    if image_size <= 0 or image_size % patch_size:
        raise InputError(f"image size {image_size} is not a positive multiple of the patch size {patch_size}")


def special_tokens(text_config: BlipTextConfig) -> dict[str, int]:
    """Ids of BLIP's special tokens; `[ENC]` follows `[DEC]` (the config's bos) as in BLIP's tokenizer."""
    dec = text_config.bos_token_id
    return {
        "DEC": dec,
        "ENC": dec + 1,
        "SEP": text_config.sep_token_id,
        "PAD": text_config.pad_token_id,
        "CLS": CLS_TOKEN_ID,
    }


def empty_model(cls: type[M], config: BlipConfig) -> M:
    """`cls(config)` without transformers' weight initialisation, which takes seconds at base size.

    Every parameter holds garbage until the caller loads or draws it.
    """
    with no_init_weights():
        model = cls(config)
    model.tie_weights()  # skipped with the initialisation: the LM head shares the word embeddings
    return model


def empty_models(
    config: BlipConfig, parts: tuple[str, ...]
) -> tuple[BlipForConditionalGeneration | None, BlipForImageTextRetrieval | None]:
    """Uninitialised captioning and retrieval models for `parts`, sharing one vision model object."""
    captioning = empty_model(BlipForConditionalGeneration, config) if "captioning" in parts else None
    retrieval = empty_model(BlipForImageTextRetrieval, config) if "retrieval" in parts else None
    if captioning is not None and retrieval is not None:
        retrieval.vision_model = captioning.vision_model
    return captioning, retrieval


def empty_vqa_model(config: BlipConfig) -> BlipForQuestionAnswering:
    """An uninitialised BlipForQuestionAnswering whose answer decoder cross-attends at the text width.

    The original BLIP_VQA builds its decoder from the plain BERT config, so the decoder's cross-
    attention reads question states (text hidden size); transformers builds it from the one text
    config, whose `encoder_hidden_size` is the vision width. Both agree for ViT-B; for a wider vision
    tower the decoder is rebuilt here at the text width, as the original checkpoint's shapes have it.
    """
    model = empty_model(BlipForQuestionAnswering, config)
    text = config.text_config
    if text.encoder_hidden_size != text.hidden_size:
        from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel

        decoder_config = BlipTextConfig.from_dict({**text.to_dict(), "encoder_hidden_size": text.hidden_size})
        with no_init_weights():
            model.text_decoder = BlipTextLMHeadModel(decoder_config)
        model.tie_weights()
    return model


def random_source(
    preset: str,
    *,
    seed: int = 0,
    image_size: int | None = None,
    parts: tuple[str, ...] = PARTS,
) -> BlipSource:
    """BLIP models with random weights drawn from `seed`, for tests and timing.

    Weights and biases are uniform with std 0.02 (uniform draws are 3x faster than normal ones at
    base size) and LayerNorm scales 1 + U(-0.1, 0.1), so that a wrong bias, a skipped LayerNorm or a
    wrong epsilon shows in outputs. The vision tower, the text decoder and the retrieval text side
    each draw from their own stream, so the vision weights do not depend on `parts`.
    """
    unknown = [part for part in parts if part not in ALL_PARTS]
    if unknown or not parts:
        raise InputError(f"unknown BLIP parts {unknown or list(parts)}; choose from: {', '.join(ALL_PARTS)}")
    dims = preset_dims(preset, image_size=image_size)
    config = dims.config()
    if "vqa" in parts:
        if len(parts) > 1:
            raise InputError("a random VQA source holds the VQA model alone")
        return _random_vqa_source(preset, config, dims.image_size, seed)
    captioning, retrieval = empty_models(config, tuple(parts))

    _draw((captioning if captioning is not None else retrieval).vision_model, _stream(seed, 0))
    if captioning is not None:
        _draw(captioning.text_decoder, _stream(seed, 1))
    if retrieval is not None:
        generator = _stream(seed, 2)
        for name, child in retrieval.named_children():
            if name != "vision_model":
                _draw(child, generator)

    absent = {}
    if captioning is None:
        absent[TEXT_DECODER] = f"the random {preset} source was built without captioning"
    if retrieval is None:
        absent[TEXT_ENCODER] = f"the random {preset} source was built without retrieval"
    return BlipSource(
        path=None,
        format="random",
        sha256=None,
        image_size=dims.image_size,
        captioning=captioning.eval() if captioning is not None else None,
        retrieval=retrieval.eval() if retrieval is not None else None,
        absent=absent,
        tokens=special_tokens(config.text_config),
    )


def _random_vqa_source(preset: str, config: BlipConfig, image_size: int, seed: int) -> BlipSource:
    """Streams as random_source's: 0 vision, 1 answer decoder, 2 question encoder."""
    model = empty_vqa_model(config)
    _draw(model.vision_model, _stream(seed, 0))
    _draw(model.text_decoder, _stream(seed, 1))
    _draw(model.text_encoder, _stream(seed, 2))
    reason = f"the random {preset} source is a VQA model"
    return BlipSource(path=None, format="random", sha256=None, image_size=image_size, captioning=None,
                      retrieval=None, absent={TEXT_DECODER: reason, TEXT_ENCODER: reason},
                      tokens=special_tokens(config.text_config), vqa=model.eval())


_UNIFORM_BOUND = INIT_STD * 3**0.5  # U(-a, a) has std a / sqrt(3)


def _stream(seed: int, index: int) -> torch.Generator:
    """Stream `index` (0 vision, 1 text decoder, 2 retrieval text side) of `seed`; no two seeds share one."""
    return torch.Generator().manual_seed(seed * 3 + index)


@torch.no_grad()
def _draw(module: nn.Module, generator: torch.Generator) -> None:
    """Fill every parameter of `module` once (tied parameters are one object), in a fixed order."""
    seen: set[int] = set()
    for owner in module.modules():
        for name, param in owner.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(owner, nn.LayerNorm) and name == "weight":
                param.uniform_(0.9, 1.1, generator=generator)
            else:
                param.uniform_(-_UNIFORM_BOUND, _UNIFORM_BOUND, generator=generator)
