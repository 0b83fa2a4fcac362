"""The BLIP source model as the loaders hand it to the exporter: plain data, no export logic."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipForQuestionAnswering


@dataclass(frozen=True)
class CheckpointFile:
    """One file the source was read from, and which parts ("captioning", "retrieval") it supplied."""

    path: Path
    format: str  # "hf-dir", "salesforce-pth" or "safetensors"
    sha256: str  # of the file; for a Hugging Face directory, of its weights file
    parts: tuple[str, ...]  # "captioning", "retrieval", "vqa"


@dataclass
class BlipSource:
    """A loaded BLIP checkpoint.

    `captioning` holds the vision tower and the text decoder, `retrieval` the vision tower, the text
    encoder, the projections and the ITM head. When both are present they share one vision model
    object. A part the checkpoint did not contain is None, and `absent` says why. `vqa` holds a
    question-answering model (vision tower, question encoder, answer decoder); in this version it
    comes alone, without a captioning or retrieval part.

    `path`, `format` and `sha256` describe the first file given; `files` lists every file.
    """

    path: Path | None
    format: str  # "hf-dir", "salesforce-pth", "safetensors" or "random"
    sha256: str | None
    image_size: int
    captioning: BlipForConditionalGeneration | None
    retrieval: BlipForImageTextRetrieval | None
    absent: dict[str, str] = field(default_factory=dict)  # module name -> why it is not exported
    dropped_keys: list[str] = field(default_factory=list)  # training state left out (momentum, queues)
    tokenizer_dir: Path | None = None  # directory with tokenizer files, when the source has one
    tokens: dict[str, int] = field(default_factory=dict)  # "DEC", "ENC", "SEP", "PAD", "CLS" -> id
    # False when captioning and retrieval came with different vision weights: two vision encoders.
    shared_vision: bool = True
    files: list[CheckpointFile] = field(default_factory=list)
    vqa: BlipForQuestionAnswering | None = None

    @property
    def model(self):
        """Any one of the loaded models: they share one config (image size, tokens, text shape)."""
        return self.captioning or self.retrieval or self.vqa
