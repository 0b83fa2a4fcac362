"""BLIP's graphs as the runtime sees them: names, inputs and outputs, axes, prompt and preprocessing.

Plain data and no torch: the wrappers, the recipes, calibration, the fixture and the torch-free
runtime all read these, so a graph's name or a tensor's name is written once, here.
"""

from __future__ import annotations

VISION_ENCODER = "vision_encoder"
RETRIEVAL_VISION_ENCODER = "retrieval_vision_encoder"  # only when retrieval's vision weights differ
TEXT_ENCODER = "text_encoder"
TEXT_DECODER = "text_decoder"
TEXT_DECODER_WITH_PAST = "text_decoder_with_past"
# Visual question answering (BLIP_VQA): the question read against the image, then the answer decoder.
QUESTION_ENCODER = "question_encoder"
ANSWER_DECODER = "answer_decoder"
ANSWER_DECODER_WITH_PAST = "answer_decoder_with_past"
GRAPHS = (VISION_ENCODER, RETRIEVAL_VISION_ENCODER, TEXT_ENCODER, TEXT_DECODER, TEXT_DECODER_WITH_PAST,
          QUESTION_ENCODER, ANSWER_DECODER, ANSWER_DECODER_WITH_PAST)

# Original BLIP preprocessing (shared/BLIP.md): RGB, bicubic resize to S x S, no crop, 1/255, then
# CLIP's statistics.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE = "bicubic"


def preprocessing(image_size: int) -> dict[str, object]:
    """The manifest's `preprocessing`, which `plugins.blip.runtime.preprocess.Preprocessor` carries out."""
    return {"image_size": image_size, "resize": RESIZE, "crop": None, "rescale": 1 / 255, "mean": list(IMAGE_MEAN),
            "std": list(IMAGE_STD), "channel_order": "RGB", "layout": "NCHW"}


# Captioning prompt; "a picture of" in bert-base-uncased after [DEC].
PROMPT = "a picture of "
BERT_PROMPT_IDS = (1037, 3861, 1997)
BERT_VOCAB_SIZE = 30524  # bert-base-uncased's 30522 plus [DEC] and [ENC]
SPECIAL_TOKENS = ("DEC", "ENC", "SEP", "PAD", "CLS")
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# Tensor names. The decoder's cache tensors are named per layer (see the functions below).
PIXEL_VALUES = "pixel_values"
IMAGE_EMBEDS = "image_embeds"
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
LOGITS = "logits"
ITM_PROBABILITY, TEXT_FEATURES, IMAGE_FEATURES = "itm_probability", "text_features", "image_features"
QUESTION_STATES, QUESTION_MASK = "question_states", "question_mask"

VISION_INPUTS = (PIXEL_VALUES,)
VISION_OUTPUTS = (IMAGE_EMBEDS,)
TEXT_ENCODER_INPUTS = (INPUT_IDS, ATTENTION_MASK, IMAGE_EMBEDS)
TEXT_ENCODER_OUTPUTS = (ITM_PROBABILITY, TEXT_FEATURES, IMAGE_FEATURES)
DECODER_FIRST_INPUTS = (INPUT_IDS, IMAGE_EMBEDS)
QUESTION_ENCODER_INPUTS = (INPUT_IDS, ATTENTION_MASK, IMAGE_EMBEDS)
QUESTION_ENCODER_OUTPUTS = (QUESTION_STATES,)
ANSWER_FIRST_INPUTS = (INPUT_IDS, QUESTION_STATES, QUESTION_MASK)

# BLIP_VQA (original `models/blip_vqa.py`): questions tokenized to at most 35 tokens, [ENC] first;
# generate mode: 3 beams, max_length 10 and min_length 1 counting the [DEC] that starts the answer;
# rank mode (the VQAv2 evaluation): the k_test best first tokens, then the whole answers scored by
# the decoder's loss with BertLMHeadModel's label smoothing of 0.1.
QUESTION_MAX_TOKENS = 35
VQA_GENERATE = {"num_beams": 3, "max_length": 10, "min_length": 1}
VQA_RANK_K = 128
VQA_LABEL_SMOOTHING = 0.1


