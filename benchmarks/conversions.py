"""The graphs the benchmark measures, made by `convert` itself, and the timed full conversion.

- The full conversion is `convert blip ...` in a child process, with validation, as a user runs it:
  its wall time and its peak resident memory (the child's `ru_maxrss`, from `wait4`). Its output is
  the fp32 variant at the model's image size.
- Each other variant (`fp32-fused`, `int8-dynamic`, `int8-fused`, `int8-static`, `fp16`) is a `convert()` of the
  same source with that pass policy. Exporting is what makes a conversion slow, and the export of a module does not
  depend on the passes that follow, so `ReuseExports` (an ordinary `converter_export_module` hook)
  copies each module's graph from the fp32 conversion of the same source instead of exporting it
  again. What the passes do, keep or revert is theirs and is read back from each manifest.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converter_core import hookimpl
from converter_core.manifest import read_manifest
from converter_core.pipeline import ConvertOptions, convert, parse_pass_policy
from converter_core.plugins import PluginHost, load_plugins
from plugins.blip.recipes import BlipConversion
from plugins.blip.source import BlipSource

FP32 = "fp32"
# variant -> the pass that makes it from the fp32 export (`convert blip --passes PASS`); `fusion`
# keeps fp32 and the numbers, and rewrites to ONNX Runtime's fused transformer ops.
# `int8-fused` is what a user who wants the fastest INT8 graph on ONNX Runtime runs: the fused
# attention and GELU ops, their products then quantised (QAttention, DynamicQuantizeMatMul).
PASSES = {"fp32-fused": "fusion", "int8-dynamic": "int8-dynamic", "int8-fused": "fusion+int8-dynamic",
          "int8-static": "int8-static", "fp16": "fp16"}
VARIANTS = (FP32, *PASSES)


class ReuseExports:
    """`converter_export_module`: copy the module's graph from `directory`, an fp32 conversion of the
    same source with the same sizes, instead of exporting it again. Inactive while `directory` is None."""

    def __init__(self) -> None:
        self.directory: Path | None = None

    @hookimpl
    def converter_export_module(self, wrapper, spec, path: Path) -> bool | None:
        if self.directory is None:
            return None
        entry = read_manifest(self.directory)["modules"].get(spec.name)
        if entry is None or entry["passes"]:  # not there, or no longer the plain export
            return None
        shutil.copyfile(self.directory / entry["file"], path)
        return True

    @contextlib.contextmanager
    def from_directory(self, directory: Path) -> Iterator[None]:
        self.directory = directory
        try:
            yield
        finally:
            self.directory = None


def benchmark_host() -> tuple[PluginHost, ReuseExports]:
    host = load_plugins()
    reuse = ReuseExports()
    host.manager.register(reuse, name="benchmark-reuse-exports")
    return host, reuse


@dataclass
class Variant:
    name: str
    image_size: int
    directory: Path
    manifest: dict[str, Any]

    def graph(self, module: str) -> Path | None:
        entry = self.manifest["modules"].get(module)
        return self.directory / entry["file"] if entry else None

    def pass_reports(self) -> dict[str, list[dict[str, Any]]]:
        """Per module that a pass ran on: kept or reverted, why, and the nodes it left unrewritten."""
        return {
            module: [
                {"pass": report["pass_name"], "kept": report["kept"], "reason": report["reason"],
                 "excluded_nodes": [e.get("node") for e in report["details"].get("excluded", [])]}
                for report in entry["passes"]
            ]
            for module, entry in self.manifest["modules"].items() if entry["passes"]
        }

    def kept(self, module: str) -> bool | None:
        """Whether the pass that makes the variant (its last: int8-fused's INT8 after fusion) was kept for
        `module` (None: fp32, no pass). A reverted fusion leaves an INT8 graph an INT8 graph."""
        reports = self.manifest["modules"][module]["passes"]
        return reports[-1]["kept"] if reports else None


def timed_conversion(cli_args: list[str], out: Path) -> dict[str, Any]:
    """Run `convert <cli_args> -o out` in a child process; its wall time and peak RSS."""
    command = [sys.executable, "-m", "converter_core", "-q", *cli_args, "-o", str(out)]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = child.stdout.read() if child.stdout else ""
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    result: dict[str, Any] = {
        "command": ["convert", *cli_args, "-o", str(out)],
        "exit_code": child.returncode,
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux reports kilobytes
    }
    if child.returncode not in (0, 1):
        result["error"] = output.strip()[-2000:]
        return result
    manifest = read_manifest(out)
    result["validation"] = {name: entry["validation"]["status"] for name, entry in manifest["modules"].items()}
    return result


def convert_variants(source: BlipSource, root: Path, host: PluginHost, reuse: ReuseExports,
                     variants: tuple[str, ...], fp32_dir: Path | None = None,
                     pass_modules: tuple[str, ...] | None = None) -> dict[str, Variant]:
    """Every variant of `source` under `root/<variant>`; `fp32_dir`: an fp32 conversion made already
    (the timed one). `pass_modules`: apply the passes to these modules only (None: every module)."""
    conversion = BlipConversion(source, max_batch=8, max_text_len=40)  # `convert blip`'s defaults
    made: dict[str, Variant] = {}
    if fp32_dir is None:
        fp32_dir = root / FP32
        convert(conversion, ConvertOptions(output_dir=fp32_dir, validate=False), host=host)
    made[FP32] = Variant(FP32, source.image_size, fp32_dir, read_manifest(fp32_dir))
    for name in variants:
        if name == FP32:
            continue
        policy = ",".join(f"{module}={PASSES[name]}" for module in pass_modules) if pass_modules else PASSES[name]
        out = root / name
        with reuse.from_directory(fp32_dir):
            convert(conversion, ConvertOptions(output_dir=out, validate=False, passes=parse_pass_policy(policy)),
                    host=host)
        made[name] = Variant(name, source.image_size, out, read_manifest(out))
    return made
