"""Visual question answering over the exported graphs: BLIP_VQA's generate and rank modes.

`question_encoder` reads each question against its image's embeddings; the answer decoder
(`answer_decoder`, `answer_decoder_with_past`) cross-attends to those question states.

- generate: the captioning search of `decoding` (greedy or beam, transformers' rules), started from
  `[DEC]` alone, with the cross-attention mask all ones over the question states, padding included:
  so do the original `BLIP_VQA.forward` and transformers' `BlipForQuestionAnswering.generate`.
- rank (BLIP's VQAv2 evaluation, `BLIP_VQA.rank_answer`): the probability of each candidate's first
  token after `[DEC]`, the `k` most probable candidates kept (ties: the earlier candidate), then
  each kept candidate scored by the decoder over the whole answer (`[DEC] answer [SEP]`), under the
  question's own mask. BLIP ranks by minus its training loss, cross-entropy with label smoothing
  0.1 summed over the answer's tokens; `log_likelihood` is the plain sum of log-probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from converter_core.errors import InputError
from plugins.blip import graphs
from plugins.blip.runtime.decoding import Cache, require_finite

RANK_ROWS = 32  # answers scored per decoder run: bounds the logits held at once (rows x length x vocab)


class AnswerDecoder:
    """The two answer decoder graphs with `decoding.CachedDecoder`'s interface.

    The question mask travels as the last entry of the cache's `cross` list, so the search's row
    reordering (`Cache.take`) carries it along with the question's keys and values.
    """

    def __init__(self, first_step: ort.InferenceSession, with_past: ort.InferenceSession, num_layers: int,
                 question_mask: np.ndarray):
        self.first_step, self.with_past = first_step, with_past
        self.present, self.past = graphs.present_names(num_layers), graphs.past_names(num_layers)
        self.cross = graphs.cross_names(num_layers)
        self.question_mask = question_mask.astype(np.int64)
        self._first_outputs = graphs.decoder_first_outputs(num_layers)
        self._past_outputs = graphs.decoder_past_outputs(num_layers)
        found = {
            "first step inputs": ([i.name for i in first_step.get_inputs()], list(graphs.ANSWER_FIRST_INPUTS)),
            "first step outputs": ([o.name for o in first_step.get_outputs()], self._first_outputs),
            "with-past inputs": ([i.name for i in with_past.get_inputs()], graphs.answer_past_inputs(num_layers)),
        }
        for what, (got, expected) in found.items():
            if got != expected:
                raise InputError(f"the answer decoder graphs do not fit a {num_layers}-layer BLIP decoder: {what} are "
                                 f"{got[:6]}{'...' if len(got) > 6 else ''}, expected {expected[:6]}...")

    def logits(self, input_ids: np.ndarray, question_states: np.ndarray, question_mask: np.ndarray) -> np.ndarray:
        """Logits of every position [rows, text, vocab] (teacher forcing, no cache kept)."""
        (logits,) = self.first_step.run([graphs.LOGITS], {
            graphs.INPUT_IDS: input_ids.astype(np.int64), graphs.QUESTION_STATES: question_states,
            graphs.QUESTION_MASK: question_mask.astype(np.int64)})
        return require_finite(logits, graphs.ANSWER_DECODER, graphs.LOGITS)

    def start(self, input_ids: np.ndarray, question_states: np.ndarray) -> tuple[np.ndarray, Cache]:
        outputs = dict(zip(self._first_outputs, self.first_step.run(self._first_outputs, {
            graphs.INPUT_IDS: input_ids.astype(np.int64), graphs.QUESTION_STATES: question_states,
            graphs.QUESTION_MASK: self.question_mask})))
        cache = Cache([outputs[n] for n in self.present], [*(outputs[n] for n in self.cross), self.question_mask])
        return require_finite(outputs[graphs.LOGITS][:, -1], graphs.ANSWER_DECODER, graphs.LOGITS), cache

    def advance(self, tokens: np.ndarray, cache: Cache) -> tuple[np.ndarray, Cache]:
        feeds = {graphs.INPUT_IDS: tokens.astype(np.int64).reshape(-1, 1)}
        feeds.update(zip(self.past, cache.self_kv))
        feeds.update(zip(self.cross, cache.cross[:-1]))
        feeds[graphs.QUESTION_MASK] = cache.cross[-1]
        outputs = dict(zip(self._past_outputs, self.with_past.run(self._past_outputs, feeds)))
        logits = require_finite(outputs[graphs.LOGITS][:, -1], graphs.ANSWER_DECODER_WITH_PAST, graphs.LOGITS)
        return logits, Cache([outputs[n] for n in self.present], cache.cross)


@dataclass
class RankedAnswer:
    """One candidate answer in rank mode. `score`: what BLIP ranks by, minus the decoder's label-smoothed
    cross-entropy summed over the answer's tokens ([SEP] included); `log_likelihood`: the sum of
    the tokens' log-probabilities; `first_token_probability`: the probability of its first token."""

    answer: str
    score: float
    log_likelihood: float
    first_token_probability: float


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def rank(decoder: AnswerDecoder, question_states: np.ndarray, question_mask: np.ndarray, answers: Sequence[str],
         answer_ids: np.ndarray, answer_mask: np.ndarray, k: int, label_smoothing: float) -> list[list[RankedAnswer]]:
    """Per question, its top-k candidates by first-token probability, best score first.

    `answer_ids` [answers, length]: `[DEC] answer [SEP]`, padded with 0 under `answer_mask`.
    """
    questions, candidates = question_states.shape[0], answer_ids.shape[0]
    k = min(k, candidates)
    start = np.full((questions, 1), answer_ids[0, 0], dtype=np.int64)
    first = _log_softmax(decoder.logits(start, question_states, question_mask)[:, 0].astype(np.float64))
    first_probs = np.exp(first)[:, answer_ids[:, 1]]  # [questions, candidates]
    ranked = []
    for q in range(questions):
        top = np.argsort(-first_probs[q], kind="stable")[:k]
        scores, likelihoods = [], []
        for begin in range(0, k, RANK_ROWS):
            rows = top[begin : begin + RANK_ROWS]
            ids, mask = answer_ids[rows], answer_mask[rows]
            logits = decoder.logits(ids, np.repeat(question_states[q : q + 1], len(rows), axis=0),
                                    np.repeat(question_mask[q : q + 1], len(rows), axis=0))
            log_probs = _log_softmax(logits[:, :-1].astype(np.float64))
            targets, valid = ids[:, 1:], mask[:, 1:].astype(bool)
            chosen = np.take_along_axis(log_probs, targets[:, :, None], axis=-1)[:, :, 0]
            # torch's CrossEntropyLoss(label_smoothing=e): (1 - e) * -log p(target) + e * mean over the vocabulary.
            smoothed = (1 - label_smoothing) * chosen + label_smoothing * log_probs.mean(axis=-1)
            scores += list(np.where(valid, smoothed, 0.0).sum(axis=1))
            likelihoods += list(np.where(valid, chosen, 0.0).sum(axis=1))
        order = np.argsort(-np.asarray(scores), kind="stable")
        ranked.append([RankedAnswer(answers[top[i]], float(scores[i]), float(likelihoods[i]),
                                    float(first_probs[q, top[i]])) for i in order])
    return ranked
