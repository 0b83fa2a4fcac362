"""What `convert blip` and the BLIP runtime promise, tried as a hostile user would.

Weights no validation input reaches, files that lead out of the output or the checkpoint folder,
tokenizer files changed after conversion, text decoded unlike transformers, and malformed input of
every kind (images, checkpoints, manifests, options): each is a clear error, never a success and
never a traceback.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from PIL import Image
from transformers import BertTokenizer

from converter_core.cli import run
from converter_core.errors import InputError
from converter_core.pipeline import ConvertOptions, convert
from plugins.blip.checkpoint import load_blip_source
from plugins.blip.presets import random_source
from plugins.blip.recipes import BlipConversion
from plugins.blip.runtime.tokenizer import BlipTokenizer
from tests.blip.checkpoint_builders import salesforce_state_dict, save_hf_dir, save_pth
from tests.blip.test_runtime import noise_image, perturb, write_vocab
from tests.conftest import run_cli

pytestmark = [
    pytest.mark.filterwarnings("ignore:# The axis name:UserWarning"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning"),
]


def one_line(text: str) -> str:
    return " ".join(text.split())


def cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_input_error(code: int, err: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err


@pytest.fixture(scope="module")
def tiny_source():
    return random_source("tiny", seed=3)


@pytest.fixture(scope="module")
def pretrain_pth(tiny_source, tmp_path_factory) -> Path:
    state, _ = salesforce_state_dict(tiny_source.captioning, tiny_source.retrieval)
    return save_pth(state, tmp_path_factory.mktemp("ckpt") / "model_base.pth")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A tiny conversion with a tokenizer (not validated: the runtime's checks are under test here)."""
    folder = tmp_path_factory.mktemp("trust")
    source = random_source("tiny", seed=0)
    perturb(source)
    source.tokenizer_dir = write_vocab(folder / "vocab", source.captioning.config.text_config.vocab_size)
    out = folder / "blip-tiny"
    convert(BlipConversion(source), ConvertOptions(output_dir=out, validate=False))
    return out