def past_names(num_layers: int) -> list[str]:
    """Self-attention cache inputs of the decoder with past: past.{i}.self_key, past.{i}.self_value."""
    return [f"past.{i}.self_{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    """Self-attention cache outputs of both decoder graphs, in the same order as the past inputs."""
    return [f"present.{i}.self_{kv}" for i in range(num_layers) for kv in ("key", "value")]


def cross_names(num_layers: int) -> list[str]:
    """Cross-attention keys/values of the image: outputs of the first step, inputs of later steps."""
    return [f"cross.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def decoder_first_outputs(num_layers: int) -> list[str]:
    return [LOGITS, *present_names(num_layers), *cross_names(num_layers)]


def decoder_past_inputs(num_layers: int) -> list[str]:
    return [INPUT_IDS, *past_names(num_layers), *cross_names(num_layers)]


def decoder_past_outputs(num_layers: int) -> list[str]:
    return [LOGITS, *present_names(num_layers)]


def answer_past_inputs(num_layers: int) -> list[str]:
    return [*decoder_past_inputs(num_layers), QUESTION_MASK]


def vision_axes() -> dict[str, dict[int, str]]:
    """The image size is static: transformers adds the position table without interpolation, so another
    size is a checkpoint matter (interpolate `pos_embed` when loading), not a graph one."""
    return {PIXEL_VALUES: {0: "batch"}, IMAGE_EMBEDS: {0: "batch"}}


def text_encoder_axes() -> dict[str, dict[int, str]]:
    return {
        INPUT_IDS: {0: "batch", 1: "text"},
        ATTENTION_MASK: {0: "batch", 1: "text"},
        IMAGE_EMBEDS: {0: "batch", 1: "image_tokens"},
        ITM_PROBABILITY: {0: "batch"},
        TEXT_FEATURES: {0: "batch"},
        IMAGE_FEATURES: {0: "batch"},
    }


def decoder_first_axes(num_layers: int) -> dict[str, dict[int, str]]:
    axes = {INPUT_IDS: {0: "batch", 1: "text"}, IMAGE_EMBEDS: {0: "batch", 1: "image_tokens"},
            LOGITS: {0: "batch", 1: "text"}}
    axes.update({name: {0: "batch", 2: "text"} for name in present_names(num_layers)})
    axes.update({name: {0: "batch", 2: "image_tokens"} for name in cross_names(num_layers)})
    return axes


def decoder_past_axes(num_layers: int) -> dict[str, dict[int, str]]:
    axes = {INPUT_IDS: {0: "batch", 1: "new"}, LOGITS: {0: "batch", 1: "new"}}
    axes.update({name: {0: "batch", 2: "past"} for name in past_names(num_layers)})
    axes.update({name: {0: "batch", 2: "image_tokens"} for name in cross_names(num_layers)})
    axes.update({name: {0: "batch", 2: "past + new"} for name in present_names(num_layers)})
    return axes


def image_token_count(image_size: int, patch_size: int) -> int:
    """Tokens the vision encoder emits: [CLS] plus one per patch."""
    return 1 + (image_size // patch_size) ** 2


def question_encoder_axes() -> dict[str, dict[int, str]]:
    return {INPUT_IDS: {0: "batch", 1: "question"}, ATTENTION_MASK: {0: "batch", 1: "question"},
            IMAGE_EMBEDS: {0: "batch", 1: "image_tokens"}, QUESTION_STATES: {0: "batch", 1: "question"}}


def answer_first_axes(num_layers: int) -> dict[str, dict[int, str]]:
    """As the captioning decoder's, with the question in place of the image tokens."""
    axes = {INPUT_IDS: {0: "batch", 1: "text"}, QUESTION_STATES: {0: "batch", 1: "question"},
            QUESTION_MASK: {0: "batch", 1: "question"}, LOGITS: {0: "batch", 1: "text"}}
    axes.update({name: {0: "batch", 2: "text"} for name in present_names(num_layers)})
    axes.update({name: {0: "batch", 2: "question"} for name in cross_names(num_layers)})
    return axes


def answer_past_axes(num_layers: int) -> dict[str, dict[int, str]]:
    axes = decoder_past_axes(num_layers)
    axes.update({name: {0: "batch", 2: "question"} for name in cross_names(num_layers)})
    axes[QUESTION_MASK] = {0: "batch", 1: "question"}
    return axes
