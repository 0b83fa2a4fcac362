"""What the `web` backend runs outside Python: ONNX Runtime Web under Node, a loopback server, headless Chromium.

The JavaScript lives beside this file (`package.json` pins onnxruntime-web and playwright-core;
`npm ci` in this folder installs them): `opcheck.mjs` creates an ONNX Runtime Web session per graph
under Node, with the same WASM binary the site ships; `drive.mjs` opens pages of a served site in
the Debian `chromium` package through playwright-core and returns what each page wrote into its
`#results` element.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import posixpath
import re
import shutil
import subprocess
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

HERE = Path(__file__).parent
NODE_MODULES = HERE / "node_modules"
ORT_WEB = NODE_MODULES / "onnxruntime-web"
# The smallest set that runs the WASM EP: the bundled ES module (its loader inlined) and the SIMD
# build it loads. The JSEP/JSPI/asyncify builds are for WebGPU and WebNN, which the site does not use.
ORT_WEB_FILES = ("dist/ort.wasm.bundle.min.mjs", "dist/ort-wasm-simd-threaded.wasm")
CHECK_PREFIX = "/_check/"  # files a check serves beside the site, from a folder outside the output
INSTALL_HINT = "install it with (cd plugins/backends/web && npm ci)"


def ort_web_version() -> str | None:
    try:
        return json.loads((ORT_WEB / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def missing_node_packages() -> list[str]:
    return [name for name in ("onnxruntime-web", "playwright-core") if not (NODE_MODULES / name / "package.json").is_file()]


def find_executable(name: str) -> str | None:
    """`name` as a path to an executable file, or looked up on PATH."""
    if os.sep in name:
        return name if os.path.isfile(name) and os.access(name, os.X_OK) else None
    return shutil.which(name)


def _run_node(node: str, script: str, request: Mapping[str, Any], timeout_s: float) -> dict[str, Any]:
    try:
        done = subprocess.run([node, str(HERE / script)], input=json.dumps(request), capture_output=True, text=True,
                              cwd=HERE, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise NodeScriptFailed(f"{script} ran past {timeout_s:.0f} s") from exc
    if done.returncode != 0:
        raise NodeScriptFailed(f"{script} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    try:
        return json.loads(done.stdout)
    except ValueError as exc:
        raise NodeScriptFailed(f"{script} printed no JSON: {done.stdout[-500:]!r} {done.stderr[-1000:]}") from exc


class NodeScriptFailed(RuntimeError):
    """A JavaScript helper did not answer (a crash, a timeout): the check did not run."""


@dataclass
class OpCheck:
    """Per graph: None where ONNX Runtime Web's WASM EP made a session, else its error and the op types it names."""

    ort_web: str | None
    errors: dict[str, str | None]
    ops: dict[str, list[str]] = field(default_factory=dict)

    @property
    def failed(self) -> dict[str, str]:
        return {name: error for name, error in self.errors.items() if error is not None}

    def describe(self, name: str) -> str:
        named = ", ".join(self.ops.get(name, [])) or "see the error"
        return f"{name}: ONNX Runtime Web {self.ort_web} (WASM) cannot run it (ops: {named}): {self.errors[name]}"


def check_ops(models: Mapping[str, Path], node: str, timeout_s: float = 300) -> OpCheck:
    """Create a session for each graph in ONNX Runtime Web's WASM build (under Node) and name the ops that fail."""
    answer = _run_node(node, "opcheck.mjs", {"models": {name: str(path) for name, path in models.items()}}, timeout_s)
    check = OpCheck(answer.get("ort"), answer["models"])
    for name, error in check.failed.items():
        graph = onnx.load(str(models[name]), load_external_data=False)
        op_types = sorted({f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in graph.graph.node})
        # ORT names the op as "domain:Op(version)" or "Op(version) node"; keep the graph's op types it mentions.
        check.ops[name] = [op for op in op_types if re.search(rf"\b{re.escape(op.rsplit('.', 1)[-1])}\b", error)]
    return check


class _SiteHandler(http.server.SimpleHTTPRequestHandler):
    """The site, plus CHECK_PREFIX files from another folder, with the headers that enable WASM threads."""

    check_dir: Path

    def translate_path(self, path: str) -> str:
        clean = path.split("?", 1)[0].split("#", 1)[0]
        if clean.startswith(CHECK_PREFIX):  # a flat folder: only a plain file name can reach it
            return str(self.check_dir / posixpath.basename(urllib.parse.unquote(clean[len(CHECK_PREFIX):])))
        return super().translate_path(path)

    def end_headers(self) -> None:
        # Cross-origin isolation (SharedArrayBuffer) is what lets ONNX Runtime Web use WASM threads.
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


_SiteHandler.extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                               ".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
                               ".onnx": "application/octet-stream", ".json": "application/json"}


@contextmanager
def serve(site: Path, check_dir: Path) -> Iterator[str]:
    """Serve `site` (and `check_dir` under /_check/) on 127.0.0.1 at a free port; yields the base URL."""
    handler = type("Handler", (_SiteHandler,), {"check_dir": check_dir})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@dataclass
class PageResult:
    """What one page wrote into #results (`status` "done" | "error"), or "timeout" / "crashed" with `error`."""

    url: str
    status: str
    results: dict[str, Any] | None
    console: list[str]
    error: str | None = None


class SiteBrowser:
    """Opens pages of a site in headless Chromium: what a web backend hands its task layer to check a site."""

    def __init__(self, site: Path, chromium: str, node: str, timeout_s: float):
        self.site, self.chromium, self.node, self.timeout_s = site, chromium, node, timeout_s
        self.version: str | None = None

    def open(self, pages: list[str], files: Mapping[str, bytes] | None = None,
             screenshots: Mapping[str, Path] | None = None) -> list[PageResult]:
        """Each of `pages` (URLs relative to the site, e.g. "index.html?image=/_check/a.png") in a fresh
        page; `files` are served under /_check/ for the pages to fetch, from a folder outside the site."""
        with tempfile.TemporaryDirectory(prefix="vlm-web-check-") as scratch:
            for name, content in (files or {}).items():
                (Path(scratch) / name).write_bytes(content)
            with serve(self.site, Path(scratch)) as base:
                urls = [base + page for page in pages]
                shots = {base + page: str(path) for page, path in (screenshots or {}).items()}
                answer = _run_node(self.node, "drive.mjs", {"chromium": self.chromium, "pages": urls,
                                                            "timeout_ms": int(self.timeout_s * 1000),
                                                            "screenshots": shots}, self.timeout_s * (len(pages) + 1))
        self.version = answer.get("browser")
        return [PageResult(page, entry["status"], entry.get("results"), entry.get("console", []), entry.get("error"))
                for page, entry in zip(pages, answer["pages"])]