@pytest.fixture
def copy_of(converted, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(converted, out)
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "noise.png"
    noise_image(1).save(path)
    return path


def edit_manifest(out: Path, edit) -> None:
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


# ------------------------------------------------------------------------------------------------
# Weights no validation input reaches; inputs inside the output
# ------------------------------------------------------------------------------------------------


def test_nan_in_position_rows_past_the_validated_lengths_fails_naming_the_tensor(tiny_source, tmp_path):
    source = copy.deepcopy(tiny_source)
    with torch.no_grad():
        source.captioning.text_decoder.bert.embeddings.position_embeddings.weight[-1] = float("nan")
    state, _ = salesforce_state_dict(source.captioning, source.retrieval)
    checkpoint = save_pth(state, tmp_path / "nan.pth")
    out = tmp_path / "out"
    result = run_cli("blip", "-c", str(checkpoint), "-o", str(out))
    assert result.returncode == 1, result.stderr
    message = one_line(result.stderr)
    assert "position_embeddings" in message and "NaN" in message and "text_decoder" in message, message
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["modules"]["text_decoder"]["validation"]["status"] == "failed"


def test_validation_reaches_the_longest_text_the_decoder_serves(tiny_source):
    from plugins.blip.recipes import module_specs

    specs = {spec.name: spec for spec in module_specs(BlipConversion(tiny_source))}
    for name in ("text_decoder", "text_encoder"):
        spec = specs[name]
        longest = spec.axis_ranges["text"][2]
        text_lengths = [case.inputs["input_ids"].shape[1] for case in spec.cases]
        assert longest in text_lengths, (name, longest, text_lengths)


def test_a_checkpoint_inside_the_output_is_never_deleted(pretrain_pth, tmp_path):
    out = tmp_path / "out"
    assert run_cli("blip", "-c", str(pretrain_pth), "-o", str(out), "--no-validate").returncode == 0
    only_copy = out / "model.pth"
    shutil.copy(pretrain_pth, only_copy)
    result = run_cli("blip", "-c", str(only_copy), "-o", str(out), "--no-validate")
    assert result.returncode == 2, result.stderr
    assert "model.pth" in one_line(result.stderr) and "Traceback" not in result.stderr
    assert only_copy.read_bytes() == pretrain_pth.read_bytes()


# ------------------------------------------------------------------------------------------------
# Tokenizer files: confined to their folder, loaded and matched before shipping, hashed after
# ------------------------------------------------------------------------------------------------


def hf_dir_with_tokenizer(source, folder: Path) -> Path:
    path = save_hf_dir(source.captioning, folder)
    write_vocab(folder / "vocab", source.captioning.config.text_config.vocab_size)
    shutil.move(folder / "vocab" / "vocab.txt", path / "vocab.txt")
    return path


def test_a_tokenizer_file_linking_out_of_the_checkpoint_is_refused(tiny_source, tmp_path):
    checkpoint = hf_dir_with_tokenizer(tiny_source, tmp_path / "hf")
    secret = tmp_path / "secret.txt"
    shutil.move(checkpoint / "vocab.txt", secret)
    (checkpoint / "vocab.txt").symlink_to(secret)
    with pytest.raises(InputError, match="vocab.txt: not a regular file inside"):
        convert(BlipConversion(load_blip_source([checkpoint])), ConvertOptions(output_dir=tmp_path / "o", validate=False))
    assert not (tmp_path / "o").exists()


def test_a_tokenizer_of_another_size_is_refused(tiny_source, tmp_path):
    checkpoint = hf_dir_with_tokenizer(tiny_source, tmp_path / "hf")
    lines = (checkpoint / "vocab.txt").read_text().splitlines()
    (checkpoint / "vocab.txt").write_text("\n".join(lines[:-10] + lines[-2:]) + "\n")
    with pytest.raises(InputError, match="does not belong to this model"):
        convert(BlipConversion(load_blip_source([checkpoint])), ConvertOptions(output_dir=tmp_path / "o", validate=False))


def test_swapped_vocabulary_lines_are_exit_2(copy_of, image, capsys):
    vocab = copy_of / "tokenizer" / "vocab.txt"
    lines = vocab.read_text().splitlines()
    lines[110], lines[111] = lines[111], lines[110]
    vocab.write_text("\n".join(lines) + "\n")
    code, out, err = cli(capsys, "caption", str(copy_of), str(image))
    assert_one_line_input_error(code, err)
    assert "vocab.txt" in err and out == ""


@pytest.mark.parametrize("file", ["/etc/passwd", "../outside.onnx", "link.onnx"])
def test_a_manifest_cannot_lead_the_runtime_out_of_the_output(copy_of, image, capsys, file):
    (copy_of.parent / "outside.onnx").write_bytes((copy_of / "vision_encoder.onnx").read_bytes())
    (copy_of / "link.onnx").symlink_to(copy_of.parent / "outside.onnx")
    edit_manifest(copy_of, lambda m: m["modules"]["vision_encoder"].update(file=file))
    code, _, err = cli(capsys, "caption", str(copy_of), str(image))
    assert_one_line_input_error(code, err)
    assert "lies outside" in err and file in err


def test_a_tokenizer_path_cannot_lead_out_of_the_output(copy_of, image, capsys):
    def edit(manifest):
        manifest["tokenizer"]["files"] = ["../../../../etc/passwd"]
        manifest["assets"] = {"../../../../etc/passwd": "0" * 64}

    edit_manifest(copy_of, edit)
    code, _, err = cli(capsys, "caption", str(copy_of), str(image))
    assert_one_line_input_error(code, err)
    assert "lies outside" in err


def test_nan_outputs_are_exit_1_and_never_printed_as_json(copy_of, image, capsys):
    """A graph that yields NaN (weights edited after conversion, hashes updated to match)."""
    path = copy_of / "vision_encoder.onnx"
    model = onnx.load(str(path))
    for initializer in model.graph.initializer:
        array = numpy_helper.to_array(initializer)
        if array.dtype == np.float32 and array.size > 1000:
            initializer.CopyFrom(numpy_helper.from_array(np.full_like(array, np.nan), initializer.name))
            break
    onnx.save(model, str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    edit_manifest(copy_of, lambda m: m["modules"]["vision_encoder"].update(sha256=digest))
    code, out, err = cli(capsys, "caption", str(copy_of), str(image), "--json")
    assert code == 1, err
    assert "NaN" not in out and "Traceback" not in err and "vision_encoder" in err


# ------------------------------------------------------------------------------------------------
# Caption text is transformers' BERT decode with BLIP's settings
# ------------------------------------------------------------------------------------------------

PIECES = ["'", "s", "t", "n", "m", "ve", "re", "ll", ".", ",", "?", "!", "-", "(", ")", ":", "a", "man", "dog",
          "don", "isn", "on", "the", "table", "##s", "##ing", "##'", "##n", "##t", "##.", "[UNK]"]


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    folder = tmp_path_factory.mktemp("decode")
    vocab = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [piece for piece in PIECES if piece not in vocab] + ["[DEC]", "[ENC]"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokens = {"PAD": 0, "CLS": 101, "SEP": 102, "DEC": len(vocab) - 2, "ENC": len(vocab) - 1}
    ours = BlipTokenizer.from_directory(folder, tokens, 40)
    theirs = BertTokenizer(str(folder / "vocab.txt"))
    theirs.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return ours, theirs, list(range(100, len(vocab)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_decode_is_transformers_decode(decoders, data):
    ours, theirs, ids = decoders
    sequence = data.draw(st.lists(st.sampled_from(ids), max_size=12))
    assert ours.decode(sequence) == theirs.decode(sequence, skip_special_tokens=True,
                                                  clean_up_tokenization_spaces=True), sequence


def test_possessives_read_as_blip_prints_them(decoders):
    ours, theirs, _ = decoders
    ids = [theirs.convert_tokens_to_ids(t) for t in ["a", "man", "'", "s", "dog", "on", "the", "table", "."]]
    assert ours.decode(ids) == "a man's dog on the table."


# ------------------------------------------------------------------------------------------------
# Bad input is exit 2 with one line
# ------------------------------------------------------------------------------------------------


def bomb_png(path: Path, side: int = 30000) -> Path:
    """A valid PNG header claiming side x side pixels, with almost no data: Pillow refuses to open it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_exit_2(converted, tmp_path, capsys):
    code, _, err = cli(capsys, "caption", str(converted), str(bomb_png(tmp_path / "bomb.png")))
    assert_one_line_input_error(code, err)
    assert "bomb.png" in err


def test_a_decompression_bomb_among_calibration_images_is_exit_2(pretrain_pth, tmp_path):
    images = tmp_path / "calibration"
    images.mkdir()
    noise_image(2).save(images / "fine.png")
    bomb_png(images / "bomb.png")
    result = run_cli("blip", "-c", str(pretrain_pth), "-o", str(tmp_path / "out"), "--no-validate",
                     "--passes", "vision_encoder=int8-static", "--calibration-images", str(images))
    assert result.returncode == 2, result.stderr
    assert "bomb.png" in one_line(result.stderr) and "Traceback" not in result.stderr


def test_a_16_bit_image_is_scaled_not_clipped_to_white(converted, tmp_path):
    from plugins.blip.runtime import BlipRuntime
    from plugins.blip.runtime.preprocess import load_image

    gray = (np.arange(80 * 70, dtype=np.uint32).reshape(70, 80) * 9) % 65535
    sixteen = tmp_path / "deep.png"
    Image.fromarray(gray.astype(np.uint16)).save(sixteen)
    assert Image.open(sixteen).mode.startswith("I")
    eight = tmp_path / "eight.png"
    Image.fromarray(np.round(gray / 257).astype(np.uint8)).save(eight)
    white = Image.new("L", (80, 70), 255)
    preprocess = BlipRuntime(converted, threads=1).preprocess
    deep, shallow, blank = (preprocess([load_image(sixteen)]), preprocess([load_image(eight)]), preprocess([white]))
    np.testing.assert_allclose(deep, shallow, atol=0.02)  # 8-bit rounding only
    assert np.abs(deep - blank).mean() > 0.5


@pytest.mark.parametrize("options", [
    ["--repetition-penalty", "nan"], ["--repetition-penalty", "inf"], ["--beams", "100000"], ["--beams", "0"],
    ["--max-tokens", "-1"],
])
def test_bad_decoding_options_are_exit_2(converted, image, capsys, options):
    code, _, err = cli(capsys, "caption", str(converted), str(image), *options)
    assert_one_line_input_error(code, err)


def test_negative_atol_is_exit_2(pretrain_pth, tmp_path, capsys):
    code, _, err = cli(capsys, "blip", "-c", str(pretrain_pth), "-o", str(tmp_path / "o"), "--atol", "-1")
    assert code == 2 and "Traceback" not in err, err


def test_a_fifo_as_a_checkpoint_is_refused_without_reading(tmp_path):
    fifo = tmp_path / "model.pth"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="not a regular file"):
        load_blip_source([fifo])


def test_architectures_null_is_refused(tiny_source, tmp_path):
    path = save_hf_dir(tiny_source.captioning, tmp_path / "hf")
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = None
    (path / "config.json").write_text(json.dumps(config))
    # Not a crash: the loader falls back on model_type, which names the same class.
    loaded = load_blip_source([path])
    assert loaded.captioning is not None and loaded.retrieval is None


def test_a_full_disk_is_an_environment_error_exit_2(pretrain_pth, tmp_path, monkeypatch, capsys):
    import errno

    import onnx as onnx_module

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx_module, "save_model", full)
    monkeypatch.setattr(onnx_module, "save", full)
    code, _, err = cli(capsys, "blip", "-c", str(pretrain_pth), "-o", str(tmp_path / "o"), "--no-validate")
    assert code == 2, err
    assert "No space left on device" in err and "check failed" not in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------
# Property: any structural change to a checkpoint or a manifest is exit 2, one line
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrain_state(tiny_source) -> dict[str, torch.Tensor]:
    state, _ = salesforce_state_dict(tiny_source.captioning, tiny_source.retrieval)
    return state


def _weights(state: dict[str, torch.Tensor]) -> list[str]:
    # Buffers the loader recomputes or drops (queues, position ids, temperatures) are not model weights.
    return sorted(k for k, v in state.items() if v.dtype == torch.float32 and v.dim() >= 1 and "queue" not in k
                  and "temp" not in k and "position_ids" not in k and "_m." not in k and not k.endswith("_m"))


CHECKPOINT_MUTATIONS = ("drop", "non_tensor", "integer", "scalar", "flatten", "grow", "shrink", "non_string_key")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_structurally_changed_checkpoint_is_an_input_error(pretrain_state, tmp_path_factory, data):
    state = dict(pretrain_state)
    mutation = data.draw(st.sampled_from(CHECKPOINT_MUTATIONS), label="mutation")
    keys = _weights(state)
    if mutation == "drop":
        # BLIP stores a tied weight twice (the LM head's bias is `decoder.bias` and `predictions.bias`, one
        # tensor): dropping one copy loses nothing, so only a tensor no other key carries must be refused.
        keys = [k for k in keys if not any(o != k and state[o].shape == state[k].shape
                                           and torch.equal(state[o], state[k]) for o in keys)]
    key = data.draw(st.sampled_from(keys), label="key")
    tensor = state[key]
    if mutation == "drop":
        del state[key]
    elif mutation == "non_tensor":
        state[key] = data.draw(st.sampled_from(["weights", 3, [1.0, 2.0], {"a": 1}]))
    elif mutation == "integer":
        state[key] = tensor.to(torch.int64)
    elif mutation == "scalar":
        state[key] = tensor.flatten()[0].clone()
    elif mutation == "flatten":
        state[key] = tensor.flatten() if tensor.dim() > 1 else tensor.reshape(1, -1)
    elif mutation in ("grow", "shrink"):
        axis = data.draw(st.integers(0, tensor.dim() - 1), label="axis")
        size = tensor.shape[axis] + data.draw(st.integers(1, 5)) if mutation == "grow" else data.draw(
            st.integers(0, tensor.shape[axis] - 1))
        shape = list(tensor.shape)
        shape[axis] = size
        state[key] = torch.zeros(shape)
    else:
        state[data.draw(st.sampled_from([7, (1, 2), None]))] = state.pop(key)
    path = save_pth(state, tmp_path_factory.mktemp("mutated") / "model.pth")
    with pytest.raises(InputError) as raised:
        load_blip_source([path])
    assert "\n" not in str(raised.value) and str(raised.value)


def _schema_fields(manifest: dict) -> list[tuple[str, ...]]:
    from plugins.blip.runtime.manifest import BLIP_GENERATE, GENERATION, PREPROCESSING

    fields = [("preprocessing", k) for k in PREPROCESSING] + [("generation", k) for k in GENERATION]
    fields += [("generation", "blip_generate", k) for k in BLIP_GENERATE]
    fields += [("tokens", k) for k in manifest["tokens"]] + [("model_type",), ("modules",), ("tokenizer",),
                                                             ("tokenizer", "files"), ("assets",)]
    for name in manifest["modules"]:
        fields += [("modules", name), ("modules", name, "file"), ("modules", name, "sha256"),
                   ("modules", name, "data_files")]
    return fields


def _other_type(value, draw):
    """A value of another JSON type than `value` (None only where the field does not allow it)."""
    kinds = {"text": "blip", "number": 3.5, "integer": -7, "list": [1, "x"], "table": {"k": 1}, "bool": True,
             "none": None}
    current = ("none" if value is None else "bool" if isinstance(value, bool) else "integer" if isinstance(value, int)
               else "number" if isinstance(value, float) else "text" if isinstance(value, str)
               else "list" if isinstance(value, list) else "table")
    # One fixed draw, whatever the field, so that hypothesis can replay and shrink it.
    order = list(kinds)
    kind = draw(st.sampled_from(order))
    numeric = {"integer", "number"}
    while kind == current or {kind, current} <= numeric:
        kind = order[(order.index(kind) + 1) % len(order)]
    return kinds[kind]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_manifest_with_a_changed_schema_is_exit_2_one_line(converted, image, tmp_path_factory, capsys, data):
    manifest = json.loads((converted / "manifest.json").read_text())
    field = data.draw(st.sampled_from(_schema_fields(manifest)), label="field")
    table = manifest
    for part in field[:-1]:
        table = table[part]
    # data_files is optional (older manifests have none) and a module may be absent (a captioning
    # checkpoint has no text encoder): of those only the type is checked.
    optional = field[-1] == "data_files" or (len(field) == 2 and field[0] == "modules")
    if data.draw(st.booleans(), label="delete") and not optional:
        del table[field[-1]]
    else:
        if field in (("generation", "prompt"), ("generation", "prompt_ids")) and table[field[-1]] is None:
            table[field[-1]] = 5
        else:
            replacement = _other_type(table[field[-1]], data.draw)
            if replacement is None and field[-1] in ("prompt", "prompt_ids"):
                replacement = 5
            table[field[-1]] = replacement
    out = tmp_path_factory.mktemp("schema")
    # Hard links, not symbolic ones: a link that resolves out of the folder is refused on its own.
    shutil.copytree(converted, out, dirs_exist_ok=True, copy_function=os.link)
    (out / "manifest.json").unlink()  # a hard link to the fixture's own manifest
    (out / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = cli(capsys, "caption", str(out), str(image))
    assert code == 2, (field, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
