"""The manifest: what the output directory holds and what was measured about it.

Other tools read it, so its layout is versioned by `FORMAT_VERSION`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import math
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from converter_core.output import MANIFEST_NAME, STAGING_MARK, stage_files
from converter_core.specs import ConversionResult

FORMAT_VERSION = 1
LIBRARIES = ("torch", "onnx", "onnxruntime", "onnxruntime-openvino", "onnxruntime-gpu", "onnxscript",
             "onnxsim", "transformers", "numpy")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def tool_version() -> str:
    try:
        return importlib.metadata.version("vlm-converter")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def manifest_dict(result: ConversionResult) -> dict[str, Any]:
    plan = result.plan
    modules = {}
    for name, record in result.modules.items():
        modules[name] = {
            "file": record.file,
            "sha256": record.sha256,
            "description": record.spec.description,
            "opset": record.spec.opset,
            "inputs": [t.to_json() for t in record.spec.inputs],
            "outputs": [t.to_json() for t in record.spec.outputs],
            "data_files": [{"file": file, "sha256": digest} for file, digest in record.data_files.items()],
            "validation": dataclasses.asdict(record.validation),
            **({"export_validation": dataclasses.asdict(record.export_validation)}
               if record.export_validation is not None else {}),
            "passes": [dataclasses.asdict(report) for report in record.passes],
        }
    backends = {
        name: {
            "status": record.validation.status,
            "reason": record.validation.reason,
            "plugin": record.plugin,
            "available": record.availability.available,
            "availability": record.availability.reason,
            "options": record.options,
            "files": record.artifacts.files,
            "config": record.artifacts.config,
            "details": record.validation.details,
        }
        for name, record in result.backends.items()
    }
    return {
        "format_version": FORMAT_VERSION,
        "tool": {"name": "vlm-converter", "version": tool_version()},
        "libraries": library_versions(),
        "python": platform.python_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_type": plan.model_type,
        "source": dataclasses.asdict(plan.source),
        "modules": modules,
        "not_exported": plan.not_exported,
        **plan.metadata,
        "assets": {name: hashlib.sha256(content).hexdigest() for name, content in sorted(plan.assets.items())},
        "backends": backends,
    }


def json_safe(value: Any) -> Any:
    # A difference can be inf (NaN or inf in an output); JSON has no such numbers, so write a string.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_manifest(out_dir: Path, result: ConversionResult) -> Path:
    """The manifest, listing every file the output holds (itself included): a later run replaces the
    folder only when it holds nothing else."""
    path = out_dir / MANIFEST_NAME
    files = sorted({*(name for name in stage_files(out_dir) if name != STAGING_MARK), MANIFEST_NAME})
    content = {**manifest_dict(result), "files": files}
    path.write_text(json.dumps(json_safe(content), indent=2, allow_nan=False) + "\n")
    return path


def read_manifest(out_dir: Path) -> dict[str, Any]:
    return json.loads((out_dir / MANIFEST_NAME).read_text())
