"""What exit 0 and "passed" promise, tried as a hostile user would, on the toy plugin's model.

Every graph in the output is checked as it is on disk, after the last pass; a plugin cannot end the
process with success; a run never deletes a file it does not own, and a killed run leaves
nothing behind that the next run cannot finish or clean up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from converter_core.output import sha256_file
from tests.conftest import REPO, run_cli


@pytest.fixture
def toy(plugin_site):
    plugin_site("toy_vlm_plugin", "toy-vlm-plugin", "toy")
    import toy_vlm_plugin

    return toy_vlm_plugin


def one_line(text: str) -> str:
    return " ".join(text.split())


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


# ------------------------------------------------------------------------------------------------
# False successes
# ------------------------------------------------------------------------------------------------


def test_a_pass_that_claims_kept_but_writes_other_numbers_fails_the_final_validation(toy, tmp_path: Path):
    out = tmp_path / "out"
    result = run_cli("toy", "-o", str(out), "--passes", "head=toy-liar")
    assert result.returncode == 1, result.stderr
    head = manifest(out)["modules"]["head"]
    assert head["passes"][0]["kept"] is True  # the pass said so; the file on disk says otherwise
    validation = head["validation"]
    assert validation["status"] == "failed" and validation["after_pass"] == "toy-liar"
    assert validation["sha256"] == head["sha256"] == sha256_file(out / head["file"])
    assert "head after pass toy-liar: output 'logits'" in validation["reason"]
    assert head["export_validation"]["status"] == "passed"  # the export itself was fine
    assert "after pass toy-liar" in one_line(result.stderr)


def test_a_pass_that_writes_an_unloadable_graph_fails_naming_the_pass(toy, tmp_path: Path):
    out = tmp_path / "out"
    result = run_cli("toy", "-o", str(out), "--passes", "encoder=toy-garbage")
    assert result.returncode == 1
    validation = manifest(out)["modules"]["encoder"]["validation"]
    assert validation["status"] == "failed"
    assert "after pass toy-garbage" in validation["reason"] and "ONNX Runtime cannot load" in validation["reason"]


def test_nan_in_a_weight_no_validation_input_reaches_fails_naming_the_tensor(toy, tmp_path: Path):
    out = tmp_path / "out"
    result = run_cli("toy", "-o", str(out), "--seed", "0", "--poison", "unused_table")
    assert result.returncode == 1, result.stderr
    validation = manifest(out)["modules"]["head"]["validation"]
    assert validation["status"] == "failed"
    assert "weights hold NaN or Inf" in validation["reason"] or "NaN or Inf" in validation["reason"]
    assert "unused_table" in validation["reason"]
    # The outputs themselves matched PyTorch: only the weight check could see it.
    assert validation["outputs"]["logits"]["max_abs_diff"] < 1e-5


@pytest.mark.parametrize("plugin, error", [
    ("exiting_plugin", "import failed: SystemExit"),
    ("interrupting_plugin", "import failed: KeyboardInterrupt"),
])
def test_a_plugin_that_exits_at_import_is_reported_and_the_rest_keep_working(toy, plugin_site, tmp_path, plugin, error):
    plugin_site(plugin, plugin.replace("_", "-"), plugin.split("_")[0])
    listed = run_cli("plugins", "--json")
    assert listed.returncode == 0, listed.stderr
    failed = {row["name"]: row for row in json.loads(listed.stdout)["failed"]}
    assert error in failed[plugin.split("_")[0]]["error"]
    converted = run_cli("toy", "-o", str(tmp_path / "out"))
    assert converted.returncode == 0, converted.stderr
    assert manifest(tmp_path / "out")["modules"]["head"]["validation"]["status"] == "passed"


def test_a_hook_that_calls_sys_exit_is_exit_2_naming_plugin_and_hook(toy, plugin_site, tmp_path: Path):
    plugin_site("exit_in_hook_plugin", "exit-in-hook", "exit-in-hook")
    result = run_cli("toy", "-o", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    message = one_line(result.stderr)
    assert "plugin exit-in-hook (exit-in-hook) failed in converter_split_model: SystemExit" in message
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_no_validate_with_require_validation_is_a_usage_error(toy, tmp_path: Path):
    result = run_cli("toy", "-o", str(tmp_path / "out"), "--no-validate", "--require-validation")
    assert result.returncode == 2
    assert "--require-validation cannot be met with --no-validate" in one_line(result.stderr)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# Data loss
# ------------------------------------------------------------------------------------------------


def test_a_folder_with_someone_elses_manifest_is_never_replaced(toy, tmp_path: Path):
    out = tmp_path / "project"
    (out / "src").mkdir(parents=True)
    (out / "manifest.json").write_text('{"name": "my-web-app", "version": 3}')
    (out / "src" / "main.py").write_text("print('precious')")
    result = run_cli("toy", "-o", str(out))
    assert result.returncode == 2
    message = one_line(result.stderr)
    assert "was not written by vlm-converter" in message and "manifest.json" in message
    assert (out / "src" / "main.py").read_text() == "print('precious')"


def test_an_output_with_a_file_its_manifest_does_not_list_is_refused_naming_it(toy, tmp_path: Path):
    out = tmp_path / "out"
    assert run_cli("toy", "-o", str(out)).returncode == 0
    (out / "notes.txt").write_text("my only copy")
    (out / "cpu").mkdir()
    (out / "cpu" / "tuned.onnx").write_bytes(b"mine")
    result = run_cli("toy", "-o", str(out))
    assert result.returncode == 2
    message = one_line(result.stderr)
    assert "which replacing it would lose" in message and "notes.txt" in message and "cpu/tuned.onnx" in message
    assert (out / "notes.txt").read_text() == "my only copy"
    (out / "notes.txt").unlink()
    (out / "cpu" / "tuned.onnx").unlink()
    (out / "cpu").rmdir()
    assert run_cli("toy", "-o", str(out)).returncode == 0  # every file is ours again: replaced


KILL_BETWEEN_RENAMES = """
import os, sys
from pathlib import Path
from converter_core import output
renames = []
real = os.rename
def rename(a, b):
    real(a, b)
    renames.append((a, b))
    if len(renames) == 1:  # the old output is moved away, the new one not yet in: die here
        os._exit(137)
