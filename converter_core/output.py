"""Writing an output directory: all of it appears at once, or nothing changes; nothing not ours is lost.

A run stages its output in `.OUT.partial-<pid>-*` beside OUT and swaps it in by two renames (OUT
aside, staging in). Like a journaled install, the swap is announced first in `.OUT.swap.json`, so
that a run killed between the renames is finished (or undone) by the next one, and stale staging
folders of dead runs are removed. A lock file (`.OUT.lock`, as git's `index.lock`) keeps two runs
off one OUT. An existing OUT is replaced only when its manifest is one of ours and it holds no file
that manifest does not list; inputs of the run may not lie inside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from converter_core.errors import EnvironmentFailure, InputError

MANIFEST_NAME = "manifest.json"
TOOL_NAME = "vlm-converter"
STAGING_MARK = ".vlm-converter-staging"  # inside every staging folder we make, so we only ever remove ours
LISTED = 8  # files named in a refusal


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stage_files(folder: Path) -> list[str]:
    """Every entry below `folder` that is not a directory, relative, with '/' separators."""
    found = []
    for root, dirs, names in os.walk(folder):
        for name in names + [d for d in dirs if (Path(root) / d).is_symlink()]:
            found.append((Path(root) / name).relative_to(folder).as_posix())
    return sorted(found)


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:LISTED])
    return shown + (f" and {len(names) - LISTED} more" if len(names) > LISTED else "")


def listed_files(manifest: dict[str, Any]) -> set[str]:
    """The files one of our manifests says the output holds (older manifests: what their tables name)."""
    if isinstance(manifest.get("files"), list):
        return {str(name) for name in manifest["files"]} | {MANIFEST_NAME}
    listed = {MANIFEST_NAME, *map(str, manifest.get("assets") or ())}
    for module in (manifest.get("modules") or {}).values():
        if isinstance(module, dict):
            listed.add(str(module.get("file")))
            listed |= {str(d.get("file")) for d in module.get("data_files") or () if isinstance(d, dict)}
    for backend in (manifest.get("backends") or {}).values():
        if isinstance(backend, dict):
            listed |= {str(name) for name in backend.get("files") or ()}
    return listed


def _ours(out_dir: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((out_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    tool = manifest.get("tool") if isinstance(manifest, dict) else None
    return manifest if isinstance(tool, dict) and tool.get("name") == TOOL_NAME else None


def check_target(out_dir: Path, inputs: Iterable[Path] = ()) -> None:
    """Refuse a target we would have to destroy something in, or could not write: a file, a link, a
    folder that is not our output, our output holding files its manifest does not list, a folder
    holding one of the run's inputs."""
    if out_dir.is_symlink():
        raise InputError(f"{out_dir} is a symbolic link; give the real path of the output directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} exists and is not a directory")
    for source in inputs:
        if source is not None and _inside(Path(source), out_dir):
            raise InputError(f"{source} lies inside the output directory {out_dir}, which the conversion replaces; "
                             "choose another -o or move the input")
    parent = out_dir.absolute().parent
    if parent.exists() and not parent.is_dir():
        raise InputError(f"cannot write {out_dir}: {parent} is not a directory")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    present = stage_files(out_dir)
    manifest = _ours(out_dir)
    if manifest is None:
        raise InputError(f"{out_dir} is not empty and was not written by {TOOL_NAME} (no {MANIFEST_NAME} of ours): "
                         f"refusing to replace {_listing(present)}; choose another -o")
    foreign = [name for name in present if name not in listed_files(manifest) | {STAGING_MARK}]
    if foreign:
        raise InputError(f"{out_dir} holds files its manifest does not list, which replacing it would lose: "
                         f"{_listing(foreign)}; move them away or choose another -o")


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------
# Journal, lock and leftovers
# ------------------------------------------------------------------------------------------------


def _journal(out_dir: Path) -> Path:
    return out_dir.with_name(f".{out_dir.name}.swap.json")


