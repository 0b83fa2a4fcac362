"""What the numbers were measured on: CPU, cores, the vector and matrix ISA flags, libraries, load."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from converter_core.manifest import library_versions

# The flags that decide which GEMM kernels can run: AVX-512 (fp32), VNNI (int8 dot products), AMX (int8/bf16 tiles).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_int8", "amx_bf16")


def cpuinfo(path: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """Model name, physical cores and flags from /proc/cpuinfo (empty where the file does not exist)."""
    if not path.is_file():
        return {"model": platform.processor() or "unknown", "physical_cores": None, "flags": []}
    model, flags, cores = "unknown", set(), set()
    physical = core = None
    for line in path.read_text().splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name":
            model = value
        elif key == "flags":
            flags = set(value.split())
        elif key == "physical id":
            physical = value
        elif key == "core id":
            core = value
        elif not key and core is not None:
            cores.add((physical, core))
            physical = core = None
    if core is not None:
        cores.add((physical, core))
    return {"model": model, "physical_cores": len(cores) or None, "flags": sorted(flags)}


def load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def describe(threads: int) -> dict[str, Any]:
    import torch

    info = cpuinfo()
    flags = set(info.pop("flags"))
    return {
        "cpu": info["model"],
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "physical_cores": info["physical_cores"],
        "isa_flags": {flag: flag in flags for flag in ISA_FLAGS},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "libraries": {**library_versions(), "pillow": _version("pillow")},
        "load_average_at_start": load_average(),
    }


def _version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def summary_line(machine: dict[str, Any]) -> str:
    """One line for a table caption: CPU, cores, threads, the ISA that matters."""
    isa = [flag for flag in ("avx512f", "avx512_vnni", "amx_int8") if machine["isa_flags"].get(flag)]
    cores = machine["physical_cores"] or machine["logical_cpus"]
    return (f"{machine['cpu']}, {cores} cores ({machine['usable_cpus']} usable), {machine['threads']} threads, "
            f"{' / '.join(isa) or 'no AVX-512'}; onnxruntime {machine['libraries'].get('onnxruntime')}, "
            f"torch {machine['libraries'].get('torch')}")