output.os.rename = rename
out = Path(sys.argv[1])
with output.staged_directory(out) as stage:
    (stage / "manifest.json").write_text(output.ours_manifest_text(["manifest.json", "new.txt"]))
    (stage / "new.txt").write_text("new")
"""


def _staging_leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_a_kill_between_the_two_renames_is_finished_by_the_next_run(toy, tmp_path: Path):
    out = tmp_path / "out"
    assert run_cli("toy", "-o", str(out)).returncode == 0
    killed = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(out)], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert killed.returncode == 137, killed.stderr
    assert not out.exists()  # the state a kill leaves: the old output hidden, the new one staged
    assert _staging_leftovers(tmp_path, "out")

    from converter_core.output import recover

    recover(out)  # what every run does first: the journal says the new output was complete
    assert (out / "new.txt").read_text() == "new"
    assert _staging_leftovers(tmp_path, "out") == [".out.lock"]  # the dead run's lock: the next run takes it over
    assert run_cli("toy", "-o", str(out)).returncode == 0
    assert _staging_leftovers(tmp_path, "out") == []
    assert manifest(out)["model_type"] == "toy"


def _wait_for(predicate, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT])
def test_a_terminated_run_leaves_the_earlier_output_and_no_staging(toy, tmp_path: Path, how):
    out = tmp_path / "out"
    assert run_cli("toy", "-o", str(out)).returncode == 0
    before = manifest(out)
    process = subprocess.Popen([sys.executable, "-m", "converter_core", "toy", "-o", str(out), "--seed", "3"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: any(name.startswith(".out.partial-") for name in os.listdir(tmp_path)))
    process.send_signal(how)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + how, stderr
    assert manifest(out) == before
    assert _staging_leftovers(tmp_path, "out") == []


def test_the_staging_folder_of_a_killed_run_is_removed_by_the_next_one(toy, tmp_path: Path):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "converter_core", "toy", "-o", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(lambda: any(name.startswith(".out.partial-") for name in os.listdir(tmp_path)))
    process.kill()
    process.wait(timeout=60)
    assert any(name.startswith(".out.partial-") for name in _staging_leftovers(tmp_path, "out"))
    unrelated = tmp_path / ".out.partial-keep-me"  # named like ours, but not ours: never touched
    unrelated.mkdir()
    assert run_cli("toy", "-o", str(out)).returncode == 0
    assert _staging_leftovers(tmp_path, "out") == [unrelated.name]


def test_an_output_path_that_cannot_be_written_is_exit_2(toy, tmp_path: Path, monkeypatch, capsys):
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    result = run_cli("toy", "-o", str(dangling))
    assert result.returncode == 2 and "symbolic link" in one_line(result.stderr), result.stderr
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    result = run_cli("toy", "-o", str(not_a_folder / "out"))
    assert result.returncode == 2 and "cannot write" in one_line(result.stderr), result.stderr

    # A read-only parent, as the operating system reports it (root is not stopped by permission bits).
    import errno
    import tempfile

    from converter_core.cli import run
    from converter_core.plugins import get_plugin_manager

    get_plugin_manager.cache_clear()  # an earlier test in this process may have loaded the host without toy

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system", str(tmp_path))

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    try:
        assert run(["toy", "-o", str(tmp_path / "ro")]) == 2
    finally:
        get_plugin_manager.cache_clear()  # later tests must not see this test's toy plugin
    err = one_line(capsys.readouterr().err)
    assert "cannot write" in err and "Read-only file system" in err and "Traceback" not in err
