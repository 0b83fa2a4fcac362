"""A real `tritonserver`, found on this machine and started on loopback for a live check.

Where the binary comes from, in order: the backend option `server`, `tritonserver` on PATH, the
Triton container's `/opt/tritonserver/bin/tritonserver`, and the one the `nvidia-pytriton` wheel
ships. The wheel's binary needs its bundled libraries (`nvidia_pytriton.libs`) on LD_LIBRARY_PATH,
and a backend directory holding the Python backend with the stub built for this interpreter's
Python version (`pytriton/tritonserver/python_backend_stubs/3.X/`); we lay that out in a temporary
folder, as pytriton itself does. It has no ONNX Runtime backend: `Server.backends` says which
backends a server can load, so that a check can say what it could not run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CONTAINER_BINARY = Path("/opt/tritonserver/bin/tritonserver")
READY_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Server:
    """A tritonserver binary and how to run it: extra environment, and where its backends are."""

    binary: Path
    origin: str
    backend_dir: Path | None = None  # None: lay the pytriton wheel's Python backend out at start
    env: dict[str, str] = field(default_factory=dict)
    backends: tuple[str, ...] = ()


def _pytriton_root() -> Path | None:
    try:
        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _backends_in(directory: Path) -> tuple[str, ...]:
    return tuple(sorted(p.name for p in directory.iterdir() if p.is_dir())) if directory.is_dir() else ()


def _stub(root: Path) -> Path:
    return root / "tritonserver" / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" \
        / "triton_python_backend_stub"


def find_server(given: Path | None = None) -> tuple[Server | None, str]:
    """The tritonserver to validate with, or None and why there is none."""
    candidates: list[tuple[Path, str]] = []
    if given is not None:
        if not given.is_file():
            return None, f"no tritonserver at {given} (backend option server)"
        candidates.append((given, "backend option server"))
    else:
        on_path = shutil.which("tritonserver")
        if on_path:
            candidates.append((Path(on_path), "PATH"))
        if CONTAINER_BINARY.is_file():
            candidates.append((CONTAINER_BINARY, "the Triton container layout"))
    root = _pytriton_root()
    wheel_binary = root / "tritonserver" / "bin" / "tritonserver" if root else None
    for binary, origin in candidates:
        if wheel_binary is not None and binary.resolve() == wheel_binary.resolve():
            break
        backend_dir = binary.resolve().parent.parent / "backends"
        return Server(binary, origin, backend_dir if backend_dir.is_dir() else None,
                      backends=_backends_in(backend_dir)), f"tritonserver from {origin}: {binary}"
    if wheel_binary is None or not wheel_binary.is_file():
        return None, "no tritonserver binary found (none on PATH, no /opt/tritonserver, no nvidia-pytriton wheel)"
    if not _stub(root).is_file():
        return None, (f"the nvidia-pytriton wheel has no Python backend stub for Python "
                      f"{sys.version_info[0]}.{sys.version_info[1]}")
    libs = root.parent / "nvidia_pytriton.libs"
    library_path = os.pathsep.join(filter(None, [str(libs), os.environ.get("LD_LIBRARY_PATH")]))
    return (Server(wheel_binary, "the nvidia-pytriton wheel", None, {"LD_LIBRARY_PATH": library_path},
                   backends=_backends_in(root / "tritonserver" / "backends")),
            f"tritonserver from the nvidia-pytriton wheel: {wheel_binary}")


def _wheel_backends(root: Path, target: Path) -> Path:
    """The wheel's Python backend with this Python's stub, as a backend directory."""
    python = target / "python"
    python.mkdir(parents=True)
    source = root / "tritonserver" / "backends" / "python"
    for item in source.iterdir():
        if item.is_file():
            shutil.copy2(item, python / item.name)
    shutil.copy2(_stub(root), python / "triton_python_backend_stub")
    return target


def free_port() -> int:
    # The port is free when we look; tritonserver binds it a moment later. Good enough on loopback.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerFailed(RuntimeError):
    """tritonserver exited or never became ready; the message carries the end of its log."""


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    # The start-up tables are noise; the lines that say what failed are not in them.
    return "\n".join(line for line in text if not line.startswith(("+", "|")))[-4000:] if text else ""


@contextlib.contextmanager
def running_server(server: Server, repository: Path, models: Sequence[str] | None = None,
                   env: dict[str, str] | None = None) -> Iterator[str]:
    """Start `server` on 127.0.0.1 with `repository` and yield its HTTP address ("127.0.0.1:PORT").

    `models`: load only these (explicit model control); None loads every model. The server is
    stopped (its whole process group) when the block ends, whatever happens inside it.
    """
    import tritonclient.http as httpclient

    with tempfile.TemporaryDirectory(prefix="vlm-tritonserver-") as scratch_name:
        scratch = Path(scratch_name)
        backend_dir = server.backend_dir or _wheel_backends(_pytriton_root(), scratch / "backends")
        http_port = free_port()
        command = [str(server.binary), "--model-repository", str(repository), "--backend-directory", str(backend_dir),
                   "--http-address", "127.0.0.1", "--http-port", str(http_port), "--allow-grpc", "false",
                   "--allow-metrics", "false", "--exit-timeout-secs", "5", "--log-verbose", "0"]
        if models is not None:
            command += ["--model-control-mode", "explicit", *(f"--load-model={name}" for name in models)]
        environment = {**os.environ, **server.env, **(env or {})}
        caches_before = set(repository.rglob("__pycache__"))
        log_path = scratch / "tritonserver.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment,
                                       start_new_session=True, cwd=scratch)
        address = f"127.0.0.1:{http_port}"
        try:
            client = httpclient.InferenceServerClient(address)
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                if process.poll() is not None:
                    raise ServerFailed(f"tritonserver exited with code {process.returncode}: {_log_tail(log_path)}")
                with contextlib.suppress(Exception):
                    if client.is_server_ready():
                        break
                if time.monotonic() > deadline:
                    raise ServerFailed(f"tritonserver was not ready after {READY_TIMEOUT_S:.0f} s: "
                                       f"{_log_tail(log_path)}")
                time.sleep(0.25)
            client.close()
            yield address
        finally:
            _stop(process)
            # The stub's Python writes bytecode caches beside model.py whatever PYTHONDONTWRITEBYTECODE says;
            # those the run created go, so that the repository holds what prepare wrote and nothing else.
            for cache in set(repository.rglob("__pycache__")) - caches_before:
                shutil.rmtree(cache, ignore_errors=True)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)
