"""INT8 on the bundled trained BLIP: captions must stay those of the float32 model."""

from __future__ import annotations

import torch

from converter_core.pipeline import ConvertOptions, convert, parse_pass_policy
from plugins.blip import fixture
from plugins.blip.conversion import load_source
from plugins.blip.recipes import BlipConversion
from plugins.blip.runtime import BlipRuntime

HELDOUT = 100


def test_int8_dynamic_captions_agree_with_float32_pytorch(tmp_path):
    source = load_source([], False, "base", None, 0, None)  # no checkpoint: the bundled fixture
    out = tmp_path / "int8"
    result = convert(BlipConversion(source), ConvertOptions(out, passes=parse_pass_policy("int8-dynamic")))
    assert result.exit_code == 0
    kept = {name: [p.kept for p in record.passes] for name, record in result.modules.items()}
    assert all(flags == [True] for flags in kept.values()), kept

    scenes = fixture.heldout_scenes(HELDOUT)
    images = [fixture.draw(scene) for scene in scenes]
    int8_captions = BlipRuntime(out).caption(images, max_tokens=20)

    # Float32 reference: transformers' own greedy generate on the same checkpoint.
    # BLIP's generate turns [CLS] into [DEC] and drops the last token, as it does with a tokenised prompt.
    prompt_ids = BlipRuntime(out).prompt_ids()
    sep = source.tokens["SEP"]
    prompt = torch.tensor([[source.tokens["CLS"], *prompt_ids[1:], sep]])
    pixels = torch.from_numpy(fixture.pixel_values(images))
    with torch.no_grad():
        rows = source.captioning.generate(
            pixel_values=pixels, input_ids=prompt.repeat(HELDOUT, 1), max_new_tokens=20, num_beams=1, do_sample=False
        )
    float_tokens = []
    for row in rows[:, len(prompt_ids):].tolist():
        float_tokens.append(row[: row.index(sep) + 1] if sep in row else row)
    agreement = sum(c.token_ids == f for c, f in zip(int8_captions, float_tokens)) / HELDOUT
    assert agreement >= 0.95, f"INT8 captions agree with float32 on {agreement:.0%} of held-out scenes"
