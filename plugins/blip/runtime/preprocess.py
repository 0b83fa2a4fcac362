"""Images to the vision encoder's `pixel_values`, as the manifest's `preprocessing` says.

The steps and their number types follow transformers' BLIP image processor (the Pillow backend,
`BlipImageProcessorPil`), so that both give the same floats: RGB with transparency composited onto
white, Pillow's bicubic resize of the 8-bit image to S x S (no crop), rescale in float64 then cast
to float32, normalise in float32. The original BLIP's torchvision transforms resize the same way.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from converter_core.errors import InputError

RESAMPLING = {"bicubic": Image.Resampling.BICUBIC}


def load_image(path: str | Path) -> Image.Image:
    """Open and decode an image file; a missing or undecodable file is an InputError naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such image file")
    return _decode(path, str(path))


def decode_image(data: bytes, name: str) -> Image.Image:
    """`load_image` for image bytes held elsewhere (a Parquet column, a tar member); `name` says
    where they came from in errors."""
    return _decode(io.BytesIO(data), name)


def _decode(source: Path | io.BytesIO, name: str) -> Image.Image:
    try:
        with Image.open(source) as image:
            image.load()  # decode now: a truncated file fails here, not in the middle of a batch
            return image.copy()
    except Image.DecompressionBombError as exc:  # Pillow's guard, before any pixel is decoded
        raise InputError(f"{name}: refused: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"{name}: not an image Pillow can read ({exc})") from exc


SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB; transparent pixels become white (transformers' `convert_to_rgb`). A 16-bit image (Pillow
    mode I;16 or I, as 16-bit grayscale PNGs open) is scaled to 8 bits first: Pillow's own
    conversion clips every value above 255, so nearly all of such an image would turn white."""
    if image.mode in SIXTEEN_BIT:
        levels = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.clip(np.rint(levels / 257), 0, 255).astype(np.uint8), mode="L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class Preprocessor:
    """`manifest["preprocessing"]` as a callable: images -> float32 [batch, 3, S, S]."""

    def __init__(self, settings: dict[str, Any]):
        resize = settings.get("resize")
        if resize not in RESAMPLING or settings.get("crop") is not None:
            raise InputError(f"unsupported preprocessing in the manifest: resize {resize!r}, crop "
                             f"{settings.get('crop')!r} (this runtime knows {sorted(RESAMPLING)} resizing, no crop)")
        if settings.get("channel_order", "RGB") != "RGB" or settings.get("layout", "NCHW") != "NCHW":
            raise InputError(f"unsupported preprocessing in the manifest: {settings.get('channel_order')} "
                             f"{settings.get('layout')} (this runtime writes RGB NCHW)")
        self.size = int(settings["image_size"])
        self.resample = RESAMPLING[resize]
        self.rescale = float(settings["rescale"])
        self.mean = np.asarray(settings["mean"], dtype=np.float32)
        self.std = np.asarray(settings["std"], dtype=np.float32)

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        return np.stack([self.one(image) for image in images])

    def one(self, image: Image.Image) -> np.ndarray:
        resized = to_rgb(image).resize((self.size, self.size), resample=self.resample)
        scaled = (np.asarray(resized).astype(np.float64) * self.rescale).astype(np.float32)
        return ((scaled - self.mean) / self.std).transpose(2, 0, 1)
