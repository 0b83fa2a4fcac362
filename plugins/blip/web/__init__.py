"""BLIP's task layer for the `web` backend: the browser app and the check that it captions as Python does.

The app (`index.html`, `blip.js`, `README.md` beside this file) is the runtime of
`plugins/blip/runtime` rewritten for the browser; `check` proves the two agree. It serves held-out
fixture scenes resized to sizes other than the model's and saved in several Pillow modes (RGB, L,
RGBA with graded alpha, P with a transparent palette entry, LA), opens the site in headless
Chromium, and compares with `BlipRuntime` on the same files: the preprocessed pixels (within
1e-4), the caption tokens for greedy and beam search (identical), and the ITM / ITC scores of the
right caption and two distractors (within 1e-4). `index.html?image=...&text=...` is checked too,
as a user's link would open it.
"""

from __future__ import annotations

import io
import json
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from converter_core.specs import BackendValidation
from plugins.backends.web import WebOptions, WebSite
from plugins.backends.web.browser import CHECK_PREFIX, SiteBrowser
from plugins.blip.graphs import (
    RETRIEVAL_VISION_ENCODER,
    TEXT_DECODER,
    TEXT_DECODER_WITH_PAST,
    TEXT_ENCODER,
    VISION_ENCODER,
)

# The graphs blip.js runs: captioning and matching. VQA's graphs are copied into the site with the others
# but no page answers questions yet, so an output holding them cannot be called checked in the browser.
PAGE_GRAPHS = (VISION_ENCODER, RETRIEVAL_VISION_ENCODER, TEXT_ENCODER, TEXT_DECODER, TEXT_DECODER_WITH_PAST)

HERE = Path(__file__).parent
APP_FILES = ("index.html", "blip.js", "README.md")
PIXEL_ATOL = 1e-4
SCORE_ATOL = 1e-4
# (width, height, mode) of the validation images, in turn: every one needs the resize, and each
# mode takes its own path through the page's PNG decoder and alpha compositing.
VARIANTS = ((97, 73, "RGB"), (50, 50, "L"), (120, 90, "RGBA"), (80, 120, "P"), (33, 21, "RGB"), (256, 48, "RGB"),
            (71, 71, "LA"), (200, 150, "RGB"))
# What each image is captioned with: greedy, BLIP's COCO-style beam search, and one that makes the
# repetition penalty and min_tokens decide.
DECODING = ({"beams": 1, "max_tokens": 20, "min_tokens": 0, "repetition_penalty": 1.0},
            {"beams": 3, "max_tokens": 20, "min_tokens": 5, "repetition_penalty": 1.0},
            {"beams": 2, "max_tokens": 16, "min_tokens": 12, "repetition_penalty": 1.3})


def validation_image(index: int) -> tuple[str, bytes, str]:
    """Held-out scene `index` at the size and in the Pillow mode of VARIANTS[index % len]: (file name, PNG, mode)."""
    from plugins.blip import fixture

    width, height, mode = VARIANTS[index % len(VARIANTS)]
    scene = fixture.heldout_scenes(index + 1)[index]
    image = fixture.draw(scene).resize((width, height), Image.Resampling.BILINEAR)
    save: dict[str, Any] = {}
    if mode in ("RGBA", "LA"):
        alpha = Image.linear_gradient("L").resize((width, height)).rotate(90)  # every alpha from 0 to 255
        image = image.convert(mode[:-1])
        image.putalpha(alpha)
    elif mode == "P":
        image = image.quantize(colors=16)
        save["transparency"] = 0  # palette entry 0 is transparent: composited onto white
    else:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save)
    return f"scene-{index}-{width}x{height}-{mode}.png", buffer.getvalue(), mode


