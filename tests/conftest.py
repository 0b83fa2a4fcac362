"""Installing test plugins as real distributions: a package and a dist-info with an entry point."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

THIRD_PARTY = Path(__file__).parent / "third_party"
REPO = Path(__file__).parent.parent


def install_plugin(site: Path, module: str, distribution: str, entry_name: str, version: str = "0.1.0") -> None:
    """Lay out `module` and its dist-info in `site` as pip would for a one-module distribution."""
    site.mkdir(parents=True, exist_ok=True)
    shutil.copy(THIRD_PARTY / f"{module}.py", site / f"{module}.py")
    dist_info = site / f"{distribution.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
    (dist_info / "entry_points.txt").write_text(f"[vlm_converter]\n{entry_name} = {module}\n")
    (dist_info / "RECORD").write_text(f"{module}.py,,\n{dist_info.name}/METADATA,,\n")


@pytest.fixture
def plugin_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """Install test plugins into a directory on sys.path (for this process and for subprocesses)."""
    site = tmp_path / "site"

    def install(module: str, distribution: str, entry_name: str) -> Path:
        install_plugin(site, module, distribution, entry_name)
        monkeypatch.syspath_prepend(str(site))
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
        return site

    return install


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `convert` as a user would, in a fresh process (`env`: variables added to this one's)."""
    return subprocess.run(
        [sys.executable, "-m", "converter_core", *args],
        capture_output=True, text=True, cwd=cwd, timeout=600, env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def prepare(backend, modules, out_dir: Path, options: dict | None = None):
    """`backend.prepare` as the pipeline calls it: options typed by the backend's own dataclass."""
    from converter_core.options import resolve_backend_options
    from converter_core.specs import BackendContext

    typed = resolve_backend_options({backend.name: backend.options_type}, options or {})[backend.name]
    return backend.prepare(modules, out_dir, typed, BackendContext("test"))


def validate(backend, artifacts, out_dir: Path, references):
    from converter_core.specs import BackendContext

    return backend.validate(artifacts, out_dir, references, BackendContext("test"))
