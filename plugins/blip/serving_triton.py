"""BLIP's task layer for the `triton` backend: three Python-backend models running `BlipRuntime` in-process.

- `blip_caption`: `image` (encoded image bytes) -> `caption` (text) and `token_ids` (int64, -1 past the
  end). Request parameters `prompt`, `beams`, `max_tokens`, `min_tokens`, `repetition_penalty`
  (default: greedy, 20 tokens or what --max-text-len leaves, the manifest's prompt). The whole
  decoding loop, KV cache included, runs inside the model: no per-step round trips through the
  server. The requests Triton hands over together are captioned as one batch per distinct setting.
- `blip_match`: `image` and `texts` (one row of texts per image) -> `itm_probability` and
  `itc_similarity` per text, all pairs of all requests through the text encoder at once.
- `blip_embed`: `image` -> `image_embedding`, the unit ITC image embedding (`normalize(vision_proj(.))`).

The model file Triton loads is `plugins/blip/triton_model.py` (copied as `model.py`); it only finds
this package and hands requests to `BlipTritonModel`. Models read the conversion output the
repository lives in (`..` of the repository), through the runtime, which checks every file's hash.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from converter_core.errors import InputError
from converter_core.specs import ExportedModule
from plugins.blip import graphs

CAPTION, MATCH, EMBED = "blip_caption", "blip_match", "blip_embed"
MODEL_SOURCE = Path(__file__).with_name("triton_model.py")
CAPTION_PARAMETERS = {"prompt": str, "beams": int, "max_tokens": int, "min_tokens": int, "repetition_penalty": float}
CAPTION_DEFAULTS = {"beams": 1, "min_tokens": 0, "repetition_penalty": 1.0}
DEFAULT_MAX_TOKENS = 20  # where the output's text length allows it: see caption_limit
TOKEN_PAD = -1  # token_ids past the end of a shorter caption of the same request
CHECK_SCENES = 20  # held-out fixture scenes captioned through the server
CONCURRENT_CLIENTS = 16
ITM_ITC_ATOL = 1e-5
STATS_WAIT_S = 10.0


def image_from_bytes(data: bytes) -> Image.Image:
    """Decode encoded image bytes (PNG, JPEG, ...); what Pillow refuses is an InputError."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.copy()
    except Image.DecompressionBombError as exc:
        raise InputError(f"image refused: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"not an image Pillow can read ({exc})") from exc


def caption_settings(parameters: dict[str, Any]) -> dict[str, Any]:
    """A request's parameters as `BlipRuntime.caption` keywords; an unknown or mistyped one is an InputError."""
    settings: dict[str, Any] = dict(CAPTION_DEFAULTS)
    for key, value in parameters.items():
        if key not in CAPTION_PARAMETERS:
            raise InputError(f"unknown request parameter {key!r}; blip_caption takes {', '.join(CAPTION_PARAMETERS)}")
        kind = CAPTION_PARAMETERS[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise InputError(f"request parameter {key}={value!r}: expected {kind.__name__}")
        settings[key] = value
    return settings


def caption_limit(runtime: Any, prompt: str | None = None) -> int:
    """The default max_tokens (20) where the output's text length allows it, else what it allows."""
    return max(1, min(DEFAULT_MAX_TOKENS, runtime.max_text_len - len(runtime.prompt_ids(prompt))))


class BlipTritonModel:
    """The server side of one task model: `execute(requests)` answers each request, or its error."""

    def __init__(self, task: str, out_dir: Path, pb_utils: Any, threads: int | None = None) -> None:
        from plugins.blip.runtime import BlipRuntime

        if task not in (CAPTION, MATCH, EMBED):
            raise ValueError(f"unknown BLIP task model {task!r}")
        self.task = task
        self.pb = pb_utils
        self.runtime = BlipRuntime(out_dir, threads=threads)

    def execute(self, requests: list) -> list:
        handler = {CAPTION: self._caption, MATCH: self._match, EMBED: self._embed}[self.task]
        answers: list[Any] = [None] * len(requests)
        ready = []
        for index, request in enumerate(requests):
            try:
                ready.append((index, self._images(request), request))
            except InputError as exc:
                answers[index] = exc
        if ready:
            try:
                for index, answer in zip((i for i, _, _ in ready), handler([(images, r) for _, images, r in ready])):
                    answers[index] = answer
            except InputError as exc:
                for index, _, _ in ready:
                    answers[index] = exc
        return [self._response(answer) for answer in answers]

    def _response(self, answer: Any) -> Any:
        if isinstance(answer, Exception):
            return self.pb.InferenceResponse(error=self.pb.TritonError(str(answer)))
        return self.pb.InferenceResponse(output_tensors=[self.pb.Tensor(name, value) for name, value in answer.items()])

    def _input(self, request: Any, name: str) -> np.ndarray | None:
        tensor = self.pb.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def _images(self, request: Any) -> list[Image.Image]:
        data = self._input(request, "image")
        return [image_from_bytes(bytes(row[0])) for row in data.reshape(len(data), -1)]

    def _caption(self, batch: list[tuple[list[Image.Image], Any]]) -> list[Any]:
        # One decoding run per distinct setting, every image of those requests in it.
        groups: dict[str, list[int]] = {}
        answers: list[Any] = [None] * len(batch)
        for index, (_, request) in enumerate(batch):
            try:
                settings = caption_settings(json.loads(request.parameters() or "{}"))
                settings.setdefault("max_tokens", caption_limit(self.runtime, settings.get("prompt")))
            except InputError as exc:
                answers[index] = exc
                continue
            groups.setdefault(json.dumps(settings, sort_keys=True), []).append(index)
        for key, indices in groups.items():
            settings = json.loads(key)
            images = [image for i in indices for image in batch[i][0]]
            try:
                captions = self.runtime.caption(images, **settings)
            except InputError as exc:
                for i in indices:
                    answers[i] = exc
                continue
            start = 0
            for i in indices:
                mine = captions[start:start + len(batch[i][0])]
                start += len(mine)
                width = max(len(c.token_ids) for c in mine)
                ids = np.full((len(mine), width), TOKEN_PAD, dtype=np.int64)
                for row, c in enumerate(mine):
                    ids[row, :len(c.token_ids)] = c.token_ids
                texts = np.array([[(c.text or "").encode()] for c in mine], dtype=np.object_)
                answers[i] = {"caption": texts, "token_ids": ids}
        return answers

    def _vision_module(self) -> str:
        return graphs.RETRIEVAL_VISION_ENCODER if self.runtime.has(graphs.RETRIEVAL_VISION_ENCODER) \
            else graphs.VISION_ENCODER

    def _text_encoder(self, image_embeds: np.ndarray, texts: Sequence[str]) -> tuple[np.ndarray, ...]:
        if not self.runtime.has(graphs.TEXT_ENCODER):
            raise InputError(f"{self.runtime.out_dir}: has no text_encoder (ITM/ITC need a retrieval or pretrain "
                             "checkpoint)")
        input_ids, attention_mask = self.runtime.tokenizer.batch(texts)
        return tuple(self.runtime.session(graphs.TEXT_ENCODER).run(
            list(graphs.TEXT_ENCODER_OUTPUTS),
            {graphs.INPUT_IDS: input_ids, graphs.ATTENTION_MASK: attention_mask, graphs.IMAGE_EMBEDS: image_embeds}))

    def _match(self, batch: list[tuple[list[Image.Image], Any]]) -> list[Any]:
        answers: list[Any] = [None] * len(batch)
        valid, texts_per_request = [], []
        for index, (images, request) in enumerate(batch):
            texts = self._input(request, "texts")
            if texts is None or texts.ndim != 2 or texts.shape[0] != len(images) or texts.shape[1] == 0:
                answers[index] = InputError("blip_match takes one row of texts per image")
                continue
            valid.append(index)
            texts_per_request.append([[bytes(t).decode(errors="replace") for t in row] for row in texts])
        if not valid:
            return answers
        images = [image for index in valid for image in batch[index][0]]
        embeds = self.runtime.image_embeds(images, self._vision_module())
        rows = [row for request_texts in texts_per_request for row in request_texts]
        repeat = np.repeat(np.arange(len(rows)), [len(row) for row in rows])
        itm, text_features, image_features = self._text_encoder(embeds[repeat], [text for row in rows for text in row])
        itc = (text_features * image_features).sum(axis=-1)
        start = 0
        for index, request_texts in zip(valid, texts_per_request):
            shape = (len(request_texts), len(request_texts[0]))
            count = shape[0] * shape[1]
            answers[index] = {"itm_probability": itm[start:start + count].reshape(shape).astype(np.float32),
                              "itc_similarity": itc[start:start + count].reshape(shape).astype(np.float32)}
            start += count
        return answers

    def _embed(self, batch: list[tuple[list[Image.Image], Any]]) -> list[Any]:
        images = [image for request_images, _ in batch for image in request_images]
        embeds = self.runtime.image_embeds(images, self._vision_module())
        # image_features depends on the image alone (normalize(vision_proj(image_embeds[:, 0]))); the
        # graph needs some text beside it, so an empty one goes along.
        _, _, features = self._text_encoder(embeds, [""] * len(images))
        answers, start = [], 0
        for request_images, _ in batch:
            answers.append({"image_embedding": features[start:start + len(request_images)].astype(np.float32)})
            start += len(request_images)
        return answers


class BlipTritonTasks:
    """What the triton backend asks of BLIP (see `plugins.backends.triton.TritonTasks`)."""

    def task_models(self, out_dir: Path, repository: Path, modules: list[ExportedModule]) -> list:
        from plugins.backends.triton import TaskModel
        from plugins.backends.triton_config import TritonTensor

        names = {module.spec.name for module in modules}
        image = TritonTensor("image", "TYPE_STRING", (1,))
        models = []
        relative = os.path.relpath(out_dir, repository / CAPTION)  # the same depth for every task model
        parameters = {"output_dir": relative}
        if {graphs.VISION_ENCODER, graphs.TEXT_DECODER, graphs.TEXT_DECODER_WITH_PAST} <= names:
            models.append(TaskModel(CAPTION, [image], [TritonTensor("caption", "TYPE_STRING", (1,)),
                                                       TritonTensor("token_ids", "TYPE_INT64", (-1,))],
                                    MODEL_SOURCE, {**parameters, "task": CAPTION}))
        if graphs.TEXT_ENCODER in names:
            models.append(TaskModel(MATCH, [image, TritonTensor("texts", "TYPE_STRING", (-1,))],
                                    [TritonTensor("itm_probability", "TYPE_FP32", (-1,)),
                                     TritonTensor("itc_similarity", "TYPE_FP32", (-1,))],
                                    MODEL_SOURCE, {**parameters, "task": MATCH}))
            models.append(TaskModel(EMBED, [image], [TritonTensor("image_embedding", "TYPE_FP32", (-1,))],
                                    MODEL_SOURCE, {**parameters, "task": EMBED}))
        return models

    def check_served(self, address: str, out_dir: Path, models: list[str]) -> Any:
        from plugins.backends.triton import TaskCheck
        from plugins.blip.runtime import BlipRuntime

        runtime = BlipRuntime(out_dir)
        if not runtime.has_tokenizer():
            return TaskCheck(unchecked=[f"{', '.join(models)} (the output ships no tokenizer: texts cannot be "
                                        "compared)"])
        images = check_images(runtime)
        check = TaskCheck()
        client = TritonHttp(address)
        if CAPTION in models:
            check.failures += self._check_captions(client, runtime, images, check.details)
        if MATCH in models:
            check.failures += self._check_match(client, runtime, images, check.details)
        if EMBED in models:
            check.failures += self._check_embed(client, runtime, images, check.details)
        return check

    def _check_captions(self, client: TritonHttp, runtime: Any, images: list[bytes],
                        measured: dict[str, Any]) -> list[str]:
        failures = []
        pictures = [image_from_bytes(data) for data in images]
        expected = runtime.caption(pictures, max_tokens=caption_limit(runtime))
        before = client.counts(CAPTION)
        got = client.concurrent([(CAPTION, {"image": one_image(data)}, {}) for data in images], CONCURRENT_CLIENTS)
        after = client.counts(CAPTION, at_least=before[0] + len(images))
        for index, (answer, reference) in enumerate(zip(got, expected)):
            if isinstance(answer, Exception):
                failures.append(f"model blip_caption: request {index} failed: {answer}")
            elif caption_ids(answer)[0] != reference.token_ids or answer["caption"][0][0].decode() != reference.text:
                failures.append(f"model blip_caption: image {index}: {answer['caption'][0][0].decode()!r} "
                                f"{caption_ids(answer)[0]} from the server, {reference.text!r} {reference.token_ids} "
                                "from BlipRuntime")
        inferences, executions = after[0] - before[0], after[1] - before[1]
        if not executions < inferences:
            failures.append(f"model blip_caption: {len(images)} requests from {CONCURRENT_CLIENTS} concurrent clients "
                            f"ran in {executions} executions for {inferences} inferences: no batching")
        beams = {"beams": 3, "max_tokens": min(12, caption_limit(runtime)), "prompt": graphs.PROMPT}
        answer = client.infer(CAPTION, {"image": np.array([[d] for d in images[:2]], dtype=np.object_)}, beams)
        reference = runtime.caption(pictures[:2], **beams)
        if caption_ids(answer) != [c.token_ids for c in reference]:
            failures.append(f"model blip_caption (beams 3, one request of 2 images): {caption_ids(answer)}, "
                            f"BlipRuntime {[c.token_ids for c in reference]}")
        measured[CAPTION] = {"images": len(images), "clients": CONCURRENT_CLIENTS, "inference_count": inferences,
                             "execution_count": executions, "token_identical": not failures}
        return failures

    def _check_match(self, client: TritonHttp, runtime: Any, images: list[bytes], measured: dict[str, Any]) -> list[str]:
        from plugins.blip.fixture import heldout_scenes

        failures, worst = [], 0.0
        scenes = heldout_scenes(4)
        requests = [(MATCH, {"image": one_image(data), "texts": np.array([[t.encode() for t in
                    (scene.caption, *scene.distractors())]], dtype=np.object_)}, {})
                    for data, scene in zip(images[:4], scenes)]
        got = client.concurrent(requests, len(requests))
        for index, (answer, scene) in enumerate(zip(got, scenes)):
            if isinstance(answer, Exception):
                failures.append(f"model blip_match: request {index} failed: {answer}")
                continue
            expected = runtime.match(image_from_bytes(images[index]), [scene.caption, *scene.distractors()])
            for name, values in (("itm_probability", [m.itm_probability for m in expected]),
                                 ("itc_similarity", [m.itc_similarity for m in expected])):
                difference = float(np.abs(answer[name][0].astype(np.float64) - values).max())
                worst = max(worst, difference)
                if not difference <= ITM_ITC_ATOL:
                    failures.append(f"model blip_match: {name} of image {index} differs from BlipRuntime's by "
                                    f"{difference:.3g} > {ITM_ITC_ATOL:g}")
        measured[MATCH] = {"images": len(requests), "texts_each": 5, "max_abs_diff": worst}
        return failures

    def _check_embed(self, client: TritonHttp, runtime: Any, images: list[bytes], measured: dict[str, Any]) -> list[str]:
        answer = client.infer(EMBED, {"image": np.array([[d] for d in images[:4]], dtype=np.object_)}, {})
        embedding = answer["image_embedding"].astype(np.float64)
        vision = graphs.RETRIEVAL_VISION_ENCODER if runtime.has(graphs.RETRIEVAL_VISION_ENCODER) else graphs.VISION_ENCODER
        embeds = runtime.image_embeds([image_from_bytes(d) for d in images[:4]], vision)
        ids, mask = runtime.tokenizer.batch(["a picture"] * 4)  # another text than the model's: it must not matter
        features = runtime.session(graphs.TEXT_ENCODER).run([graphs.IMAGE_FEATURES], {
            graphs.INPUT_IDS: ids, graphs.ATTENTION_MASK: mask, graphs.IMAGE_EMBEDS: embeds})[0]
        difference = float(np.abs(embedding - features).max())
        norm_error = float(np.abs(np.linalg.norm(embedding, axis=-1) - 1).max())
        measured[EMBED] = {"images": 4, "max_abs_diff": difference, "unit_norm_error": norm_error}
        failures = []
        if not difference <= ITM_ITC_ATOL:
            failures.append(f"model blip_embed: differs from the text encoder's image_features by {difference:.3g}")
        if not norm_error <= ITM_ITC_ATOL:
            failures.append(f"model blip_embed: embeddings are not unit length (off by {norm_error:.3g})")
        return failures

    def readme(self, models: list[str]) -> str:
        return README_EXAMPLES


def check_images(runtime: Any) -> list[bytes]:
    """PNG bytes of held-out fixture scenes at the model's image size: the same images on any machine."""
    from plugins.blip.fixture import draw, heldout_scenes

    size = runtime.preprocess.size
    images = []
    for scene in heldout_scenes(CHECK_SCENES):
        buffer = io.BytesIO()
        draw(scene).resize((size, size), Image.Resampling.BICUBIC).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def one_image(data: bytes) -> np.ndarray:
    return np.array([[data]], dtype=np.object_)


def caption_ids(answer: dict[str, np.ndarray]) -> list[list[int]]:
    return [[int(t) for t in row if t != TOKEN_PAD] for row in answer["token_ids"]]


class TritonHttp:
    """tritonclient's HTTP client for whole requests: numpy arrays in, numpy arrays out."""

    def __init__(self, address: str) -> None:
        import tritonclient.http as httpclient

        self.address = address
        self.client = httpclient.InferenceServerClient(address, network_timeout=300.0)

    def infer(self, model: str, inputs: dict[str, np.ndarray], parameters: dict[str, Any],
              client: Any = None) -> dict[str, np.ndarray]:
        import tritonclient.http as httpclient
        from tritonclient.utils import np_to_triton_dtype

        requests = []
        for name, value in inputs.items():
            request = httpclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
            request.set_data_from_numpy(value, binary_data=True)
            requests.append(request)
        result = (client or self.client).infer(model, requests, parameters=parameters or None)
        return {output["name"]: result.as_numpy(output["name"]) for output in result.get_response()["outputs"]}

    def concurrent(self, requests: list[tuple[str, dict[str, np.ndarray], dict[str, Any]]],
                   clients: int) -> list[Any]:
        """Each request from one of `clients` threads, each with its own connection, started together."""
        import tritonclient.http as httpclient

        answers: list[Any] = [None] * len(requests)
        start = threading.Barrier(min(clients, len(requests)))

        def work(worker: int) -> None:
            client = httpclient.InferenceServerClient(self.address, network_timeout=300.0)
            start.wait()
            for index in range(worker, len(requests), clients):
                model, inputs, parameters = requests[index]
                try:
                    answers[index] = self.infer(model, inputs, parameters, client)
                except Exception as exc:  # recorded as that request's answer, reported by the caller
                    answers[index] = exc
            client.close()

        threads = [threading.Thread(target=work, args=(w,)) for w in range(min(clients, len(requests)))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return answers

    def counts(self, model: str, at_least: int = 0) -> tuple[int, int]:
        """(inference_count, execution_count) of `model`: fewer executions than inferences is batching.

        Triton records an execution after its responses went out, so a client that has its answers
        may still see the old counts: wait (up to STATS_WAIT_S) for `at_least` inferences."""
        deadline = time.monotonic() + STATS_WAIT_S
        while True:
            stats = self.client.get_inference_statistics(model)["model_stats"][0]
            if int(stats["inference_count"]) >= at_least or time.monotonic() > deadline:
                return int(stats["inference_count"]), int(stats["execution_count"])
            time.sleep(0.05)


README_EXAMPLES = '''
With `pip install 'tritonclient[http]'`:

```python
import numpy as np
import tritonclient.http as httpclient

client = httpclient.InferenceServerClient("localhost:8000")
image = np.array([[open("cat.jpg", "rb").read()]], dtype=np.object_)  # [batch, 1] encoded image bytes


def tensor(name, value, datatype):
    request = httpclient.InferInput(name, list(value.shape), datatype)
    request.set_data_from_numpy(value)
    return request


# Captions: greedy by default; request parameters prompt, beams, max_tokens, min_tokens, repetition_penalty.
result = client.infer("blip_caption", [tensor("image", image, "BYTES")], parameters={"beams": 3, "max_tokens": 20})
print(result.as_numpy("caption"))    # [[b"a cat on a sofa"]]; token_ids: int64, -1 past the end

# ITM probability and ITC similarity of each text with the image (one row of texts per image).
texts = np.array([[b"a cat on a sofa", b"a dog"]], dtype=np.object_)
result = client.infer("blip_match", [tensor("image", image, "BYTES"), tensor("texts", texts, "BYTES")])
print(result.as_numpy("itm_probability"), result.as_numpy("itc_similarity"))

# The unit ITC image embedding.
print(client.infer("blip_embed", [tensor("image", image, "BYTES")]).as_numpy("image_embedding").shape)
```

What the server did (batching shows as fewer executions than inferences):

```bash
curl -s localhost:8000/v2/models/blip_caption/config
curl -s localhost:8000/v2/models/blip_caption/stats    # inference_count vs execution_count: batching
```
'''
