"""Greedy and beam-search captioning over the two exported decoder graphs, with the KV cache.

`text_decoder` runs once on the prompt and returns the self-attention cache (`present.*`) and the
image's cross-attention keys and values (`cross.*`); `text_decoder_with_past` then takes one token
per row per step, with the cache fed back as `past.*` and the same `cross.*` every step.

The search reproduces transformers' `generate` (5.x) token for token, as `BlipForConditionalGeneration
.generate` calls it (eos = `[SEP]`, pad = `[PAD]`, no sampling):
- greedy: logits processors on the raw logits, argmax (first index on ties); a finished row gets
  `[PAD]` and keeps running with the batch; decoding stops when every row has finished.
- beam search: log-softmax, then the processors on the log-probabilities, plus the beam's running
  score; the best 2 x beams of beams x vocab candidates (beam 0 alone at the first step); a
  candidate ending in eos (or reaching the length limit) among the first `beams` of them is a
  finished hypothesis scored sum / generated_length ** length_penalty (eos counted), kept if among
  the best `beams` finished ones; the best `beams` unfinished candidates run on, the cache rows
  reordered to follow them. With `early_stopping=False` (generate's default) a batch item stops
  taking hypotheses once all `beams` slots hold one and its best running score, divided by the
  current generated length, cannot beat the worst of them; the search ends when no item can
  improve or when every candidate reached the length limit.
- processors, in generate's order: repetition penalty (every token of the sequence so far, prompt
  included: a score < 0 times the penalty, else divided by it), then `min_tokens` (eos is -inf
  while fewer than `min_tokens` tokens were generated, like `min_new_tokens`).
- `max_tokens` counts generated tokens after the prompt, eos included (generate's `max_new_tokens`).
Scores are float32 and combined in generate's order (including its -1e9 offsets), so near-ties
fall the same way as long as onnxruntime's logits agree with PyTorch's.

`beam_scoring="blip"` is the beam search of the original BLIP code, which ran on transformers 4.15
(`generation_beam_search.BeamSearchScorer` with `BeamHypotheses`): the same 2 x beams candidates,
but a finished hypothesis is the sequence before its eos, scored sum / (prompt + generated tokens)
** length_penalty in float64, kept among the best `beams` (ties: the earlier one leaves first, the
later one wins), and an image is done once it holds `beams` hypotheses and the best candidate
score of the step over the whole current length cannot beat the worst of them. Where hypotheses
of different lengths compete, the two conventions can pick different captions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnxruntime as ort

from converter_core.errors import CheckFailed, InputError
from plugins.blip import graphs

NEG = np.float32(-1.0e9)  # generate's "ruled out" score; added, not assigned, so sums stay ordered
# Each beam is a batch row holding the image's cross-attention keys and values (42 MB per row at
# base size): more than this is a memory error waiting to happen, not a better caption.
MAX_BEAMS = 16
BeamScoring = Literal["transformers", "blip"]


class ModelOutputError(CheckFailed):
    """A graph answered with NaN or Inf: its weights are broken (validation would have said which)."""


def require_finite(array: np.ndarray, module: str, output: str) -> np.ndarray:
    if not np.isfinite(array).all():
        raise ModelOutputError(f"{module} gave NaN or Inf in {output}: the model is broken; convert it again "
                               "with validation on to find the weight")
    return array


@dataclass(frozen=True)
class DecodingOptions:
    beams: int = 1
    max_tokens: int = 20
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0  # beam search only, as generate's
    beam_scoring: BeamScoring = "transformers"

    def check(self) -> None:
        """InputError for settings no search can honour (a NaN penalty, 100000 beams)."""
        numbers = (self.repetition_penalty, self.length_penalty)
        if any(isinstance(v, bool) or not isinstance(v, int) for v in (self.beams, self.max_tokens, self.min_tokens)):
            raise InputError("beams, max_tokens and min_tokens must be integers")
        if not 1 <= self.beams <= MAX_BEAMS:
            raise InputError(f"beams must be between 1 and {MAX_BEAMS}, got {self.beams}")
        if self.max_tokens < 1 or self.min_tokens < 0:
            raise InputError(f"max_tokens must be >= 1 and min_tokens >= 0, got {self.max_tokens} and {self.min_tokens}")
        if not all(np.isfinite(v) for v in numbers) or self.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty must be a finite number > 0 and length_penalty finite, got {numbers}")
        if self.beam_scoring not in ("transformers", "blip"):
            raise InputError(f"beam_scoring must be 'transformers' or 'blip', got {self.beam_scoring!r}")


@dataclass
class Decoded:
    """The tokens written after the prompt (ending with eos when the caption finished) and their score:
    the sum of their log-probabilities (after the processors) / length ** length_penalty."""

    token_ids: list[int]
    score: float


@dataclass
class Cache:
    """Per row: the self-attention keys/values of every layer, and the image's cross-attention ones."""

    self_kv: list[np.ndarray]
    cross: list[np.ndarray]

    def take(self, rows: np.ndarray) -> Cache:
        return Cache([kv[rows] for kv in self.self_kv], [kv[rows] for kv in self.cross])


