"""`convert caption`, `convert match` and `convert ask`: the torch-free runtime on a `convert blip` output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

OutDir = Annotated[Path, typer.Argument(metavar="OUT", help="A `convert blip` output directory.", show_default=False)]
Tokenizer = Annotated[Path | None, typer.Option(
    help="Tokenizer directory (vocab.txt or tokenizer.json), when the output ships none.")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def register_runtime_commands(cli: typer.Typer) -> None:
    @cli.command("caption")
    def caption(
        output: OutDir,
        images: Annotated[list[Path], typer.Argument(
            metavar="IMAGE", help="Image files, captioned as one batch.", show_default=False)],
        beams: Annotated[int | None, typer.Option(
            help="Beam width; 1 (the default) is greedy. BLIP's COCO setting: 3.", show_default=False)] = None,
        max_tokens: Annotated[int | None, typer.Option(
            help="Most tokens to write after the prompt [default: 20].", show_default=False)] = None,
        min_tokens: Annotated[int | None, typer.Option(
            help="Fewest tokens to write after the prompt [default: 0].", show_default=False)] = None,
        repetition_penalty: Annotated[float | None, typer.Option(
            help="Above 1 discourages repeated tokens [default: 1.0].", show_default=False)] = None,
        beam_scoring: Annotated[str | None, typer.Option(
            help="How finished beams are ranked: 'transformers' (sum / new tokens, the default) or 'blip' "
                 "(the original BLIP code: sum / whole sequence).", show_default=False)] = None,
        blip_defaults: Annotated[bool, typer.Option(
            "--blip-defaults", help="The original BLIP generate(): 3 beams, max_length 30 and min_length 10 over "
                                    "the whole sequence, BLIP's beam scoring.")] = False,
        prompt: Annotated[str | None, typer.Option(
            help="Text the caption continues (default: the manifest's, \"a picture of \"); '' for none.")] = None,
        tokenizer: Tokenizer = None,
        as_json: JsonFlag = False,
    ) -> None:
        """Caption images with the exported vision encoder and decoder (onnxruntime, no torch)."""
        from converter_core.console import stdout
        from converter_core.errors import InputError
        from plugins.blip.runtime import BlipRuntime, load_image

        runtime = BlipRuntime(output, tokenizer_dir=tokenizer)
        given = {"beams": beams, "max_tokens": max_tokens, "min_tokens": min_tokens,
                 "repetition_penalty": repetition_penalty, "beam_scoring": beam_scoring}
        given = {key: value for key, value in given.items() if value is not None}
        settings = {"beams": 1, "max_tokens": 20, "min_tokens": 0, "repetition_penalty": 1.0}
        if blip_defaults:
            if given:
                raise InputError(f"--blip-defaults sets {', '.join(given)} itself; give one or the other")
            settings = runtime.blip_generate_defaults(runtime.prompt_ids(prompt))
        pictures = [load_image(path) for path in images]
        captions = runtime.caption(pictures, **{**settings, **given}, prompt=prompt)
        if as_json:
            rows = [{"image": str(path), "caption": c.text, "token_ids": c.token_ids, "score": c.score}
                    for path, c in zip(images, captions)]
            stdout.print_json(json.dumps(rows, allow_nan=False))
            return
        for path, c in zip(images, captions):
            text = c.text if c.text is not None else f"(no tokenizer) token ids {c.token_ids}"
            stdout.print(f"{path}: {text}", highlight=False, markup=False)

    @cli.command("match")
    def match(
        output: OutDir,
        image: Annotated[Path, typer.Argument(metavar="IMAGE", help="One image file.", show_default=False)],
        texts: Annotated[list[str], typer.Argument(metavar="TEXT", help="Texts to score against the image.", show_default=False)],
        tokenizer: Tokenizer = None,
        as_json: JsonFlag = False,
    ) -> None:
        """Score texts against an image: ITM probability and ITC similarity (onnxruntime, no torch)."""
        from rich.table import Table
        from rich.text import Text

        from converter_core.console import stdout
        from plugins.blip.runtime import BlipRuntime, load_image

        runtime = BlipRuntime(output, tokenizer_dir=tokenizer)
        matches = runtime.match(load_image(image), texts)
        if as_json:
            rows = [{"text": m.text, "itm_probability": m.itm_probability, "itc_similarity": m.itc_similarity}
                    for m in matches]
            stdout.print_json(json.dumps({"image": str(image), "matches": rows}, allow_nan=False))
            return
        table = Table("text", "ITM probability", "ITC similarity", title=Text(str(image)))
        for m in matches:
            table.add_row(Text(m.text), f"{m.itm_probability:.4f}", f"{m.itc_similarity:.4f}")
        stdout.print(table)

    @cli.command("ask")
    def ask(
        output: OutDir,
        image: Annotated[Path, typer.Argument(metavar="IMAGE", help="One image file.", show_default=False)],
        question: Annotated[str, typer.Argument(metavar="QUESTION", help="A question about the image.",
                                                show_default=False)],
        answers: Annotated[Path | None, typer.Option(
            help="Rank these candidate answers (a text file, one per line) as BLIP's VQA evaluation does, "
                 "instead of generating one.", show_default=False)] = None,
        beams: Annotated[int, typer.Option(help="Beam width of generate mode (BLIP_VQA's: 3).")] = 3,
        max_tokens: Annotated[int, typer.Option(
            help="Most answer tokens to write, [SEP] included (BLIP_VQA's max_length 10 less [DEC]).")] = 9,
        k: Annotated[int | None, typer.Option(
            help="Rank mode: candidates kept after the first token [default: 128, BLIP's k_test].",
            show_default=False)] = None,
        tokenizer: Tokenizer = None,
        as_json: JsonFlag = False,
    ) -> None:
        """Answer a question about an image with an exported BLIP VQA model (onnxruntime, no torch)."""
        from converter_core.console import stdout
        from converter_core.errors import InputError
        from plugins.blip.runtime import BlipRuntime, load_image

        candidates = None
        if answers is not None:
            try:
                candidates = [line.strip() for line in answers.read_text(encoding="utf-8").splitlines() if line.strip()]
            except (OSError, UnicodeDecodeError) as exc:
                raise InputError(f"{answers}: cannot read the answers ({type(exc).__name__}: {exc})") from None
            if not candidates:
                raise InputError(f"{answers}: holds no answers (one per line)")
        runtime = BlipRuntime(output, tokenizer_dir=tokenizer)
        (found,) = runtime.answer([load_image(image)], [question], beams=beams, max_tokens=max_tokens,
                                  answers=candidates, k=k)
        if as_json:
            row = {"image": str(image), "question": question, "answer": found.text, "score": found.score}
            if found.ranked is None:
                row["token_ids"] = found.token_ids
            else:
                row["ranked"] = [{"answer": r.answer, "score": r.score, "log_likelihood": r.log_likelihood,
                                  "first_token_probability": r.first_token_probability} for r in found.ranked]
            stdout.print_json(json.dumps(row, allow_nan=False))
            return
        stdout.print(f"{image}: {question} -> {found.text}", highlight=False, markup=False)
