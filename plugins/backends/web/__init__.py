"""The `web` backend: a static site that runs the graphs in the browser with ONNX Runtime Web (WASM EP).

`prepare` writes OUT/web/:
- `models/`: the final graphs (the INT8 ones where a kept pass made them), each checked by
  `opcheck.mjs` in ONNX Runtime Web's WASM build; a graph with an op it cannot run is named, with
  the op, and fails validation;
- `ort/`: onnxruntime-web's WASM files, copied from this folder's node_modules (pinned by
  package.json and package-lock.json): the site works offline, with no CDN;
- `manifest.json`: every model file with its sha256 (the page checks them with SubtleCrypto), the
  runtime files, and what the task layer adds;
- the application itself, from the model family's task layer (`converter_backend_tasks`,
  `context.tasks`), which must offer:
  - `site(out_dir: Path, metadata: dict) -> WebSite`: the app's files (page, script, README,
    vocabulary) by path inside web/, and the entries it adds to web/manifest.json;
  - `check(out_dir: Path, site: Path, browser: SiteBrowser, options: WebOptions) -> BackendValidation`:
    open the site in the browser and compare what it computes with the family's Python runtime.

`validate` serves the site on 127.0.0.1 and hands the task layer a `SiteBrowser` (headless Chromium
through playwright-core). Without Chromium, Node or the npm packages it is `skipped`, saying which.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from converter_core.errors import InputError
from converter_core.extension import Backend
from converter_core.output import sha256_file
from converter_core.specs import (
    Availability,
    BackendArtifacts,
    BackendContext,
    BackendValidation,
    ExportedModule,
    ModuleReferences,
)
from plugins.backends.web.browser import (
    INSTALL_HINT,
    ORT_WEB,
    ORT_WEB_FILES,
    NodeScriptFailed,
    OpCheck,
    SiteBrowser,
    check_ops,
    find_executable,
    missing_node_packages,
    ort_web_version,
)

SITE = "web"


@dataclass(frozen=True)
class WebOptions:
    chromium: str = field(default="chromium", metadata={
        "help": "Chromium executable for validation: a path, or a name looked up on PATH (Debian: chromium)"})
    node: str = field(default="node", metadata={"help": "Node.js executable (runs playwright-core and the op check)"})
    threads: int = field(default=1, metadata={
        "help": "WASM threads the page asks ONNX Runtime Web for (above 1 needs the COOP/COEP headers)"})
    validation_images: int = field(default=6, metadata={"help": "images the validation captions and matches in the browser"})
    timeout_s: int = field(default=300, metadata={"help": "seconds a page may take in validation"})

    def __post_init__(self) -> None:
        if self.threads < 1 or self.validation_images < 1 or self.timeout_s < 1:
            raise ValueError(f"threads, validation_images and timeout_s must be >= 1, got {self.threads}, "
                             f"{self.validation_images} and {self.timeout_s}")


@dataclass
class WebSite:
    """The task layer's part of a site: files by path inside web/, and its entries of web/manifest.json."""

    files: dict[str, bytes]
    manifest: dict[str, Any]


class WebTasks(Protocol):
    def site(self, out_dir: Path, metadata: dict[str, Any]) -> WebSite: ...

    def check(self, out_dir: Path, site: Path, browser: SiteBrowser, options: WebOptions) -> BackendValidation: ...