class CachedDecoder:
    """The two decoder graphs as `start(prompt, image_embeds)` and `advance(tokens, cache)`.

    Cache tensors are matched by name: `present.{i}.self_key` comes back as `past.{i}.self_key`.
    """

    def __init__(self, first_step: ort.InferenceSession, with_past: ort.InferenceSession, num_layers: int):
        self.first_step, self.with_past = first_step, with_past
        self.present, self.past = graphs.present_names(num_layers), graphs.past_names(num_layers)
        self.cross = graphs.cross_names(num_layers)
        self._first_outputs = graphs.decoder_first_outputs(num_layers)
        self._past_outputs = graphs.decoder_past_outputs(num_layers)
        found = {
            "first step outputs": ([o.name for o in first_step.get_outputs()], self._first_outputs),
            "with-past inputs": ([i.name for i in with_past.get_inputs()], graphs.decoder_past_inputs(num_layers)),
            "with-past outputs": ([o.name for o in with_past.get_outputs()], self._past_outputs),
        }
        for what, (got, expected) in found.items():
            if got != expected:
                raise InputError(f"the decoder graphs do not fit a {num_layers}-layer BLIP decoder: {what} are "
                                 f"{got[:6]}{'...' if len(got) > 6 else ''}, expected {expected[:6]}...")

    def start(self, input_ids: np.ndarray, image_embeds: np.ndarray) -> tuple[np.ndarray, Cache]:
        """Logits of the last prompt position [batch, vocab] and the cache after the prompt."""
        outputs = dict(zip(self._first_outputs, self.first_step.run(
            self._first_outputs, {graphs.INPUT_IDS: input_ids.astype(np.int64), graphs.IMAGE_EMBEDS: image_embeds})))
        cache = Cache([outputs[n] for n in self.present], [outputs[n] for n in self.cross])
        return require_finite(outputs[graphs.LOGITS][:, -1], graphs.TEXT_DECODER, graphs.LOGITS), cache

    def advance(self, tokens: np.ndarray, cache: Cache) -> tuple[np.ndarray, Cache]:
        """Feed one token per row [batch]; logits of it [batch, vocab] and the grown cache."""
        feeds = {graphs.INPUT_IDS: tokens.astype(np.int64).reshape(-1, 1)}
        feeds.update(zip(self.past, cache.self_kv))
        feeds.update(zip(self.cross, cache.cross))
        outputs = dict(zip(self._past_outputs, self.with_past.run(self._past_outputs, feeds)))
        logits = require_finite(outputs[graphs.LOGITS][:, -1], graphs.TEXT_DECODER_WITH_PAST, graphs.LOGITS)
        return logits, Cache([outputs[n] for n in self.present], cache.cross)


