"""A deployment that only runs the graphs installs without torch: the base install is the runtime.

The test builds a fresh virtual environment from this checkout without the `export` extra, as a
serving machine would, and captions with an output that the full install converted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from converter_core.pipeline import ConvertOptions, convert
from plugins.blip import fixture
from plugins.blip.conversion import load_source
from plugins.blip.recipes import BlipConversion
from plugins.blip.runtime import BlipRuntime
from tests.conftest import REPO


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("base-install")
    venv = root / "venv"
    # A copy of the checkout, so that pip's in-tree build leaves nothing in it.
    checkout = shutil.copytree(REPO, root / "checkout", ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", "node_modules", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    installed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(checkout)],
                               capture_output=True, text=True, timeout=900, env=env)
    assert installed.returncode == 0, installed.stderr[-3000:]
    return venv


def run_in(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env={**env, "COLUMNS": "200"})


def test_the_base_install_has_no_torch_and_captions_like_the_full_install(base_venv: Path, tmp_path: Path):
    out = tmp_path / "out"
    convert(BlipConversion(load_source([], False, "base", None, 0, None)), ConvertOptions(out, validate=False))
    images = []
    for index, scene in enumerate(fixture.heldout_scenes(3)):
        images.append(tmp_path / f"scene{index}.png")
        fixture.draw(scene).save(images[-1])
    expected = BlipRuntime(out).caption(images, beams=3)

    # Run from a folder outside the checkout, so that the installed copy is what imports.
    probe = run_in(base_venv, "python", "-c", "import importlib.util as u; "
                   "print([m for m in ('torch', 'transformers', 'onnxsim') if u.find_spec(m)])", cwd=tmp_path)
    assert probe.returncode == 0 and probe.stdout.strip() == "[]", probe.stderr
    captioned = run_in(base_venv, "convert", "caption", str(out), *map(str, images), "--beams", "3", "--json",
                       cwd=tmp_path)
    assert captioned.returncode == 0, captioned.stderr
    rows = json.loads(captioned.stdout)
    assert [row["token_ids"] for row in rows] == [c.token_ids for c in expected]
    assert [row["caption"] for row in rows] == [c.text for c in expected]

    matched = run_in(base_venv, "convert", "match", str(out), str(images[0]), expected[0].text, "--json", cwd=tmp_path)
    assert matched.returncode == 0, matched.stderr


def test_converting_without_the_export_extra_is_exit_2_naming_it(base_venv: Path, tmp_path: Path):
    result = run_in(base_venv, "convert", "blip", "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    message = " ".join(result.stderr.split())
    assert "install the export extra: pip install 'vlm-converter[export]'" in message
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
    listing = run_in(base_venv, "convert", "backends", cwd=tmp_path)  # the listings need no torch either
    assert listing.returncode == 0, listing.stderr
