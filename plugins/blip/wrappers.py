"""BLIP's inference paths frozen into exportable modules with plain tensor inputs and outputs.

Each wrapper borrows the weights (the very submodules) of a transformers BLIP model and computes one
graph: the vision encoder, the retrieval text encoder (ITM probability and ITC features), and the
captioning decoder split into a first step and a step with a KV cache. Their input and output names
and axes live in `plugins.blip.graphs` (the runtime reads them there without torch); which wrapper
makes which graph, with what inputs and cases, is `plugins.blip.recipes`.

Why the text attention is written out here instead of calling transformers' forward: transformers
passes the KV cache around as `Cache` objects and builds masks through `masking_utils`, while these
graphs need every cache tensor as a named input or output and nothing but tensors inside. The math
below is the same as `BlipTextSelfAttention` (scores / sqrt(head_dim), additive mask of
`finfo.min`, softmax, weighted sum); the Linear, LayerNorm, Embedding, feed-forward and LM-head
submodules are transformers' own and are called as they are, so their numerics cannot drift.

Why the decoder is two graphs and not one: a single graph that branches on "is there a past" needs
an ONNX `If`, which TensorRT cannot take. The first step also computes the cross-attention keys and
values from the image once; every later step reads them as inputs (`cross.{i}.key/value`) rather
than recomputing them from the image embeddings.

Decoder batches share one prompt, so no graph takes a text attention mask: there is never padding
inside the decoded text. Rows that finished early keep decoding; the caller ignores their tokens.

Export recipe (torch 2.13, `torch.onnx.export(..., dynamo=True)`, checked with onnxruntime):
- `dynamic_shapes` is a flat tuple, one {axis: torch.export.Dim} per input in input order, with one
  Dim object per axis name (the recipe's axes say which). torch.export binds that tuple to
  `inspect.signature(wrapper.forward)`, which is why DecoderWithPast's forward carries one named
  parameter per input instead of `*caches` (a varargs signature would bind as two arguments).
  Distinct Dims for axes the graph ties together (batch of `input_ids` and `image_embeds`) are
  unified by torch 2.13 with a warning, but the ONNX graph then names axes after whichever came first.
- Example sizes must be >= 2 on every dynamic axis: torch.export specialises axes of size 0 or 1 to
  constants, and the ONNX graph would then refuse other sizes.
- Outputs get no spec; their symbolic sizes follow (the present length comes out as "past + new").
- The vision encoder's image size stays static. A dynamic image size does export, but transformers
  adds `position_embedding[:, :tokens]` without interpolation: a smaller image silently takes the
  wrong position embeddings and a larger one fails in the Add. Another resolution is a checkpoint
  matter (interpolate `pos_embed` when loading), not a graph one.
- Positions past `max_position_embeddings` have no embedding: the caller caps prompt + new tokens.
"""

from __future__ import annotations

import inspect
import math
import types

import torch
from torch import nn
from torch.nn.functional import normalize

from plugins.blip import graphs

# ---------------------------------------------------------------------------------------------
# Wrappers
# ---------------------------------------------------------------------------------------------


class VisionEncoder(nn.Module):
    """`pixel_values` [batch, 3, S, S] -> `image_embeds` [batch, 1 + (S/patch)^2, hidden].

    The last hidden state (post_layernorm applied once), not the pooled output: transformers' pooler
    applies post_layernorm a second time, which the original BLIP never does.
    """

    def __init__(self, vision_model: nn.Module):
        super().__init__()
        self.vision_model = vision_model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values=pixel_values).last_hidden_state