def decode(decoder: CachedDecoder, image_embeds: np.ndarray, prompt_ids: Sequence[int], options: DecodingOptions,
           eos_id: int, pad_id: int) -> list[Decoded]:
    """One caption per row of `image_embeds`, all after the same prompt (starting with `[DEC]`)."""
    options.check()
    prompt = np.asarray(prompt_ids, dtype=np.int64)
    if options.beams == 1:
        return _greedy(decoder, image_embeds, prompt, options, eos_id, pad_id)
    if options.beam_scoring == "blip":
        return _beam_search_blip(decoder, image_embeds, prompt, options, eos_id, pad_id)
    return _beam_search(decoder, image_embeds, prompt, options, eos_id)


def _process(scores: np.ndarray, sequences: np.ndarray, generated: int, options: DecodingOptions,
             eos_id: int) -> np.ndarray:
    """generate's logits processors: repetition penalty, then the minimum length. float32 in and out."""
    scores = scores.astype(np.float32, copy=True)
    if options.repetition_penalty != 1.0:
        rows, vocab = scores.shape
        seen = np.zeros((rows, vocab + 1), dtype=bool)  # one spare column for ids the head cannot emit
        seen[np.arange(rows)[:, None], np.minimum(sequences, vocab)] = True
        seen = seen[:, :vocab]
        penalty = options.repetition_penalty
        penalised = np.where(scores < 0, scores * np.float32(penalty), scores / np.float32(penalty))
        scores = np.where(seen, penalised, scores)
    if generated < options.min_tokens:
        scores[:, eos_id] = -np.inf
    return scores


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest per row, largest first; equal scores in index order."""
    return np.argsort(-scores, axis=-1, kind="stable")[..., :k]


def _until_eos(tokens: np.ndarray, eos_id: int) -> list[int]:
    ends = np.flatnonzero(tokens == eos_id)
    return tokens[: ends[0] + 1].tolist() if ends.size else tokens.tolist()


def _greedy(decoder: CachedDecoder, image_embeds: np.ndarray, prompt: np.ndarray, options: DecodingOptions,
            eos_id: int, pad_id: int) -> list[Decoded]:
    batch = image_embeds.shape[0]
    sequences = np.tile(prompt, (batch, 1))
    logits, cache = decoder.start(sequences, image_embeds)
    unfinished = np.ones(batch, dtype=bool)
    log_probs = np.zeros(batch, dtype=np.float64)
    generated = 0
    while True:
        scores = _process(logits, sequences, generated, options, eos_id)
        tokens = np.where(unfinished, scores.argmax(axis=-1), pad_id)
        chosen = _log_softmax(scores)[np.arange(batch), tokens]
        log_probs += np.where(unfinished, chosen, 0.0)
        sequences = np.concatenate([sequences, tokens[:, None]], axis=1)
        generated += 1
        unfinished &= tokens != eos_id
        if generated >= options.max_tokens or not unfinished.any():
            break
        logits, cache = decoder.advance(tokens, cache)
    results = []
    for row in range(batch):
        token_ids = _until_eos(sequences[row, len(prompt):], eos_id)
        results.append(Decoded(token_ids, float(log_probs[row] / len(token_ids) ** options.length_penalty)))
    return results


def _beam_search(decoder: CachedDecoder, image_embeds: np.ndarray, prompt: np.ndarray, options: DecodingOptions,
                 eos_id: int) -> list[Decoded]:
    batch, beams = image_embeds.shape[0], options.beams
    prompt_len, max_len = len(prompt), len(prompt) + options.max_tokens
    candidates = 2 * beams  # generate keeps (1 + number of eos ids) x beams, at least 2 x beams
    first_beams = np.arange(candidates) < beams
    batch_offset = (np.arange(batch) * beams)[:, None]

    # The prompt is the same in every beam: run it once per image, then give each beam a copy.
    logits, cache = decoder.start(np.tile(prompt, (batch, 1)), image_embeds)
    logits, cache = np.repeat(logits, beams, axis=0), cache.take(np.repeat(np.arange(batch), beams))

    running = np.zeros((batch, beams, max_len), dtype=np.int64)
    running[:, :, :prompt_len] = prompt
    running_scores = np.zeros((batch, beams), dtype=np.float32)
    running_scores[:, 1:] = NEG  # only beam 0 may expand at the first step: the beams are identical
    finished_seqs = running.copy()
    finished_lens = np.zeros((batch, beams), dtype=np.int64)
    finished_scores = np.full((batch, beams), NEG, dtype=np.float32)
    is_finished = np.zeros((batch, beams), dtype=bool)
    can_improve = np.ones((batch, 1), dtype=bool)
    cur_len = prompt_len
    while True:
        generated = cur_len - prompt_len
        flat = running[:, :, :cur_len].reshape(batch * beams, cur_len)
        log_probs = _process(_log_softmax(logits.astype(np.float32)), flat, generated, options, eos_id)
        vocab = log_probs.shape[-1]
        totals = (log_probs.reshape(batch, beams, vocab) + running_scores[:, :, None]).reshape(batch, -1)

        # The best 2 x beams continuations over every beam of each image.
        top = _top(totals, candidates)
        top_scores = np.take_along_axis(totals, top, axis=1)
        top_beam, top_token = top // vocab, top % vocab
        top_seqs = np.take_along_axis(running, top_beam[:, :, None], axis=1)
        top_seqs[:, :, cur_len] = top_token
        hits_stop = (top_token == eos_id) | (cur_len + 1 >= max_len)

        # The best `beams` continuations that go on.
        open_scores = top_scores + hits_stop.astype(np.float32) * NEG
        keep = _top(open_scores, beams)
        running = np.take_along_axis(top_seqs, keep[:, :, None], axis=1)
        running_scores = np.take_along_axis(open_scores, keep, axis=1)
        source_rows = (np.take_along_axis(top_beam, keep, axis=1) + batch_offset).reshape(-1)

        # Finished hypotheses: only among the first `beams` candidates, scored per generated token.
        just_finished = hits_stop & first_beams[None, :]
        done_scores = top_scores / np.float32((generated + 1) ** options.length_penalty)
        done_scores = done_scores + (~can_improve).astype(np.float32) * NEG
        done_scores = done_scores + (~just_finished).astype(np.float32) * NEG
        merged_scores = np.concatenate([finished_scores, done_scores], axis=1)
        best = _top(merged_scores, beams)
        finished_scores = np.take_along_axis(merged_scores, best, axis=1)
        finished_seqs = np.take_along_axis(np.concatenate([finished_seqs, top_seqs], axis=1), best[:, :, None], axis=1)
        finished_lens = np.take_along_axis(
            np.concatenate([finished_lens, np.full((batch, candidates), generated + 1)], axis=1), best, axis=1)
        is_finished = np.take_along_axis(np.concatenate([is_finished, just_finished], axis=1), best, axis=1)

        cur_len += 1
        # Can a running beam still beat the worst kept hypothesis? (generate's early_stopping=False heuristic)
        best_possible = running_scores[:, :1] / np.float32((cur_len - prompt_len) ** options.length_penalty)
        worst_kept = np.where(is_finished, finished_scores.min(axis=1, keepdims=True), NEG)
        can_improve &= np.any(best_possible > worst_kept, axis=-1, keepdims=True)
        if not can_improve.any() or hits_stop.all():
            break
        logits, cache = decoder.advance(running[:, :, cur_len - 1].reshape(-1), cache.take(source_rows))

    return [
        Decoded(finished_seqs[b, 0, prompt_len : prompt_len + finished_lens[b, 0]].tolist(), float(finished_scores[b, 0]))
        for b in range(batch)
    ]


@dataclass
class _Hypotheses:
    """transformers 4.15's BeamHypotheses: the best `beams` finished sequences of one image."""

    beams: int
    length_penalty: float
    found: list[tuple[float, list[int]]]
    worst: float = 1e9

    def add(self, sequence: list[int], sum_logprobs: float) -> None:
        score = sum_logprobs / len(sequence) ** self.length_penalty
        if len(self.found) < self.beams or score > self.worst:
            self.found.append((score, sequence))
            if len(self.found) > self.beams:
                ranked = sorted((s, index) for index, (s, _) in enumerate(self.found))
                del self.found[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def done(self, best_sum_logprobs: float, cur_len: int) -> bool:
        if len(self.found) < self.beams:
            return False
        return self.worst >= best_sum_logprobs / cur_len**self.length_penalty

    def best(self) -> tuple[float, list[int]]:
        return sorted(self.found, key=lambda item: item[0])[-1]


def _beam_search_blip(decoder: CachedDecoder, image_embeds: np.ndarray, prompt: np.ndarray,
                      options: DecodingOptions, eos_id: int, pad_id: int) -> list[Decoded]:
    """The original BLIP's beam search (transformers 4.15's `beam_search` + `BeamSearchScorer`)."""
    batch, beams = image_embeds.shape[0], options.beams
    prompt_len, max_len = len(prompt), len(prompt) + options.max_tokens
    logits, cache = decoder.start(np.tile(prompt, (batch, 1)), image_embeds)
    logits, cache = np.repeat(logits, beams, axis=0), cache.take(np.repeat(np.arange(batch), beams))
    sequences = np.tile(prompt, (batch * beams, 1))
    beam_scores = np.zeros((batch, beams), dtype=np.float32)
    beam_scores[:, 1:] = NEG
    beam_scores = beam_scores.reshape(-1)
    hypotheses = [_Hypotheses(beams, options.length_penalty, []) for _ in range(batch)]
    done = [False] * batch
    while True:
        cur_len = sequences.shape[1]
        scores = _process(_log_softmax(logits.astype(np.float32)), sequences, cur_len - prompt_len, options, eos_id)
        vocab = scores.shape[-1]
        totals = (scores + beam_scores[:, None]).reshape(batch, beams * vocab)
        top = _top(totals, 2 * beams)
        top_scores = np.take_along_axis(totals, top, axis=1)
        next_scores = np.zeros((batch, beams), dtype=np.float32)
        next_tokens = np.full((batch, beams), pad_id, dtype=np.int64)
        next_rows = np.repeat(np.arange(batch)[:, None] * beams, beams, axis=1)
        for b in range(batch):
            if done[b]:
                continue
            kept = 0
            for rank, (flat, score) in enumerate(zip(top[b], top_scores[b])):
                row, token = b * beams + int(flat) // vocab, int(flat) % vocab
                if token == eos_id:
                    if rank < beams:  # an eos below the best `beams` candidates does not count
                        hypotheses[b].add(sequences[row].tolist(), float(score))
                else:
                    next_scores[b, kept], next_tokens[b, kept], next_rows[b, kept] = score, token, row
                    kept += 1
                if kept == beams:
                    break
            done[b] = hypotheses[b].done(float(top_scores[b].max()), cur_len)
        beam_scores, rows = next_scores.reshape(-1), next_rows.reshape(-1)
        sequences = np.concatenate([sequences[rows], next_tokens.reshape(-1, 1)], axis=1)
        if all(done) or sequences.shape[1] >= max_len:
            break
        logits, cache = decoder.advance(next_tokens.reshape(-1), cache.take(rows))
    results = []
    for b in range(batch):
        if not done[b]:  # the running beams compete with the finished ones, as they stand
            for row in range(b * beams, (b + 1) * beams):
                hypotheses[b].add(sequences[row].tolist(), float(beam_scores[row]))
        score, sequence = hypotheses[b].best()
        tokens = sequence[prompt_len:] + ([eos_id] if len(sequence) < max_len else [])
        results.append(Decoded(tokens, float(score)))
    return results