def _write(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


class WebBackend(Backend):
    name = "web"
    description = "a static site that runs the graphs in the browser with ONNX Runtime Web (WASM), checked in Chromium"
    options_type = WebOptions

    def availability(self, options: WebOptions | None = None) -> Availability:
        options = options or WebOptions()
        missing = self._missing(options)
        if missing:
            return Availability(False, "; ".join(missing))
        return Availability(True, f"ONNX Runtime Web {ort_web_version()} (WASM EP) in headless "
                                  f"{find_executable(options.chromium)}")

    def _missing(self, options: WebOptions) -> list[str]:
        missing = []
        packages = missing_node_packages()
        if packages:
            missing.append(f"npm packages {', '.join(packages)} are not installed: {INSTALL_HINT}")
        if find_executable(options.node) is None:
            missing.append(f"no Node.js ({options.node!r} not found): install nodejs")
        if find_executable(options.chromium) is None:
            missing.append(f"no Chromium ({options.chromium!r} not found): apt-get install -y chromium")
        return missing

    def prepare(self, modules: list[ExportedModule], out_dir: Path, options: WebOptions,
                context: BackendContext) -> BackendArtifacts:
        tasks: WebTasks | None = context.tasks  # type: ignore[assignment]
        if tasks is None:
            raise InputError(f"backend web: the {context.model_type!r} model plugin has no browser runtime "
                             "(no converter_backend_tasks answer for 'web')")
        version = ort_web_version()
        if version is None:
            raise InputError(f"backend web: onnxruntime-web is not installed, and the site ships it: {INSTALL_HINT}")
        site = out_dir / SITE
        site.mkdir(exist_ok=True)
        files: list[Path] = []
        runtime = {}
        for relative in ORT_WEB_FILES:
            target = site / "ort" / Path(relative).name
            target.parent.mkdir(exist_ok=True)
            shutil.copyfile(ORT_WEB / relative, target)
            files.append(target)
            runtime["module" if target.suffix == ".mjs" else "wasm"] = f"ort/{target.name}"
        models: dict[str, Any] = {}
        copies: dict[str, Path] = {}
        for module in modules:
            target = site / "models" / module.path.name
            target.parent.mkdir(exist_ok=True)
            shutil.copyfile(module.path, target)
            files.append(target)
            copies[module.spec.name] = target
            data_files = []
            for name in module.data_files:
                shutil.copyfile(module.path.parent / name, target.parent / name)
                files.append(target.parent / name)
                data_files.append({"name": name, "file": f"models/{name}", "sha256": sha256_file(target.parent / name)})
            models[module.spec.name] = {"file": f"models/{target.name}", "sha256": sha256_file(target),
                                        "data_files": data_files}
        ops = self._op_check(copies, options)
        app = tasks.site(out_dir, context.metadata)
        for relative, content in app.files.items():
            _write(site / relative, content)
            files.append(site / relative)
        manifest = {"format": "vlm-converter web site 1", "onnxruntime_web": version, "runtime": runtime,
                    "models": models, **app.manifest}
        (site / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        files.append(site / "manifest.json")
        config = {"onnxruntime_web": version, "execution_provider": "wasm", "threads": options.threads,
                  "site": SITE, "models": {name: m["file"] for name, m in models.items()}, "op_check": ops,
                  "options": dataclasses.asdict(options)}
        return BackendArtifacts(self.name, [str(p.relative_to(out_dir)) for p in files], config)

    def _op_check(self, models: dict[str, Path], options: WebOptions) -> dict[str, Any]:
        node = find_executable(options.node)
        if node is None:
            return {"status": "skipped", "reason": f"no Node.js ({options.node!r} not found)"}
        try:
            check: OpCheck = check_ops(models, node, options.timeout_s)
        except NodeScriptFailed as exc:
            return {"status": "skipped", "reason": f"the op check did not run: {exc}"}
        if check.failed:
            return {"status": "failed", "ort_web": check.ort_web,
                    "modules": {name: {"ops": check.ops[name], "error": error} for name, error in check.failed.items()},
                    "reason": "; ".join(check.describe(name) for name in check.failed)}
        return {"status": "passed", "ort_web": check.ort_web,
                "reason": f"every graph makes a session in ONNX Runtime Web {check.ort_web} (WASM)"}

    def validate(
        self, artifacts: BackendArtifacts, out_dir: Path, references: dict[str, ModuleReferences],
        context: BackendContext, options: WebOptions | None = None,
    ) -> BackendValidation:
        ops = artifacts.config["op_check"]
        if ops["status"] == "failed":
            return BackendValidation("failed", ops["reason"], {"op_check": ops})
        options = options or self._options(artifacts)
        missing = self._missing(options)
        if missing:
            return BackendValidation("skipped", "not checked in a browser: " + "; ".join(missing), {"op_check": ops})
        browser = SiteBrowser(out_dir / SITE, find_executable(options.chromium), find_executable(options.node),
                              options.timeout_s)
        try:
            result = context.tasks.check(out_dir, out_dir / SITE, browser, options)
        except NodeScriptFailed as exc:
            return BackendValidation("failed", f"the browser check did not finish: {exc}", {"op_check": ops})
        result.details = {"op_check": ops, "chromium": browser.version, **result.details}
        return result

    def _options(self, artifacts: BackendArtifacts) -> WebOptions:
        return WebOptions(**artifacts.config["options"])
