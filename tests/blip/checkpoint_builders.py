"""Build BLIP checkpoints on disk the way their authors ship them, from transformers models.

The Salesforce layout is written by the inverse of the key map in BLIP.md, spelt out here on its own
(not borrowed from the loader) so that a wrong map in the loader cannot agree with itself.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

# transformers BlipVisionModel name -> Salesforce ViT name (BLIP.md, read right to left).
VISION_TO_SALESFORCE = [
    (r"^embeddings\.class_embedding$", "cls_token"),
    (r"^embeddings\.position_embedding$", "pos_embed"),
    (r"^embeddings\.patch_embedding\.(weight|bias)$", r"patch_embed.proj.\1"),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)$", r"blocks.\1.norm1.\2"),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)$", r"blocks.\1.norm2.\2"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.projection\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
    (r"^encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$", r"blocks.\1.mlp.\2.\3"),
    (r"^post_layernorm\.(weight|bias)$", r"norm.\1"),
]
QUEUE_SIZE = 8


def salesforce_name(hf_name: str) -> str:
    """The Salesforce name of one transformers BLIP weight."""
    if not hf_name.startswith("vision_model."):
        return hf_name  # text_encoder, text_decoder, vision_proj, text_proj, itm_head keep theirs
    rest = hf_name.removeprefix("vision_model.")
    for pattern, replacement in VISION_TO_SALESFORCE:
        if re.match(pattern, rest):
            return "visual_encoder." + re.sub(pattern, replacement, rest)
    raise AssertionError(f"no Salesforce name for {hf_name}")


def salesforce_state_dict(
    captioning: BlipForConditionalGeneration | None = None,
    retrieval: BlipForImageTextRetrieval | None = None,
    *,
    training_state: bool = True,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A Salesforce-layout state dict holding the given parts, and the names of its training state.

    Both parts make a pretrain file (vision from `captioning`), one part a captioning or retrieval
    file. With `training_state`, retrieval-side files get momentum copies, ITC queues and `temp` as
    the original BLIP_Pretrain / BLIP_Retrieval save them, and every text model a `position_ids`
    buffer as older transformers saved it. Momentum copies are offset by 1 so using one shows.
    """
    state: dict[str, torch.Tensor] = {}
    for model in (retrieval, captioning):  # captioning last: its vision weights win for pretrain
        if model is not None:
            state.update({salesforce_name(k): v.detach().clone() for k, v in model.state_dict().items()})
    training: dict[str, torch.Tensor] = {}
    if training_state:
        if retrieval is not None:
            for module in ("visual_encoder", "text_encoder", "vision_proj", "text_proj"):
                for key, tensor in state.items():
                    if key.startswith(module + "."):
                        training[f"{module}_m." + key.removeprefix(module + ".")] = tensor + 1.0
            embed = retrieval.config.image_text_hidden_size
            training["image_queue"] = torch.nn.functional.normalize(torch.randn(embed, QUEUE_SIZE), dim=0)
            training["text_queue"] = torch.nn.functional.normalize(torch.randn(embed, QUEUE_SIZE), dim=0)
            training["ptr_queue"] = torch.zeros(1, dtype=torch.long)
            training["temp"] = torch.tensor(0.07)
            if captioning is None:  # retrieval fine-tuning keeps image ids for its contrastive targets
                training["idx_queue"] = torch.full((1, QUEUE_SIZE), -100, dtype=torch.long)
            positions = retrieval.config.text_config.max_position_embeddings
            training["text_encoder.embeddings.position_ids"] = torch.arange(positions).expand(1, -1).clone()
        if captioning is not None:
            positions = captioning.config.text_config.max_position_embeddings
            training["text_decoder.bert.embeddings.position_ids"] = torch.arange(positions).expand(1, -1).clone()
    state.update(training)
    return state, sorted(training)


def save_pth(state: dict[str, torch.Tensor], path: Path, *, wrapped: bool = True) -> Path:
    """`torch.save({"model": state})` as Salesforce does, or the bare state dict."""
    torch.save({"model": state} if wrapped else state, path)
    return path


def save_salesforce_safetensors(state: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, str(path))
    return path


def save_hf_dir(model: torch.nn.Module, path: Path, *, tokenizer: bool = False) -> Path:
    """`save_pretrained`, optionally with a bert-style vocab.txt beside it."""
    model.save_pretrained(path)
    if tokenizer:
        vocab = [f"[unused{i}]" for i in range(model.config.text_config.vocab_size)]
        (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return path