class TextEncoder(nn.Module):
    """Retrieval heads of BlipForImageTextRetrieval, for one text per image.

    Inputs: `input_ids` [batch, text] as the tokenizer gives them (the first token is replaced
    here), `attention_mask` [batch, text] (int64, 0 on padding), `image_embeds` [batch, N, hidden].
    Outputs: `itm_probability` [batch] (match probability, text starting with [ENC] and
    cross-attending to the whole image), `text_features` and `image_features` [batch, proj] (unit
    vectors for the contrastive score: text starting with [CLS], no cross-attention).
    """

    def __init__(self, retrieval_model: nn.Module, enc_token_id: int, cls_token_id: int):
        super().__init__()
        self.text_encoder = retrieval_model.text_encoder
        self.vision_proj = retrieval_model.vision_proj
        self.text_proj = retrieval_model.text_proj
        self.itm_head = retrieval_model.itm_head
        self.enc_token_id = int(enc_token_id)
        self.cls_token_id = int(cls_token_id)
        self.num_heads = self.text_encoder.config.num_attention_heads

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bias = _padding_bias(attention_mask, image_embeds.dtype)
        layers = self.text_encoder.encoder.layer
        embeddings = self.text_encoder.embeddings

        # Image-text matching: [ENC] first, every layer cross-attends to all image tokens.
        hidden = _embed(embeddings, _with_first_token(input_ids, self.enc_token_id), 0)
        for layer in layers:
            cross = _cross_key_value(layer, image_embeds, self.num_heads)
            hidden, _, _ = _text_layer(layer, hidden, bias, self.num_heads, cross=cross)
        itm_probability = torch.softmax(self.itm_head(hidden[:, 0, :]), dim=-1)[:, 1]

        # Contrastive features: [CLS] first, text only (the layers skip cross-attention).
        hidden = _embed(embeddings, _with_first_token(input_ids, self.cls_token_id), 0)
        for layer in layers:
            hidden, _, _ = _text_layer(layer, hidden, bias, self.num_heads)
        text_features = normalize(self.text_proj(hidden[:, 0, :]), dim=-1)
        image_features = normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)
        return itm_probability, text_features, image_features


