"""BLIP's text side: lower-case BERT word pieces read with the `tokenizers` library.

BLIP's tokenizer is bert-base-uncased plus `[DEC]` (decoder BOS) and `[ENC]` (first token of ITM
text). Their ids come from the manifest's `tokens`, so a `vocab.txt` without the two added tokens
still works: they are only ever put in by id, never read from text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import BertWordPieceTokenizer, Tokenizer

from converter_core.errors import InputError


class BlipTokenizer:
    def __init__(self, tokenizer: Tokenizer, tokens: dict[str, int], max_length: int, source: Path):
        self._tokenizer = tokenizer
        self.tokens = dict(tokens)
        self.max_length = max_length
        # Ids that never belong in caption text; the tokenizer's own special tokens are skipped too.
        self._hidden = {tokens[name] for name in ("DEC", "ENC", "SEP", "PAD", "CLS") if name in tokens}
        for name, token in (("CLS", "[CLS]"), ("SEP", "[SEP]"), ("PAD", "[PAD]")):
            found = tokenizer.token_to_id(token)
            if name in tokens and found != tokens[name]:
                raise InputError(f"{source}: the tokenizer's {token} is id {found}, the model's is {tokens[name]}; "
                                 "this tokenizer does not belong to this model")

    @classmethod
    def from_directory(cls, directory: Path, tokens: dict[str, int], max_length: int) -> BlipTokenizer:
        """`tokenizer.json` when present, else `vocab.txt` (lower-cased unless tokenizer_config.json says not)."""
        if (directory / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        elif (directory / "vocab.txt").is_file():
            config_path = directory / "tokenizer_config.json"
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
            tokenizer = BertWordPieceTokenizer(str(directory / "vocab.txt"), lowercase=config.get("do_lower_case", True))
        else:
            raise InputError(f"{directory}: no tokenizer.json or vocab.txt")
        tokenizer.no_padding()
        tokenizer.no_truncation()
        return cls(tokenizer, tokens, max_length, directory)

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """`[CLS] text [SEP]`, cut to the model's longest text or `max_length` if shorter (keeping
        the final `[SEP]`, as BertTokenizer's truncation does)."""
        ids = self._tokenizer.encode(text).ids
        limit = min(self.max_length, max_length) if max_length else self.max_length
        if len(ids) > limit:
            ids = [*ids[: limit - 1], ids[-1]]
        return ids

    def prompt_ids(self, prompt: str) -> list[int]:
        """Decoder input for a captioning prompt: `[DEC]` instead of `[CLS]`, no trailing `[SEP]`."""
        ids = self.encode(prompt)
        if ids and ids[-1] == self.tokens["SEP"]:
            ids = ids[:-1]
        return [self.tokens["DEC"], *ids[1:]]

    def batch(self, texts: Sequence[str], max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`input_ids` and `attention_mask`, int64 [len(texts), longest], padded with `[PAD]` on the right."""
        encoded = [self.encode(text, max_length) for text in texts]
        width = max(len(ids) for ids in encoded)
        input_ids = np.full((len(encoded), width), self.tokens["PAD"], dtype=np.int64)
        attention_mask = np.zeros((len(encoded), width), dtype=np.int64)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        return input_ids, attention_mask

    def decode(self, ids: Sequence[int]) -> str:
        """Text as BLIP prints it: transformers' BERT `decode(skip_special_tokens=True,
        clean_up_tokenization_spaces=True)`, whose clean-up joins "man ' s" into "man's"."""
        vocab = self._tokenizer.get_vocab_size()
        text = self._tokenizer.decode([i for i in ids if i not in self._hidden and 0 <= i < vocab],
                                      skip_special_tokens=True)
        return clean_up_tokenization(text)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()


def clean_up_tokenization(text: str) -> str:
    """transformers' `PreTrainedTokenizerBase.clean_up_tokenization`, in its order."""
    for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                           (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(spaced, joined)
    return text
