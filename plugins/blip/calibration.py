"""Calibration inputs for static quantisation (the split plan's `calibration`), from real images and captions.

Static INT8 fixes each activation's range ahead of time; ranges measured on random validation
inputs need not fit real images. These cases carry what each BLIP graph sees in use: preprocessed
images for the vision encoders, caption tokens with the image embeddings the vision encoder gives
for the text graphs, and, for the decoder with a cache, the cache its first step leaves.

`tokenize` turns a caption into token ids without special tokens (bert-base-uncased's tokenizer
for real checkpoints); this module adds BLIP's own ([DEC], [CLS], [SEP]) from `BlipSource.tokens`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from converter_core.specs import ShapeCase
from plugins.blip import graphs
from plugins.blip.graphs import (
    RETRIEVAL_VISION_ENCODER,
    TEXT_DECODER,
    TEXT_DECODER_WITH_PAST,
    TEXT_ENCODER,
    VISION_ENCODER,
)
from plugins.blip.recipes import RECIPE
from plugins.blip.runtime.preprocess import Preprocessor
from plugins.blip.source import BlipSource


def pixel_values(images: Sequence[Image.Image], image_size: int) -> np.ndarray:
    """BLIP's preprocessing, as the runtime does it."""
    return Preprocessor(graphs.preprocessing(image_size))(images)


def _token_rows(captions: Sequence[str], tokenize: Callable[[str], list[int]], first: int, sep: int,
                pad: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`first` + caption + [SEP] per caption, right-padded to the longest; and the attention mask."""
    rows = [[first, *tokenize(caption)[: max_len - 2], sep] for caption in captions]
    width = max(len(row) for row in rows)
    ids = np.full((len(rows), width), pad, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def calibration_cases(
    source: BlipSource,
    images: Sequence[Image.Image],
    captions: Sequence[str],
    tokenize: Callable[[str], list[int]],
    modules: Sequence[str],
    batch: int = 4,
    max_text_len: int = 40,
) -> dict[str, list[ShapeCase]]:
    """Calibration cases per module name in `modules`, `batch` images (with their captions) per case.

    `captions[i]` describes `images[i]`. The text graphs' image embeddings come from running the
    vision encoder in PyTorch on the same images.
    """
    if len(images) != len(captions) or not images:
        raise ValueError(f"need one caption per image, got {len(images)} images and {len(captions)} captions")
    tokens = source.tokens
    cases: dict[str, list[ShapeCase]] = {name: [] for name in modules}
    for start in range(0, len(images), batch):
        label = f"images {start}..{min(start + batch, len(images)) - 1}"
        pixels = pixel_values(images[start : start + batch], source.image_size)
        texts = captions[start : start + batch]
        for name, model in ((VISION_ENCODER, source.model),
                            (RETRIEVAL_VISION_ENCODER, source.retrieval)):
            if name in cases and model is not None:
                cases[name].append(ShapeCase(label, {graphs.PIXEL_VALUES: pixels}))
        with torch.no_grad():
            if TEXT_ENCODER in cases and source.retrieval is not None:
                embeds = RECIPE[RETRIEVAL_VISION_ENCODER].build(source)(torch.from_numpy(pixels)).numpy()
                ids, mask = _token_rows(texts, tokenize, tokens["CLS"], tokens["SEP"], tokens["PAD"], max_text_len)
                inputs = {graphs.INPUT_IDS: ids, graphs.ATTENTION_MASK: mask, graphs.IMAGE_EMBEDS: embeds}
                cases[TEXT_ENCODER].append(ShapeCase(label, inputs))
            if source.captioning is None or not {TEXT_DECODER, TEXT_DECODER_WITH_PAST} & cases.keys():
                continue
            embeds = RECIPE[VISION_ENCODER].build(source)(torch.from_numpy(pixels)).numpy()
            # The decoder graphs take no padding mask: every row is cut to the shortest caption.
            ids, mask = _token_rows(texts, tokenize, tokens["DEC"], tokens["SEP"], tokens["PAD"], max_text_len)
            ids = ids[:, : int(mask.sum(1).min())]
            if TEXT_DECODER in cases:
                cases[TEXT_DECODER].append(ShapeCase(label, {graphs.INPUT_IDS: ids, graphs.IMAGE_EMBEDS: embeds}))
            if TEXT_DECODER_WITH_PAST in cases and ids.shape[1] >= 2:
                first = RECIPE[TEXT_DECODER].build(source)
                outputs = first(torch.from_numpy(ids[:, :-1]), torch.from_numpy(embeds))
                layers = first.num_layers
                named = dict(zip(graphs.decoder_first_outputs(layers), outputs))
                past = {past: named[present].numpy()
                        for past, present in zip(graphs.past_names(layers), graphs.present_names(layers))}
                cross = {name: named[name].numpy() for name in graphs.cross_names(layers)}
                cases[TEXT_DECODER_WITH_PAST].append(ShapeCase(label, {graphs.INPUT_IDS: ids[:, -1:], **past, **cross}))
    return cases