class DecoderFirstStep(nn.Module):
    """Captioning decoder over the whole prompt; starts the KV cache.

    Inputs: `input_ids` [batch, text] (prompt beginning with the decoder BOS), `image_embeds`
    [batch, N, hidden]. Outputs: `logits` [batch, text, vocab], then `present.{i}.self_key/value`
    [batch, heads, text, head_dim] for every layer, then `cross.{i}.key/value` [batch, heads, N,
    head_dim] for every layer (`graphs.decoder_first_outputs`).
    """

    def __init__(self, captioning_model: nn.Module):
        super().__init__()
        self.text_decoder = captioning_model.text_decoder
        config = self.text_decoder.config
        self.num_heads = config.num_attention_heads
        self.num_layers = config.num_hidden_layers

    def forward(self, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
        bert = self.text_decoder.bert
        hidden = _embed(bert.embeddings, input_ids, 0)
        bias = _causal_bias(input_ids.shape[1], 0, hidden.dtype, hidden.device)
        presents, crosses = [], []
        for layer in bert.encoder.layer:
            cross = _cross_key_value(layer, image_embeds, self.num_heads)
            hidden, key, value = _text_layer(layer, hidden, bias, self.num_heads, cross=cross)
            presents += [key, value]
            crosses += list(cross)
        logits = self.text_decoder.cls(hidden)
        return (logits, *presents, *crosses)


class DecoderWithPast(nn.Module):
    """Captioning decoder for tokens that follow a cached prefix.

    Inputs: `input_ids` [batch, new] (usually new = 1), `past.{i}.self_key/value` [batch, heads,
    past, head_dim] for every layer, then `cross.{i}.key/value` from DecoderFirstStep
    (`graphs.decoder_past_inputs`). Outputs: `logits` [batch, new, vocab] and
    `present.{i}.self_key/value` [batch, heads, past + new, head_dim]. Positions continue at `past`,
    read from the cache's shape; new tokens see the whole past and, causally, each other.
    """

    def __init__(self, captioning_model: nn.Module):
        super().__init__()
        self.text_decoder = captioning_model.text_decoder
        config = self.text_decoder.config
        self.num_heads = config.num_attention_heads
        self.num_layers = config.num_hidden_layers
        self.forward = _with_flat_signature(self, "_step", tuple(graphs.decoder_past_inputs(self.num_layers)))

    def _step(self, input_ids: torch.Tensor, *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = self.num_layers
        if len(caches) != 4 * n:
            raise TypeError(f"DecoderWithPast expects {4 * n} cache tensors after input_ids, got {len(caches)}")
        past, cross = caches[: 2 * n], caches[2 * n :]
        bert = self.text_decoder.bert
        past_length = past[0].shape[2]
        hidden = _embed(bert.embeddings, input_ids, past_length)
        bias = _causal_bias(input_ids.shape[1], past_length, hidden.dtype, hidden.device)
        presents = []
        for i, layer in enumerate(bert.encoder.layer):
            hidden, key, value = _text_layer(
                layer,
                hidden,
                bias,
                self.num_heads,
                past=(past[2 * i], past[2 * i + 1]),
                cross=(cross[2 * i], cross[2 * i + 1]),
            )
            presents += [key, value]
        logits = self.text_decoder.cls(hidden)
        return (logits, *presents)


class QuestionEncoder(nn.Module):
    """BLIP_VQA's question encoder: the question read while cross-attending to the whole image.

    Inputs: `input_ids` [batch, question] as the tokenizer gives them (the first token is replaced
    by [ENC] here, as BLIP_VQA does), `attention_mask` [batch, question] (int64, 0 on padding),
    `image_embeds` [batch, N, vision hidden]. Output: `question_states` [batch, question, text
    hidden], the last hidden state, padded positions included (generate mode attends to them).
    """

    def __init__(self, vqa_model: nn.Module, enc_token_id: int):
        super().__init__()
        self.text_encoder = vqa_model.text_encoder
        self.enc_token_id = int(enc_token_id)
        self.num_heads = self.text_encoder.config.num_attention_heads

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        bias = _padding_bias(attention_mask, image_embeds.dtype)
        hidden = _embed(self.text_encoder.embeddings, _with_first_token(input_ids, self.enc_token_id), 0)
        for layer in self.text_encoder.encoder.layer:
            cross = _cross_key_value(layer, image_embeds, self.num_heads)
            hidden, _, _ = _text_layer(layer, hidden, bias, self.num_heads, cross=cross)
        return hidden


class AnswerDecoderFirstStep(nn.Module):
    """BLIP_VQA's answer decoder over its first tokens ([DEC], or whole answers in rank mode).

    Inputs: `input_ids` [batch, text], `question_states` [batch, question, text hidden],
    `question_mask` [batch, question] (int64: all ones in generate mode, as BLIP_VQA and
    transformers pass it; the question's own mask in rank mode). Outputs as DecoderFirstStep's, the
    cross-attention keys/values over the question: `graphs.decoder_first_outputs`.
    """

    def __init__(self, vqa_model: nn.Module):
        super().__init__()
        self.text_decoder = vqa_model.text_decoder
        config = self.text_decoder.config
        self.num_heads = config.num_attention_heads
        self.num_layers = config.num_hidden_layers

    def forward(self, input_ids: torch.Tensor, question_states: torch.Tensor,
                question_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        bert = self.text_decoder.bert
        hidden = _embed(bert.embeddings, input_ids, 0)
        bias = _causal_bias(input_ids.shape[1], 0, hidden.dtype, hidden.device)
        cross_bias = _padding_bias(question_mask, hidden.dtype)
        presents, crosses = [], []
        for layer in bert.encoder.layer:
            cross = _cross_key_value(layer, question_states, self.num_heads)
            hidden, key, value = _text_layer(layer, hidden, bias, self.num_heads, cross=cross, cross_bias=cross_bias)
            presents += [key, value]
            crosses += list(cross)
        return (self.text_decoder.cls(hidden), *presents, *crosses)


class AnswerDecoderWithPast(nn.Module):
    """The answer decoder for tokens after a cached prefix: DecoderWithPast's inputs plus
    `question_mask` last (`graphs.answer_past_inputs`), the same outputs."""

    def __init__(self, vqa_model: nn.Module):
        super().__init__()
        self.text_decoder = vqa_model.text_decoder
        config = self.text_decoder.config
        self.num_heads = config.num_attention_heads
        self.num_layers = config.num_hidden_layers
        self.forward = _with_flat_signature(self, "_step", tuple(graphs.answer_past_inputs(self.num_layers)))

    def _step(self, input_ids: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = self.num_layers
        if len(rest) != 4 * n + 1:
            raise TypeError(f"AnswerDecoderWithPast expects {4 * n} cache tensors and the question mask, got {len(rest)}")
        past, cross, question_mask = rest[: 2 * n], rest[2 * n : 4 * n], rest[-1]
        bert = self.text_decoder.bert
        past_length = past[0].shape[2]
        hidden = _embed(bert.embeddings, input_ids, past_length)
        bias = _causal_bias(input_ids.shape[1], past_length, hidden.dtype, hidden.device)
        cross_bias = _padding_bias(question_mask, hidden.dtype)
        presents = []
        for i, layer in enumerate(bert.encoder.layer):
            hidden, key, value = _text_layer(layer, hidden, bias, self.num_heads, past=(past[2 * i], past[2 * i + 1]),
                                             cross=(cross[2 * i], cross[2 * i + 1]), cross_bias=cross_bias)
            presents += [key, value]
        return (self.text_decoder.cls(hidden), *presents)


def _with_flat_signature(module: nn.Module, step_name: str, input_names: tuple[str, ...]):
    """A bound `forward` that calls `module.<step_name>(*args)` under one named parameter per input.

    torch.export binds `dynamic_shapes` to `inspect.signature(module.forward)`. A `*caches`
    signature binds as (input_ids, caches) and rejects the flat one-entry-per-input tuple that every
    other wrapper takes; the layer count is only known per model, so the signature is made here. A
    bound method (not a closure over `module`) so that copy.deepcopy rebinds it to the copy.
    """
    parameters = [
        inspect.Parameter(name.replace(".", "_"), inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in input_names
    ]
    signature = inspect.Signature(parameters)

    def forward(self: nn.Module, *args: torch.Tensor, **kwargs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return getattr(self, step_name)(*signature.bind(*args, **kwargs).args)

    self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = signature.replace(parameters=[self_parameter, *parameters])
    return types.MethodType(forward, module)


# ---------------------------------------------------------------------------------------------
# BERT-style text layer math shared by the text encoder and the decoder
# ---------------------------------------------------------------------------------------------


def _with_first_token(input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    # cat rather than an in-place write: the caller's tensor stays untouched and the graph is a
    # plain Concat instead of a ScatterND.
    first = torch.full_like(input_ids[:, :1], token_id)
    return torch.cat([first, input_ids[:, 1:]], dim=1)


def _embed(embeddings: nn.Module, input_ids: torch.Tensor, start: int | torch.SymInt) -> torch.Tensor:
    """BlipTextEmbeddings: word + absolute position (from `start`), LayerNorm (dropout is off)."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device) + start
    hidden = embeddings.word_embeddings(input_ids) + embeddings.position_embeddings(positions)[None]
    return embeddings.LayerNorm(hidden)


def _padding_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[batch, 1, 1, text] additive mask: 0 where attended, finfo.min on padding (as transformers)."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def _causal_bias(
    new: int | torch.SymInt, past: int | torch.SymInt, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """[new, past + new] additive mask: query j (at position past + j) sees keys 0 .. past + j."""
    query_positions = torch.arange(new, device=device)[:, None] + past
    key_positions = torch.arange(past + new, device=device)[None, :]
    return (key_positions > query_positions).to(dtype) * torch.finfo(dtype).min


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[batch, tokens, heads * head_dim] -> [batch, heads, tokens, head_dim]."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """BlipTextSelfAttention's core on [batch, heads, tokens, head_dim]; returns [batch, tokens, hidden]."""
    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(query.shape[-1])
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1)
    context = torch.matmul(probs, value).transpose(1, 2)
    return context.flatten(2)


def _cross_key_value(layer: nn.Module, image_embeds: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    attention = layer.crossattention.self
    return _split_heads(attention.key(image_embeds), num_heads), _split_heads(attention.value(image_embeds), num_heads)


def _text_layer(
    layer: nn.Module,
    hidden: torch.Tensor,
    self_bias: torch.Tensor | None,
    num_heads: int,
    past: tuple[torch.Tensor, torch.Tensor] | None = None,
    cross: tuple[torch.Tensor, torch.Tensor] | None = None,
    cross_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One BlipTextLayer: self-attention (+ past), optional cross-attention, feed-forward.

    Returns the layer output and the self-attention key/value over past + new tokens. The image
    cross-attention has no mask (BLIP always attends to every image token); the VQA answer decoder's
    cross-attention over the question states takes `cross_bias`, the question mask's padding bias.
    """
    attention = layer.attention.self
    query = _split_heads(attention.query(hidden), num_heads)
    key = _split_heads(attention.key(hidden), num_heads)
    value = _split_heads(attention.value(hidden), num_heads)
    if past is not None:
        key = torch.cat([past[0], key], dim=2)
        value = torch.cat([past[1], value], dim=2)
    attended = layer.attention.output(_attend(query, key, value, self_bias), hidden)
    if cross is not None:
        cross_query = _split_heads(layer.crossattention.self.query(attended), num_heads)
        attended = layer.crossattention.output(_attend(cross_query, cross[0], cross[1], cross_bias), attended)
    output = layer.output(layer.intermediate(attended), attended)
    return output, key, value
