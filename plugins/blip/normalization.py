"""BLIP's image normalisation (shared/BLIP.md: CLIP's statistics), in one torch-free place.

The conversion writes these into the manifest, which the runtime reads; the fixture and the
calibration images normalise with them directly.
"""

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
