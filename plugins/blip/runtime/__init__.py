"""BLIP without torch: caption images and score image-text pairs with a `convert blip` output.

Needs onnxruntime, numpy, Pillow and tokenizers only; importing it never imports torch or
transformers (a test runs it where they cannot be imported).

    from plugins.blip.runtime import BlipRuntime
    runtime = BlipRuntime("blip-onnx")
    runtime.caption(["cat.jpg"], beams=3)[0].text
    runtime.match("cat.jpg", ["a cat", "a dog"])
    runtime.answer(["cat.jpg"], ["what animal is it?"])[0].text   # a `convert blip` of a BLIP VQA model
    runtime.embedding(["cat.jpg"])  # ITC image features, unit length
"""

from plugins.blip.runtime.decoding import DecodingOptions
from plugins.blip.runtime.preprocess import decode_image, load_image
from plugins.blip.runtime.runtime import Answer, BlipRuntime, Caption, Match
from plugins.blip.runtime.vqa import RankedAnswer

__all__ = ["Answer", "BlipRuntime", "Caption", "DecodingOptions", "Match", "RankedAnswer", "decode_image", "load_image"]