def _lock(out_dir: Path) -> Path:
    return out_dir.with_name(f".{out_dir.name}.lock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _process_start(pid: int) -> str:
    """The kernel's start time of `pid` (so a reused pid is not taken for the lock's owner)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _owner_alive(record: dict[str, Any]) -> bool:
    pid = record.get("pid")
    return isinstance(pid, int) and _alive(pid) and record.get("start", "") == _process_start(pid)


@contextlib.contextmanager
def locked(out_dir: Path) -> Iterator[None]:
    """Hold `.OUT.lock` beside `out_dir` while the block runs; InputError while a live process holds it."""
    lock = _lock(out_dir)
    me = {"pid": os.getpid(), "start": _process_start(os.getpid())}
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(lock.read_text())
            except (OSError, ValueError):
                owner = {}
            if _owner_alive(owner):
                raise InputError(f"another run (pid {owner['pid']}) is writing {out_dir}; wait for it, "
                                 f"or remove {lock} if that process is not ours") from None
            lock.unlink(missing_ok=True)  # its owner died: the lock is stale
            continue
        with os.fdopen(descriptor, "w") as handle:
            json.dump(me, handle)
        break
    else:
        raise InputError(f"could not take the lock {lock}")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def recover(out_dir: Path) -> None:
    """Finish or undo the swap of a run that died between its renames, then remove the staging
    folders of dead runs. Called by every run before it looks at OUT (holding the lock)."""
    out_dir = out_dir.absolute()
    journal = _journal(out_dir)
    if journal.exists():
        try:
            record = json.loads(journal.read_text())
        except (OSError, ValueError):
            record = {}
        staging = out_dir.with_name(str(record.get("staging", "")))
        retired = out_dir.with_name(str(record.get("retired", ""))) / "previous"
        if not out_dir.exists():
            if record.get("staging") and (staging / MANIFEST_NAME).is_file():
                os.rename(staging, out_dir)  # the new output was complete: finish the swap
            elif record.get("retired") and retired.is_dir():
                os.rename(retired, out_dir)  # undo: the earlier output comes back
        journal.unlink(missing_ok=True)
    for leftover in out_dir.parent.glob(f".{out_dir.name}.*-*"):
        mark = leftover / STAGING_MARK
        if leftover.is_dir() and not leftover.is_symlink() and mark.is_file():
            try:
                owner = json.loads(mark.read_text())
            except (OSError, ValueError):
                owner = {}
            if not _owner_alive(owner):
                shutil.rmtree(leftover, ignore_errors=True)


def _made_by_us(folder: Path) -> None:
    (folder / STAGING_MARK).write_text(json.dumps({"pid": os.getpid(), "start": _process_start(os.getpid())}))


def _sync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the swap's renames are done: a swap half done is the one state
    that loses the old output."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _swap_in(staging: Path, out_dir: Path) -> None:
    (staging / STAGING_MARK).unlink()  # before the renames: a staging folder without it is never removed
    os.chmod(staging, 0o755)
    journal = _journal(out_dir)
    with _signals_held():
        if not out_dir.exists():
            os.rename(staging, out_dir)
            return
        retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-{os.getpid()}-", dir=out_dir.parent))
        _made_by_us(retired)
        journal.write_text(json.dumps({"staging": staging.name, "retired": retired.name, "pid": os.getpid()}))
        _sync(journal)
        os.rename(out_dir, retired / "previous")
        os.rename(staging, out_dir)
        _sync(out_dir.parent)
        journal.unlink()
    shutil.rmtree(retired, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(out_dir: Path, inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a staging directory beside `out_dir`; on success it replaces `out_dir`.

    On any exception (Ctrl-C and SIGTERM included) the staging directory is removed and `out_dir`,
    with an earlier good conversion in it, is left as it was.
    """
    out_dir = out_dir.absolute()
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EnvironmentFailure(f"cannot write {out_dir}: {exc.strerror or exc}") from exc
    with locked(out_dir):
        recover(out_dir)
        check_target(out_dir, inputs)
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-{os.getpid()}-", dir=out_dir.parent))
        except OSError as exc:
            raise EnvironmentFailure(f"cannot write {out_dir.parent}: {exc.strerror or exc}") from exc
        try:
            _made_by_us(staging)
            yield staging
            _swap_in(staging, out_dir)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


def ours_manifest_text(files: list[str]) -> str:
    """A minimal manifest of ours listing `files` (what a test or a tool writing by hand needs)."""
    return json.dumps({"tool": {"name": TOOL_NAME}, "format_version": 1, "files": files})