def _vocabulary(out_dir: Path, metadata: dict[str, Any]) -> tuple[bytes, bool] | None:
    """The shipped tokenizer as vocab.txt lines (from tokenizer.json's WordPiece table when that is
    all there is) and whether it lower-cases; None without a tokenizer."""
    files = set(metadata.get("tokenizer", {}).get("files", []))
    folder = out_dir / "tokenizer"
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if "tokenizer/tokenizer_config.json" in files else {}
    if "tokenizer/vocab.txt" in files:
        return (folder / "vocab.txt").read_bytes(), config.get("do_lower_case", True)
    if "tokenizer/tokenizer.json" in files:
        table = json.loads((folder / "tokenizer.json").read_text())
        by_id = {int(i): token for token, i in table["model"]["vocab"].items()}
        # A line per id, so that ids stay ids; an id the table lacks ([DEC], [ENC] as added tokens) is
        # only ever put in by id, and a placeholder keeps its place.
        lines = [by_id.get(i, f"[unused-{i}]") for i in range(max(by_id) + 1)]
        lowercase = (table.get("normalizer") or {}).get("lowercase", config.get("do_lower_case", True))
        return ("\n".join(lines) + "\n").encode(), lowercase
    return None


class BlipWebTasks:
    """What the `web` backend asks of BLIP (see plugins.backends.web)."""

    def site(self, out_dir: Path, metadata: dict[str, Any]) -> WebSite:
        files = {name: (HERE / name).read_bytes() for name in APP_FILES}
        manifest: dict[str, Any] = {"model_type": "blip", "preprocessing": metadata["preprocessing"],
                                    "tokens": metadata["tokens"], "generation": metadata["generation"], "tokenizer": None}
        vocabulary = _vocabulary(out_dir, metadata)
        if vocabulary is not None:
            import hashlib

            content, lowercase = vocabulary
            files["vocab.txt"] = content
            manifest["tokenizer"] = {"file": "vocab.txt", "sha256": hashlib.sha256(content).hexdigest(),
                                     "do_lower_case": lowercase}
        return WebSite(files, manifest)

    def check(self, out_dir: Path, site: Path, browser: SiteBrowser, options: WebOptions) -> BackendValidation:
        from plugins.blip.runtime import BlipRuntime

        runtime = BlipRuntime(out_dir)
        images = [validation_image(index) for index in range(options.validation_images)]
        pillow = [Image.open(io.BytesIO(content)) for _, content, _ in images]
        captions = runtime.has(TEXT_DECODER)
        matching = runtime.has(TEXT_ENCODER) and runtime.has_tokenizer()
        texts = [self._texts(index) if matching else [] for index in range(len(images))]
        requests = [{"image": CHECK_PREFIX + name, "pixels": True, "texts": texts[i],
                     "decode": list(DECODING) if captions else []} for i, (name, _, _) in enumerate(images)]
        first = images[0][0]
        link = "index.html?" + urllib.parse.urlencode(
            [("image", CHECK_PREFIX + first), *(("text", t) for t in texts[0]), ("beams", "3")])
        files = {name: content for name, content, _ in images}
        files["requests.json"] = json.dumps(requests).encode()
        pages = browser.open(["index.html?requests=" + CHECK_PREFIX + "requests.json", link], files)
        for page in pages:
            if page.status != "done":
                said = (page.results or {}).get("error") or page.error or "; ".join(page.console[-3:])
                return BackendValidation("failed", f"the page {page.url} did not finish ({page.status}): {said}",
                                         {"console": page.console})

        failures: list[str] = []
        details: dict[str, Any] = {"ort_web": pages[0].results.get("ort"), "images": []}
        expected_captions = {}
        if captions:
            for d, settings in enumerate(DECODING):
                expected_captions[d] = runtime.caption(pillow, **settings)
        for i, ((name, _, mode), result) in enumerate(zip(images, pages[0].results["results"])):
            record: dict[str, Any] = {"image": name, "mode": mode, "size": list(pillow[i].size)}
            python_pixels = runtime.pixel_values([pillow[i]])[0]
            browser_pixels = np.asarray(result["pixel_values"], dtype=np.float32).reshape(python_pixels.shape)
            record["pixel_max_abs_diff"] = float(np.abs(python_pixels - browser_pixels).max())
            if record["pixel_max_abs_diff"] > PIXEL_ATOL:
                failures.append(f"{name}: preprocessing differs from Python by {record['pixel_max_abs_diff']:.3g}")
            record["captions"] = []
            for d, got in enumerate(result["captions"]):
                want = expected_captions[d][i]
                same = list(got["token_ids"]) == list(want.token_ids)
                record["captions"].append({"options": DECODING[d], "python": want.text, "browser": got["text"],
                                           "python_tokens": want.token_ids, "browser_tokens": got["token_ids"],
                                           "same_tokens": same})
                if not same or (want.text is not None and got["text"] != want.text):
                    failures.append(f"{name} ({DECODING[d]}): browser {got['token_ids']} {got['text']!r}, "
                                    f"Python {want.token_ids} {want.text!r}")
            record.update(self._compare_matches(name, runtime.match(pillow[i], texts[i]) if texts[i] else [],
                                                result["matches"], failures))
            details["images"].append(record)
        link_result = pages[1].results["results"][0]
        if captions:
            want = runtime.caption([pillow[0]], beams=3)[0]
            got = link_result["captions"][0]
            if got["token_ids"] != want.token_ids:
                failures.append(f"{link}: browser {got['token_ids']}, Python {want.token_ids}")
        details["link"] = {"url": link, **self._compare_matches(
            link, runtime.match(pillow[0], texts[0]) if texts[0] else [], link_result["matches"], failures)}
        if failures:
            return BackendValidation("failed", "; ".join(failures[:5]) + (f" and {len(failures) - 5} more"
                                                                          if len(failures) > 5 else ""), details)
        worst = max(r["pixel_max_abs_diff"] for r in details["images"])
        said = [f"{len(images)} images ({', '.join(sorted({m for _, _, m in images}))}; sizes other than the model's) "
                f"preprocessed within {worst:.2g} of Python"]
        if captions:
            said.append(f"captions token-identical to BlipRuntime ({len(DECODING)} decoding settings: greedy, beams 3, "
                        "beams 2 with repetition penalty and min_tokens)")
        else:
            said.append("no captions checked: the output has no text decoder")
        if matching:
            worst_match = max(r["match_max_abs_diff"] for r in details["images"])
            said.append(f"ITM/ITC within {worst_match:.2g}")
        else:
            said.append("no ITM/ITC to compare: the output " + ("has no text encoder" if not runtime.has(TEXT_ENCODER)
                                                                else "ships no tokenizer"))
        unserved = [name for name in runtime.manifest["modules"] if name not in PAGE_GRAPHS]
        if unserved:
            return BackendValidation("skipped", f"not run in the browser: {', '.join(unserved)} (the page does not "
                                     "answer questions yet; only ONNX Runtime Web's op check loaded them); checked: "
                                     + "; ".join(said), details)
        # What the output cannot do (no decoder, no tokenizer to match with) the page cannot either: every
        # task the site offers was compared.
        return BackendValidation("passed", f"headless Chromium, ONNX Runtime Web {details['ort_web']} (WASM): "
                                 + "; ".join(said), details)

    @staticmethod
    def _texts(index: int) -> list[str]:
        from plugins.blip import fixture

        scene = fixture.heldout_scenes(index + 1)[index]
        distractors = scene.distractors()
        return [scene.caption, distractors[0], distractors[2]]

    @staticmethod
    def _compare_matches(name: str, want: list, got: list[dict[str, Any]], failures: list[str]) -> dict[str, Any]:
        worst = 0.0
        for w, g in zip(want, got):
            diff = max(abs(w.itm_probability - g["itm_probability"]), abs(w.itc_similarity - g["itc_similarity"]))
            worst = max(worst, diff)
            if diff > SCORE_ATOL or w.text != g["text"]:
                failures.append(f"{name}: {w.text!r}: browser ITM {g['itm_probability']:.6f} ITC "
                                f"{g['itc_similarity']:.6f}, Python {w.itm_probability:.6f} {w.itc_similarity:.6f}")
        if len(want) != len(got):
            failures.append(f"{name}: {len(got)} match scores from the browser, {len(want)} expected")
        return {"match_max_abs_diff": worst, "matches": [
            {"text": w.text, "python": [w.itm_probability, w.itc_similarity],
             "browser": [g["itm_probability"], g["itc_similarity"]]} for w, g in zip(want, got)]}
