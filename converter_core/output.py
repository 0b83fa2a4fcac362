"""Writing an output directory atomically: all of it appears at once, or nothing changes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from converter_core.errors import InputError

MANIFEST_NAME = "manifest.json"


def check_target(out_dir: Path) -> None:
    """Refuse a target we would have to destroy: a file, or a directory that is not our output."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
        raise InputError(
            f"{out_dir} is not empty and holds no {MANIFEST_NAME}: refusing to replace a directory "
            "this tool did not write; choose another -o"
        )


@contextlib.contextmanager
def staged_directory(out_dir: Path) -> Iterator[Path]:
    """Yield a staging directory beside `out_dir`; on success it replaces `out_dir` by renames.

    On any exception (Ctrl-C included) the staging directory is removed and `out_dir`, with an
    earlier good conversion in it, is left as it was.
    """
    out_dir = out_dir.absolute()
    check_target(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield staging
        os.chmod(staging, 0o755)
        if out_dir.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.rename(out_dir, retired / "previous")
            os.rename(staging, out_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
