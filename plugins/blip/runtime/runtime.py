"""`BlipRuntime`: caption images and score image-text pairs with a `convert blip` output directory.

Reads `manifest.json` for everything it needs (preprocessing, special tokens, prompt, graph files)
and runs the graphs with onnxruntime on the CPU. Sessions are created on first use, after the
graph's sha256 is checked against the manifest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from converter_core.errors import InputError
from converter_core.output import sha256_file
from plugins.blip import graphs
from plugins.blip.graphs import (
    ANSWER_DECODER,
    ANSWER_DECODER_WITH_PAST,
    QUESTION_ENCODER,
    RETRIEVAL_VISION_ENCODER,
    TEXT_DECODER,
    TEXT_DECODER_WITH_PAST,
    TEXT_ENCODER,
    VISION_ENCODER,
)
from plugins.blip.runtime.decoding import BeamScoring, CachedDecoder, DecodingOptions, decode, require_finite
from plugins.blip.runtime.manifest import inside, read_blip_manifest
from plugins.blip.runtime.preprocess import Preprocessor, load_image
from plugins.blip.runtime.tokenizer import BlipTokenizer
from plugins.blip.runtime.vqa import AnswerDecoder, RankedAnswer, rank

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


@dataclass
class Answer:
    """An answer to one question about one image. Generate mode: `token_ids` as `Caption`'s (after
    `[DEC]`, ending with `[SEP]` when it finished), `score` their mean log-probability or beam score.
    Rank mode: `text` is the best candidate, `score` its BLIP score, `ranked` the top-k candidates
    best first, and `token_ids` is empty."""

    question: str
    text: str | None
    token_ids: list[int]
    score: float
    ranked: list[RankedAnswer] | None = None


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
            path = inside(self.out_dir, entry["file"], f"modules.{module}.file")
            # The graph names its external-data files itself; both are pinned by the manifest's hashes.
            for file, expected in [(entry["file"], entry["sha256"]),
                                   *((data["file"], data["sha256"]) for data in entry.get("data_files", []))]:
                self._check_file(file, expected)
            options = ort.SessionOptions()
            if self._threads:
                options.intra_op_num_threads = self._threads
            self._sessions[module] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return self._sessions[module]

    def _check_file(self, relative: str, expected: str) -> None:
        path = inside(self.out_dir, relative, relative)
        if not path.is_file() or sha256_file(path) != expected:
            raise InputError(f"{path}: its sha256 differs from the manifest's (or it is missing); the file changed "
                             "after conversion: convert the model again")

    @property
    def max_text_len(self) -> int:
        """The longest text (prompt + caption) the graphs were validated at."""
        return min(int(self.generation["max_position_embeddings"]), int(self.generation["max_text_len"]))

    @property
    def tokenizer(self) -> BlipTokenizer:
        if self._tokenizer is None:
            directory = self._tokenizer_dir
            if directory is None:
                files = self.manifest["tokenizer"]["files"]
                if not files:
                    raise InputError(f"{self.out_dir}: ships no tokenizer "
                                     f"({self.manifest['tokenizer'].get('reason', 'none recorded')}); "
                                     "give a tokenizer directory (--tokenizer DIR)")
                for name in files:  # a swapped line in vocab.txt would silently change every caption
                    self._check_file(name, self.manifest["assets"][name])
                directory = self.out_dir / "tokenizer"
            self._tokenizer = BlipTokenizer.from_directory(directory, self.tokens, self.max_text_len)
        return self._tokenizer

    def has_tokenizer(self) -> bool:
        return self._tokenizer_dir is not None or bool(self.manifest["tokenizer"]["files"])

    def pixel_values(self, images: Sequence[ImageInput]) -> np.ndarray:
        return self.preprocess([load_image(i) if isinstance(i, (str, Path)) else i for i in images])

    def image_embeds(self, images: Sequence[ImageInput], module: str = VISION_ENCODER) -> np.ndarray:
        embeds = self.session(module).run(None, {graphs.PIXEL_VALUES: self.pixel_values(images)})[0]
        return require_finite(embeds, module, graphs.IMAGE_EMBEDS)

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
        beam_scoring: BeamScoring = "transformers",
    ) -> list[Caption]:
        """One caption per image, all images in one batch.

        `max_tokens` / `min_tokens` count the tokens written after the prompt (`[SEP]` included),
        as generate's `max_new_tokens` / `min_new_tokens`. `prompt` is text (None: the manifest's
        prompt, "a picture of " for BLIP; "": none); `prompt_ids` gives the decoder input directly
        (starting with `[DEC]`) instead. The caption text leaves the prompt out. `beam_scoring`
        "transformers" ranks finished beams as transformers 5 does (sum / new tokens, [SEP]
        counted), "blip" as the original BLIP code with transformers 4.15 (sum / whole sequence,
        prompt counted, [SEP] not): see `decoding`. `blip_generate_defaults` gives BLIP's own settings.
        """
        if not images:
            return []
        self._require_decoder()
        return self.caption_embeds(self.image_embeds(images), beams=beams, max_tokens=max_tokens, min_tokens=min_tokens,
                                   repetition_penalty=repetition_penalty, prompt=prompt, prompt_ids=prompt_ids,
                                   beam_scoring=beam_scoring)

    def caption_embeds(
        self,
        image_embeds: np.ndarray,
        *,
        beams: int = 1,
        max_tokens: int = 20,
        min_tokens: int = 0,
        repetition_penalty: float = 1.0,
        prompt: str | None = None,
        prompt_ids: Sequence[int] | None = None,
        beam_scoring: BeamScoring = "transformers",
    ) -> list[Caption]:
        """`caption` from the vision encoder's output (`image_embeds`), for a caller that also
        wants the image's ITC embedding from the same vision pass (`convert bulk`)."""
        self._require_decoder()
        options = DecodingOptions(beams=beams, max_tokens=max_tokens, min_tokens=min_tokens,
                                  repetition_penalty=repetition_penalty, beam_scoring=beam_scoring)
        options.check()
        ids = list(prompt_ids) if prompt_ids is not None else self.prompt_ids(prompt)
        if not ids or ids[0] != self.tokens["DEC"]:
            raise InputError(f"a captioning prompt starts with [DEC] (id {self.tokens['DEC']}), got {ids[:1]}")
        if len(ids) + max_tokens > self.max_text_len:
            raise InputError(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the {self.max_text_len} "
                             "positions this output was validated for (convert with a larger --max-text-len)")
        decoder = CachedDecoder(self.session(TEXT_DECODER), self.session(TEXT_DECODER_WITH_PAST),
                                int(self.generation["num_layers"]))
        decoded = decode(decoder, image_embeds, ids, options,
                         eos_id=int(self.generation["eos_token_id"]), pad_id=self.tokens["PAD"])
        return [Caption(self._text(ids, d.token_ids), d.token_ids, d.score) for d in decoded]

    def match(self, image: ImageInput, texts: Sequence[str]) -> list[Match]:
        """ITM probability and ITC similarity of each text with one image, all texts in one batch."""
        self._require_text_encoder()
        if not texts:
            return []
        image_embeds = self.image_embeds([image], self.retrieval_vision)
        input_ids, attention_mask = self.tokenizer.batch(texts)
        itm, text_features, image_features = self.session(TEXT_ENCODER).run(
            list(graphs.TEXT_ENCODER_OUTPUTS),
            {graphs.INPUT_IDS: input_ids, graphs.ATTENTION_MASK: attention_mask,
             graphs.IMAGE_EMBEDS: np.repeat(image_embeds, len(texts), axis=0)},
        )
        itc = (text_features * image_features).sum(axis=-1)
        require_finite(itm, TEXT_ENCODER, graphs.ITM_PROBABILITY)
        require_finite(itc, TEXT_ENCODER, "ITC similarity")
        return [Match(text, float(p), float(s)) for text, p, s in zip(texts, itm, itc)]

    def answer(
        self,
        images: Sequence[ImageInput],
        questions: Sequence[str],
        *,
        beams: int = 3,
        max_tokens: int = 9,
        min_tokens: int = 0,
        beam_scoring: BeamScoring = "transformers",
        answers: Sequence[str] | None = None,
        k: int | None = None,
    ) -> list[Answer]:
        """Answer one question per image (or every question about one image), all in one batch.

        Generate mode (no `answers`): BLIP_VQA's defaults, 3 beams and max_length 10 counting the
        `[DEC]` that starts the answer, so 9 tokens written here (`max_tokens`, `min_tokens` count
        written tokens as in `caption`). Rank mode (`answers`): BLIP's VQA evaluation, the `k`
        (default: the manifest's, 128) candidates with the likeliest first token, ranked by the
        decoder over the whole answer (see `plugins.blip.runtime.vqa`).
        """
        vqa = self.generation.get("vqa")  # checked by read_blip_manifest when present
        if not self.has(QUESTION_ENCODER) or vqa is None:
            raise InputError(f"{self.out_dir}: has no question_encoder: it was not converted from a BLIP VQA "
                             "checkpoint (BlipForQuestionAnswering or model_base_vqa_*.pth)")
        images, questions = list(images), [str(q) for q in questions]
        if len(images) == 1 and len(questions) > 1:
            images = images * len(questions)
        if len(images) != len(questions):
            raise InputError(f"give one question per image (or one image), got {len(images)} images and "
                             f"{len(questions)} questions")
        if any(not q.strip() for q in questions):
            raise InputError("a question is empty")
        options = DecodingOptions(beams=beams, max_tokens=max_tokens, min_tokens=min_tokens, beam_scoring=beam_scoring)
        options.check()
        if 1 + max_tokens > self.max_text_len:
            raise InputError(f"max_tokens {max_tokens} exceeds the {self.max_text_len} positions this output was "
                             "validated for")
        candidates = None if answers is None else [str(a) for a in answers]
        if candidates is not None and (not candidates or any(not a.strip() for a in candidates)):
            raise InputError("rank mode needs a list of non-empty candidate answers")
        top_k = int(vqa["rank"]["k"]) if k is None else k
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise InputError(f"k must be an integer >= 1, got {top_k!r}")
        if not images:
            return []
        input_ids, question_mask = self.tokenizer.batch(questions, int(vqa["question_max_tokens"]))
        states = self.session(QUESTION_ENCODER).run(None, {
            graphs.INPUT_IDS: input_ids, graphs.ATTENTION_MASK: question_mask,
            graphs.IMAGE_EMBEDS: self.image_embeds(images)})[0]
        states = require_finite(states, QUESTION_ENCODER, graphs.QUESTION_STATES)
        layers = int(self.generation["num_layers"])
        first, with_past = self.session(ANSWER_DECODER), self.session(ANSWER_DECODER_WITH_PAST)
        if candidates is not None:
            answer_ids, answer_mask = self.tokenizer.batch(candidates)
            answer_ids[:, 0] = self.tokens["DEC"]
            decoder = AnswerDecoder(first, with_past, layers, question_mask)
            ranked = rank(decoder, states, question_mask, candidates, answer_ids, answer_mask, top_k,
                          float(vqa["rank"]["label_smoothing"]))
            return [Answer(q, r[0].answer, [], r[0].score, r) for q, r in zip(questions, ranked)]
        # Generate mode attends to every question position, padding included (BLIP_VQA, transformers).
        decoder = AnswerDecoder(first, with_past, layers, np.ones_like(question_mask))
        decoded = decode(decoder, states, [self.tokens["DEC"]], options,
                         eos_id=int(self.generation["eos_token_id"]), pad_id=self.tokens["PAD"])
        dec = [self.tokens["DEC"]]
        return [Answer(q, self._text(dec, d.token_ids), d.token_ids, d.score) for q, d in zip(questions, decoded)]

    @property
    def retrieval_vision(self) -> str:
        """The vision graph ITM and ITC read: retrieval's own when its weights differ from captioning's."""
        return RETRIEVAL_VISION_ENCODER if self.has(RETRIEVAL_VISION_ENCODER) else VISION_ENCODER

    def embedding(self, images: Sequence[ImageInput], image_embeds: np.ndarray | None = None) -> np.ndarray:
        """The ITC image embedding of each image, float32 [images, proj], unit length: BLIP's
        `normalize(vision_proj(image_embeds[:, 0]))`, the vector a retrieval index stores.
        `image_embeds`: the output of `retrieval_vision` for these images, when the caller has it."""
        self._require_text_encoder()
        if not images:
            return np.zeros((0, 0), np.float32)
        if image_embeds is None:
            image_embeds = self.image_embeds(images, self.retrieval_vision)
        # The projection lives in the text encoder graph, whose image output does not depend on
        # the text: the shortest text ([CLS] [SEP]) costs least.
        count = image_embeds.shape[0]
        input_ids = np.tile(np.array([[self.tokens["CLS"], self.tokens["SEP"]]], np.int64), (count, 1))
        (features,) = self.session(TEXT_ENCODER).run(
            [graphs.IMAGE_FEATURES],
            {graphs.INPUT_IDS: input_ids, graphs.ATTENTION_MASK: np.ones_like(input_ids),
             graphs.IMAGE_EMBEDS: image_embeds},
        )
        return require_finite(features.astype(np.float32, copy=False), TEXT_ENCODER, graphs.IMAGE_FEATURES)

    def _require_decoder(self) -> None:
        for module in (TEXT_DECODER, TEXT_DECODER_WITH_PAST):
            if not self.has(module):
                reason = self.manifest.get("not_exported", {}).get(module, "")
                raise InputError(f"{self.out_dir}: has no {module}: the checkpoint had no captioning decoder"
                                 + (f" ({reason})" if reason else ""))

    def _require_text_encoder(self) -> None:
        if not self.has(TEXT_ENCODER):
            reason = self.manifest.get("not_exported", {}).get(TEXT_ENCODER, "")
            raise InputError(f"{self.out_dir}: has no text_encoder: the checkpoint had no text encoder "
                             "(ITM/ITC need a retrieval or pretrain checkpoint)" + (f" ({reason})" if reason else ""))

    def blip_generate_defaults(self, prompt_ids: Sequence[int] | None = None) -> dict[str, Any]:
        """`caption` keywords that reproduce the original BLIP `generate()`: 3 beams, max_length 30
        and min_length 10 counted over the whole sequence (prompt included), BLIP's beam scoring."""
        settings = self.generation["blip_generate"]
        prompt = len(list(prompt_ids) if prompt_ids is not None else self.prompt_ids())
        return {"beams": settings["num_beams"], "max_tokens": settings["max_length"] - prompt,
                "min_tokens": max(0, settings["min_length"] - prompt),
                "repetition_penalty": settings["repetition_penalty"], "beam_scoring": "blip"}

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
