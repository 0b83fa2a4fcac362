"""`convert bulk`: a user captions and embeds a folder of scenes into Parquet, here or on Ray.

The expected rows come from `BlipRuntime.caption` and `BlipRuntime.embedding` called on one image
at a time (and the embedding from the text side through `match`), never from `convert bulk`
itself. Ray runs on real clusters: one `--ray local` starts for its job, and one is started with
`ray start --head` on loopback, as a user would on another terminal.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from converter_core.pipeline import ConvertOptions, convert
from plugins.blip.bulk.run import usable_cpus
from plugins.blip.recipes import BlipConversion
from plugins.blip.runtime import BlipRuntime
from tests.conftest import run_cli

pytestmark = [
    pytest.mark.filterwarnings("ignore:# The axis name:UserWarning"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning"),
]

SCENES = 300
SHARD = 20  # 15 shards of the 300 scenes
# A token of our own for each Ray cluster: Ray 2.60 turns token authentication on by default and
# would otherwise write one to ~/.ray, which the next cluster's client may not share.
RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_DEDUP_LOGS": "0"}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """The bundled tiny BLIP, converted once, with its tokenizer (no validation: test_runtime does that)."""
    from plugins.blip import fixture
    from plugins.blip.checkpoint import load_blip_source

    source = load_blip_source([fixture.checkpoint_path()])
    source.tokenizer_dir = fixture.tokenizer_dir()
    out = tmp_path_factory.mktemp("model") / "blip"
    convert(BlipConversion(source), ConvertOptions(output_dir=out, validate=False))
    return out


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """300 drawn scenes as PNG files in three folders: `scenes/group-K/scene-NNN.png`."""
    from plugins.blip import fixture

    root = tmp_path_factory.mktemp("data") / "scenes"
    for index, scene in enumerate(fixture.heldout_scenes(SCENES)):
        folder = root / f"group-{index % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        fixture.draw(scene).save(folder / f"scene-{index:03d}.png")
    return root


def scene_ids(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))


@pytest.fixture(scope="module")
def expected(model, scenes) -> dict[str, dict]:
    """What the runtime says for each scene on its own: caption, tokens, score, ITC embedding."""
    runtime = BlipRuntime(model, threads=2)
    rows = {}
    for name in scene_ids(scenes):
        caption = runtime.caption([scenes / name], max_tokens=20)[0]
        embedding = runtime.embedding([scenes / name])[0]
        rows[name] = {"caption": caption.text, "token_ids": caption.token_ids, "score": caption.score,
                      "embedding": embedding}
    return rows


def bulk(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli("bulk", *map(str, args), env=env)


def read_rows(result: Path) -> list[dict]:
    return pq.read_table(result).to_pylist()


def assert_rows_match(rows: list[dict], expected: dict[str, dict], key=lambda row_id: row_id) -> None:
    """Same captions and token ids, scores and embeddings within 1e-5, every row once."""
    ids = [key(row["id"]) for row in rows]
    assert len(ids) == len(set(ids)), "a row appears twice"
    assert sorted(ids) == sorted(expected)
    for row in rows:
        want = expected[key(row["id"])]
        assert row["error"] is None, row
        assert (row["caption"], row["token_ids"]) == (want["caption"], want["token_ids"]), row["id"]
        assert row["score"] == pytest.approx(want["score"], abs=1e-5)
        assert np.abs(np.asarray(row["embedding"], np.float32) - want["embedding"]).max() <= 1e-5, row["id"]


@pytest.fixture(scope="module")
def uninterrupted(model, scenes, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    result = tmp_path_factory.mktemp("runs") / "uninterrupted"
    done = bulk(model, scenes, "-o", result, "--shard-size", SHARD, "--batch", 8)
    return result, done


# --------------------------------------------------------------------------------------------
# Local mode
# --------------------------------------------------------------------------------------------


def test_a_folder_of_scenes_gives_the_captions_and_embeddings_of_the_runtime(uninterrupted, expected, model, scenes):
    result, done = uninterrupted
    assert done.returncode == 0, done.stderr
    rows = read_rows(result)
    assert [row["id"] for row in rows] == scene_ids(scenes)  # shards in listing order, ids relative paths
    assert_rows_match(rows, expected)
    assert {row["model"] for row in rows} == {json.loads((result / "_job.json").read_text())["model"]}
    summary = json.loads((result / "_summary.json").read_text())
    assert (summary["done"], summary["failed"], summary["shards"]["total"]) == (SCENES, 0, SCENES // SHARD)
    assert summary["images_per_second"] > 0
    assert "done" in done.stdout and "images/s" in done.stdout  # the summary table


def test_the_embedding_is_the_unit_itc_vector_match_scores_with(uninterrupted, model, scenes):
    """ITC similarity from `match` (the text tower's features . the image's) equals the text
    features dotted with the row's embedding: the row holds BLIP's image-side ITC vector."""
    from plugins.blip import graphs

    runtime = BlipRuntime(model, threads=2)
    rows = read_rows(uninterrupted[0])[:5]
    for row in rows:
        embedding = np.asarray(row["embedding"], np.float32)
        assert np.linalg.norm(embedding) == pytest.approx(1.0, abs=1e-5)
        texts = [row["caption"], "three yellow squares on a black background"]
        input_ids, attention_mask = runtime.tokenizer.batch(texts)
        image_embeds = runtime.image_embeds([scenes / row["id"]])
        _, text_features, _ = runtime.session(graphs.TEXT_ENCODER).run(None, {
            graphs.INPUT_IDS: input_ids, graphs.ATTENTION_MASK: attention_mask,
            graphs.IMAGE_EMBEDS: np.repeat(image_embeds, 2, axis=0)})
        similarities = [m.itc_similarity for m in runtime.match(scenes / row["id"], texts)]
        assert text_features @ embedding == pytest.approx(similarities, abs=1e-5)


def test_the_embedding_is_blips_itc_image_vector_in_pytorch(model, scenes):
    """`normalize(vision_proj(image_embeds[:, 0]))` on the PyTorch retrieval model the graphs came from."""
    import torch
    from transformers import BlipImageProcessorPil

    from plugins.blip import fixture
    from plugins.blip.checkpoint import load_blip_source

    retrieval = load_blip_source([fixture.checkpoint_path()]).retrieval
    settings = json.loads((model / "manifest.json").read_text())["preprocessing"]
    size = settings["image_size"]
    processor = BlipImageProcessorPil(size={"height": size, "width": size}, image_mean=settings["mean"],
                                      image_std=settings["std"])
    names = scene_ids(scenes)[:8]
    with torch.no_grad():
        pixel_values = processor([Image.open(scenes / name) for name in names], return_tensors="pt").pixel_values
        embeds = retrieval.vision_model(pixel_values=pixel_values).last_hidden_state
        want = torch.nn.functional.normalize(retrieval.vision_proj(embeds[:, 0]), dim=-1).numpy()

    got = BlipRuntime(model, threads=2).embedding([scenes / name for name in names])

    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4


def stem(row_id: str) -> str:
    return Path(row_id).name.split(".")[0]


@pytest.fixture(scope="module")
def subset(scenes) -> list[str]:
    return scene_ids(scenes)[:24]


def test_a_text_file_and_parquet_and_webdataset_shards_give_the_same_rows(model, scenes, subset, expected, tmp_path):
    by_stem = {stem(name): expected[name] for name in subset}
    listing = tmp_path / "list.txt"
    listing.write_text("# scenes to caption\n" + "".join(f"scenes/{name}\n\n" for name in subset))
    shutil.copytree(scenes, tmp_path / "scenes")
    paths = tmp_path / "paths.parquet"
    pq.write_table(pa.table({"path": [f"scenes/{name}" for name in subset]}), paths)
    images = tmp_path / "images.parquet"
    pq.write_table(pa.table({"key": [stem(name) for name in subset],
                             "image": [(scenes / name).read_bytes() for name in subset]}), images, row_group_size=10)
    shards = []
    for number, part in enumerate((subset[:10], subset[10:])):  # img2dataset's layout: key.png, key.txt, key.json
        shards.append(tmp_path / f"{number:05d}.tar")
        with tarfile.open(shards[-1], "w") as tar:
            for name in part:
                for suffix, data in ((".png", (scenes / name).read_bytes()), (".txt", b"a caption"), (".json", b"{}")):
                    member = tarfile.TarInfo(stem(name) + suffix)
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))

    for inputs, extra in (([listing], []), ([paths], []), ([images], ["--id-column", "key"]), (shards, [])):
        result = tmp_path / f"result-{inputs[0].stem}"
        done = bulk(model, *inputs, "-o", result, "--shard-size", 7, *extra)
        assert done.returncode == 0, done.stderr
        rows = read_rows(result)
        ids = [row["id"] for row in rows]
        assert ids == {"list": [f"scenes/{n}" for n in subset], "paths": [f"scenes/{n}" for n in subset],
                       "images": [stem(n) for n in subset], "00000": [stem(n) for n in subset]}[inputs[0].stem]
        assert_rows_match(rows, by_stem, key=stem)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds one row of pixels: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * (3 * width + 1)))
            + chunk(b"IEND", b""))


def test_bad_inputs_are_error_rows_and_the_others_are_right(model, scenes, subset, expected, tmp_path):
    good = subset[:5]
    corrupt = tmp_path / "corrupt.png"
    data = (scenes / good[0]).read_bytes()
    corrupt.write_bytes(data[: len(data) * 2 // 3])  # cut short: the header reads, the pixels do not
    (tmp_path / "text.png").write_text("this is a text file, not a picture\n")
    (tmp_path / "bomb.png").write_bytes(png_header(30000, 30000))
    listing = tmp_path / "inputs.txt"
    bad = ["corrupt.png", "text.png", "missing.png", "bomb.png"]
    listing.write_text("\n".join([str(scenes / good[0]), *bad, *(str(scenes / name) for name in good[1:])]) + "\n")

    done = bulk(model, listing, "-o", tmp_path / "result", "--batch", 4)

    assert done.returncode == 0, done.stderr
    rows = {row["id"]: row for row in read_rows(tmp_path / "result")}
    assert len(rows) == 9
    errors = {name: rows[name]["error"] for name in bad}
    assert "not an image Pillow can read" in errors["corrupt.png"] and "truncated" in errors["corrupt.png"]
    assert "not an image Pillow can read" in errors["text.png"]
    assert "no such image file" in errors["missing.png"]
    assert "decompression bomb" in errors["bomb.png"]
    assert all(rows[name]["caption"] is None and rows[name]["embedding"] is None for name in bad)
    assert_rows_match([{**rows[str(scenes / n)], "id": n} for n in good], {n: expected[n] for n in good})
    summary = json.loads((tmp_path / "result" / "_summary.json").read_text())
    assert (summary["done"], summary["failed"]) == (5, 4)


def run_until_half_then_kill(args: list[str], result: Path, env: dict[str, str] | None = None) -> None:
    """Start `convert bulk`, SIGKILL its whole process group once about half the shards exist."""
    process = subprocess.Popen([sys.executable, "-m", "converter_core", "bulk", *map(str, args)], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + 300
        while len(list(result.glob("part-*.parquet"))) < SCENES // SHARD // 2:
            assert process.poll() is None, f"the run ended before it was killed: {process.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no shards appeared"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.stderr.close()
    left = len(list(result.glob("part-*.parquet")))
    assert left < SCENES // SHARD, "the run finished before it was killed"


def assert_resumed(result: Path, done: subprocess.CompletedProcess[str], uninterrupted: Path,
                   earlier: int = SCENES // SHARD // 2) -> None:
    assert done.returncode == 0, done.stderr
    summary = json.loads((result / "_summary.json").read_text())
    assert summary["shards"]["earlier"] >= earlier and summary["shards"]["missing"] == 0 and summary["complete"]
    rows, reference = read_rows(result), read_rows(uninterrupted)
    assert [row["id"] for row in rows] == [row["id"] for row in reference]
    for row, want in zip(rows, reference):
        assert (row["caption"], row["token_ids"], row["error"]) == (want["caption"], want["token_ids"], want["error"])
        assert np.abs(np.subtract(row["embedding"], want["embedding"])).max() <= 1e-5
    assert not [p.name for p in result.iterdir() if p.name.startswith(".")], "a killed run's temporary files stayed"


def test_a_killed_run_resumes_to_the_rows_of_an_uninterrupted_one(model, scenes, uninterrupted, tmp_path):
    result = tmp_path / "result"
    args = [model, scenes, "-o", result, "--shard-size", SHARD, "--workers", 2, "--threads", 1]
    run_until_half_then_kill(args, result)

    assert_resumed(result, bulk(*args), uninterrupted[0])


def worker_processes(pid: int) -> list[int]:
    """The pool's worker processes among `pid`'s children (multiprocessing's spawned `spawn_main`)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def test_a_worker_that_dies_is_exit_1_and_a_rerun_finishes_the_job(model, scenes, uninterrupted, tmp_path):
    result = tmp_path / "result"
    args = [model, scenes, "-o", result, "--shard-size", SHARD, "--workers", 2, "--threads", 1]
    process = subprocess.Popen([sys.executable, "-m", "converter_core", "bulk", *map(str, args)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(result.glob("part-*.parquet")):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before a worker was killed"
        time.sleep(0.05)
    workers = worker_processes(process.pid)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    out, err = process.communicate(timeout=300)

    assert process.returncode == 1, err
    assert "a worker process died" in err and "run the same command again" in err
    summary = json.loads((result / "_summary.json").read_text())
    assert not summary["complete"] and summary["shards"]["missing"] > 0
    assert_resumed(result, bulk(*args), uninterrupted[0], earlier=1)


def test_other_options_against_a_result_are_exit_2_unless_overwrite(model, scenes, subset, tmp_path):
    listing = tmp_path / "inputs.txt"
    listing.write_text("".join(f"{scenes / name}\n" for name in subset[:3]))
    result = tmp_path / "result"
    assert bulk(model, listing, "-o", result).returncode == 0

    refused = bulk(model, listing, "-o", result, "--beams", 2)
    assert refused.returncode == 2
    assert "options.beams: 1 -> 2" in refused.stderr and "--overwrite" in refused.stderr

    again = bulk(model, listing, "-o", result, "--beams", 2, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert json.loads((result / "_job.json").read_text())["options"]["beams"] == 2
    assert len(read_rows(result)) == 3


def test_another_model_against_a_result_is_exit_2(model, scenes, subset, tmp_path):
    """The same images and options with a model of other graphs (here: one without a text encoder)."""
    listing = tmp_path / "inputs.txt"
    listing.write_text("".join(f"{scenes / name}\n" for name in subset[:3]))
    result = tmp_path / "result"
    assert bulk(model, listing, "-o", result, "--task", "caption").returncode == 0
    other = tmp_path / "captioning-only"
    shutil.copytree(model, other)
    manifest = json.loads((other / "manifest.json").read_text())
    del manifest["modules"]["text_encoder"]
    (other / "manifest.json").write_text(json.dumps(manifest))

    refused = bulk(other, listing, "-o", result, "--task", "caption")

    assert refused.returncode == 2
    assert "model differs" in refused.stderr
    assert bulk(other, listing, "-o", result, "--task", "embed").returncode == 2  # and it cannot embed


def test_a_folder_that_is_not_a_result_is_never_written_into(model, scenes, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    refused = bulk(model, scenes, "-o", tmp_path / "mine", "--overwrite")
    assert refused.returncode == 2 and "not a `convert bulk` result" in refused.stderr
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_a_second_run_on_a_result_another_live_run_holds_is_exit_2(model, scenes, subset, tmp_path):
    listing = tmp_path / "paths.txt"
    listing.write_text("".join(f"{scenes / name}\n" for name in subset[:4]))
    holder = subprocess.Popen(["sleep", "60"])  # a live process that is not this run
    start = Path(f"/proc/{holder.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    lock = tmp_path / ".result.lock"
    try:
        lock.write_text(json.dumps({"pid": holder.pid, "start": start}))
        refused = bulk(model, listing, "-o", tmp_path / "result")
        assert refused.returncode == 2 and f"another run (pid {holder.pid}) is writing" in refused.stderr
        assert lock.is_file() and not (tmp_path / "result").exists()  # neither the lock nor RESULT touched
    finally:
        holder.kill()
        holder.wait()
    # Its owner gone, the lock is stale: the next run takes it, finishes, and leaves no lock behind.
    done = bulk(model, listing, "-o", tmp_path / "result")
    assert done.returncode == 0, done.stderr
    assert len(read_rows(tmp_path / "result")) == 4 and not lock.exists()


def test_more_workers_times_threads_than_cores_is_exit_2(model, scenes, tmp_path):
    cores = usable_cpus()
    refused = bulk(model, scenes, "-o", tmp_path / "result", "--workers", cores + 1, "--threads", 2)
    assert refused.returncode == 2
    assert f"--workers {cores + 1} x --threads 2 = {2 * cores + 2} CPUs" in refused.stderr
    assert f"gives this process {cores}" in refused.stderr
    assert not (tmp_path / "result").exists()


# --------------------------------------------------------------------------------------------
# Ray mode
# --------------------------------------------------------------------------------------------


def ray_env() -> dict[str, str]:
    return {**RAY_ENV, "RAY_AUTH_TOKEN": secrets.token_hex(16)}


def test_ray_local_gives_the_rows_of_local_mode(model, scenes, uninterrupted, tmp_path):
    result = tmp_path / "result"
    done = bulk(model, scenes, "-o", result, "--shard-size", SHARD, "--ray", "local", "--workers", 2, "--threads", 1,
                env=ray_env())
    assert done.returncode == 0, done.stderr
    rows, reference = read_rows(result), read_rows(uninterrupted[0])
    assert [row["id"] for row in rows] == [row["id"] for row in reference]
    for row, want in zip(rows, reference):
        assert (row["caption"], row["token_ids"], row["model"]) == (want["caption"], want["token_ids"], want["model"])
        assert np.abs(np.subtract(row["embedding"], want["embedding"])).max() <= 1e-5
    assert json.loads((result / "_summary.json").read_text())["options"]["mode"] == "ray"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """`ray start --head` on loopback, 2 CPUs, in its own process group; its address and client env."""
    env = ray_env()
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    ray = Path(sys.executable).parent / "ray"
    log = open(Path(temp) / "head.log", "w")  # open while the head runs
    head = subprocess.Popen(
        [str(ray), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--num-cpus", "2", "--include-dashboard", "false", "--temp-dir", temp,
         "--object-store-memory", str(200 * 1024**2)],
        env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([str(ray), "status", "--address", address], env={**os.environ, **env},
                             capture_output=True).returncode != 0:
            assert head.poll() is None, (Path(temp) / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the Ray head did not come up"
            time.sleep(1)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_a_killed_job_on_a_running_ray_cluster_resumes_to_the_rows_of_local_mode(
        model, scenes, uninterrupted, ray_cluster, tmp_path):
    address, env = ray_cluster
    result = tmp_path / "result"
    args = [model, scenes, "-o", result, "--shard-size", SHARD, "--ray", address, "--workers", 2, "--threads", 1]
    run_until_half_then_kill(args, result, env)

    assert_resumed(result, bulk(*args, env=env), uninterrupted[0])


def test_more_cpus_than_the_ray_cluster_has_is_exit_2(model, scenes, ray_cluster, tmp_path):
    address, env = ray_cluster
    refused = bulk(model, scenes, "-o", tmp_path / "result", "--ray", address, "--workers", 3, "--threads", 1, env=env)
    assert refused.returncode == 2, refused.stderr
    assert "--workers 3 x --threads 1 = 3 CPUs, but the Ray cluster" in refused.stderr and "has 2" in refused.stderr
