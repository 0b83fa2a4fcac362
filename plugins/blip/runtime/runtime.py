"""`BlipRuntime`: caption images and score image-text pairs with a `convert blip` output directory.

Reads `manifest.json` for everything it needs (preprocessing, special tokens, prompt, graph files)
and runs the graphs with onnxruntime on the CPU. Sessions are created on first use, after the
graph's sha256 is checked against the manifest.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from converter_core.errors import InputError
from converter_core.output import MANIFEST_NAME, sha256_file
from plugins.blip import graphs
from plugins.blip.graphs import (
    RETRIEVAL_VISION_ENCODER,
    TEXT_DECODER,
    TEXT_DECODER_WITH_PAST,
    TEXT_ENCODER,
    VISION_ENCODER,
)
from plugins.blip.runtime.decoding import CachedDecoder, DecodingOptions, decode
from plugins.blip.runtime.preprocess import Preprocessor, load_image
from plugins.blip.runtime.tokenizer import BlipTokenizer

ImageInput = Image.Image | str | Path


@dataclass
class Caption:
    """`token_ids`: what the decoder wrote after the prompt, ending with `[SEP]` when it finished.
    `text`: those tokens as text (None without a tokenizer). `score`: their mean log-probability
    (beam search: generate's sequence score, sum / length ** length_penalty)."""

    text: str | None
    token_ids: list[int]
    score: float


@dataclass
class Match:
    """`itm_probability`: the ITM head's probability that the text describes the image.
    `itc_similarity`: cosine of the projected image and text features (BLIP's ITC score, no temperature)."""

    text: str
    itm_probability: float
    itc_similarity: float


def read_blip_manifest(out_dir: Path) -> dict[str, Any]:
    """The manifest of a BLIP conversion whose graph files are all present; else InputError."""
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        raise InputError(f"{out_dir}: no {MANIFEST_NAME}; not a `convert blip` output directory")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("model_type") != "blip":
        model_type = manifest.get("model_type") if isinstance(manifest, dict) else None
        raise InputError(f"{out_dir}: holds a {model_type!r} conversion, not a BLIP one")
    for key in ("modules", "preprocessing", "tokens", "generation"):
        if key not in manifest:
            raise InputError(f"{path}: has no {key!r}; convert the model again with this version")
    for name, module in manifest["modules"].items():
        if not (out_dir / module["file"]).is_file():
            raise InputError(f"{out_dir}: {module['file']} (module {name}) is missing; convert again")
    return manifest


class BlipRuntime:
    """A `convert blip` output directory, ready to caption and match. Needs no torch.

    `tokenizer_dir` overrides the tokenizer shipped in the output (random-weight conversions ship
    none). `threads` sets onnxruntime's intra-op threads (default: its own choice).
    """

    def __init__(self, out_dir: str | Path, *, tokenizer_dir: str | Path | None = None, threads: int | None = None):
        self.out_dir = Path(out_dir)
        self.manifest = read_blip_manifest(self.out_dir)
        self.tokens: dict[str, int] = self.manifest["tokens"]
        self.generation: dict[str, Any] = self.manifest["generation"]
        self.preprocess = Preprocessor(self.manifest["preprocessing"])
        self._tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
        if self._tokenizer_dir is not None and not self._tokenizer_dir.is_dir():
            raise InputError(f"{self._tokenizer_dir}: not a tokenizer directory")
        self._tokenizer: BlipTokenizer | None = None
        self._threads = threads
        self._sessions: dict[str, ort.InferenceSession] = {}

    # -- the pieces, created on first use ------------------------------------------------------

    def has(self, module: str) -> bool:
        return module in self.manifest["modules"]

    def session(self, module: str) -> ort.InferenceSession:
        if module not in self._sessions:
            if not self.has(module):
                reason = self.manifest.get("not_exported", {}).get(module, "it is not in the manifest")
                raise InputError(f"{self.out_dir}: has no {module} ({reason})")
            entry = self.manifest["modules"][module]
            path = self.out_dir / entry["file"]
            # The graph names its external-data files itself; both are pinned by the manifest's hashes.
            for file, expected in [(entry["file"], entry["sha256"]),
                                   *((data["file"], data["sha256"]) for data in entry.get("data_files", []))]:
                if sha256_file(self.out_dir / file) != expected:
                    raise InputError(f"{self.out_dir / file}: its sha256 differs from the manifest's; the file "
                                     "changed after conversion: convert the model again")
            options = ort.SessionOptions()
            if self._threads:
                options.intra_op_num_threads = self._threads
            self._sessions[module] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return self._sessions[module]

    @property
    def tokenizer(self) -> BlipTokenizer:
        if self._tokenizer is None:
            directory = self._tokenizer_dir
            if directory is None:
                if not self.manifest.get("tokenizer", {}).get("files"):
                    raise InputError(f"{self.out_dir}: ships no tokenizer "
                                     f"({self.manifest.get('tokenizer', {}).get('reason', 'none recorded')}); "
                                     "give a tokenizer directory (--tokenizer DIR)")
                directory = self.out_dir / "tokenizer"
            max_length = int(self.generation["max_position_embeddings"])
            self._tokenizer = BlipTokenizer.from_directory(directory, self.tokens, max_length)
        return self._tokenizer

    def has_tokenizer(self) -> bool:
        return self._tokenizer_dir is not None or bool(self.manifest.get("tokenizer", {}).get("files"))

    def pixel_values(self, images: Sequence[ImageInput]) -> np.ndarray:
        return self.preprocess([load_image(i) if isinstance(i, (str, Path)) else i for i in images])

    def image_embeds(self, images: Sequence[ImageInput], module: str = VISION_ENCODER) -> np.ndarray:
        return self.session(module).run(None, {graphs.PIXEL_VALUES: self.pixel_values(images)})[0]

    def prompt_ids(self, prompt: str | None = None) -> list[int]:
        """Decoder input for `prompt` (None: the manifest's prompt; "": none, `[DEC]` alone)."""
        if prompt is None:
            if self.generation.get("prompt_ids"):
                return list(self.generation["prompt_ids"])
            prompt = self.generation.get("prompt") or ""
        if not prompt:
            return [self.tokens["DEC"]]
        return self.tokenizer.prompt_ids(prompt)

    # -- the tasks -----------------------------------------------------------------------------

    def caption(
        self,
        images: Sequence[ImageInput],
        *,
        beams: int = 1,
        max_tokens: int = 20,
        min_tokens: int = 0,
        repetition_penalty: float = 1.0,
        prompt: str | None = None,
        prompt_ids: Sequence[int] | None = None,
    ) -> list[Caption]:
        """One caption per image, all images in one batch.

        `max_tokens` / `min_tokens` count the tokens written after the prompt (`[SEP]` included),
        as generate's `max_new_tokens` / `min_new_tokens`. `prompt` is text (None: the manifest's
        prompt, "a picture of " for BLIP; "": none); `prompt_ids` gives the decoder input directly
        (starting with `[DEC]`) instead. The caption text leaves the prompt out.
        """
        if not images:
            return []
        for module in (TEXT_DECODER, TEXT_DECODER_WITH_PAST):
            if not self.has(module):
                reason = self.manifest.get("not_exported", {}).get(module, "")
                raise InputError(f"{self.out_dir}: has no {module}: the checkpoint had no captioning decoder"
                                 + (f" ({reason})" if reason else ""))
        if beams < 1 or max_tokens < 1 or min_tokens < 0 or repetition_penalty <= 0:
            raise InputError("beams and max_tokens must be >= 1, min_tokens >= 0, repetition_penalty > 0")
        ids = list(prompt_ids) if prompt_ids is not None else self.prompt_ids(prompt)
        if not ids or ids[0] != self.tokens["DEC"]:
            raise InputError(f"a captioning prompt starts with [DEC] (id {self.tokens['DEC']}), got {ids[:1]}")
        limit = int(self.generation["max_position_embeddings"])
        if len(ids) + max_tokens > limit:
            raise InputError(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                             f"{limit} positions")
        decoder = CachedDecoder(self.session(TEXT_DECODER), self.session(TEXT_DECODER_WITH_PAST),
                                int(self.generation["num_layers"]))
        options = DecodingOptions(beams=beams, max_tokens=max_tokens, min_tokens=min_tokens,
                                  repetition_penalty=repetition_penalty)
        decoded = decode(decoder, self.image_embeds(images), ids, options,
                         eos_id=int(self.generation["eos_token_id"]), pad_id=self.tokens["PAD"])
        return [Caption(self._text(ids, d.token_ids), d.token_ids, d.score) for d in decoded]

    def match(self, image: ImageInput, texts: Sequence[str]) -> list[Match]:
        """ITM probability and ITC similarity of each text with one image, all texts in one batch."""
        if not self.has(TEXT_ENCODER):
            reason = self.manifest.get("not_exported", {}).get(TEXT_ENCODER, "")
            raise InputError(f"{self.out_dir}: has no text_encoder: the checkpoint had no text encoder "
                             "(ITM/ITC need a retrieval or pretrain checkpoint)" + (f" ({reason})" if reason else ""))
        if not texts:
            return []
        vision = RETRIEVAL_VISION_ENCODER if self.has(RETRIEVAL_VISION_ENCODER) else VISION_ENCODER
        image_embeds = self.image_embeds([image], vision)
        input_ids, attention_mask = self.tokenizer.batch(texts)
        itm, text_features, image_features = self.session(TEXT_ENCODER).run(
            list(graphs.TEXT_ENCODER_OUTPUTS),
            {graphs.INPUT_IDS: input_ids, graphs.ATTENTION_MASK: attention_mask,
             graphs.IMAGE_EMBEDS: np.repeat(image_embeds, len(texts), axis=0)},
        )
        itc = (text_features * image_features).sum(axis=-1)
        return [Match(text, float(p), float(s)) for text, p, s in zip(texts, itm, itc)]

    def _text(self, prompt_ids: list[int], token_ids: list[int]) -> str | None:
        """The caption without the prompt: the whole sequence decoded, the decoded prompt cut off
        (as BLIP does), so that word pieces join across the boundary."""
        if not self.has_tokenizer():
            return None
        whole = self.tokenizer.decode([*prompt_ids, *token_ids])
        head = self.tokenizer.decode(prompt_ids)
        if head and whole.startswith(head):
            return whole[len(head):].strip()
        return self.tokenizer.decode(token_ids).strip()
