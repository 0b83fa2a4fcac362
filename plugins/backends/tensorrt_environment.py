"""Whether ONNX Runtime's TensorRT EP really runs on this machine, and if not, what is missing.

`onnxruntime-gpu` lists TensorrtExecutionProvider in `get_available_providers()` on any machine, GPU
or not, and a session asked for it quietly falls back to CUDA or CPU when TensorRT, cuDNN, cuBLAS or
the GPU is missing. So the answer comes from a session on a one-node model: TensorRT is available
only if that session's first provider is TensorrtExecutionProvider. The GPU and library checks do
not decide anything; they say what to install.
"""

from __future__ import annotations

import ctypes
import functools
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort
from onnx import TensorProto, helper

from plugins.backends.cpu import active_onnxruntime_distribution

TRT_EP = "TensorrtExecutionProvider"
FALLBACK_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")

# The native libraries the TensorRT EP of onnxruntime-gpu >= 1.31 loads (CUDA 13 builds, TensorRT 10),
# by soname, with what each is. cuBLAS 12 is accepted as evidence for CUDA 12 builds of onnxruntime.
LIBRARIES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("libnvinfer.so.10",), "TensorRT 10"),
    (("libnvonnxparser.so.10",), "TensorRT ONNX parser"),
    (("libcudnn.so.9",), "cuDNN 9"),
    (("libcublas.so.13", "libcublas.so.12"), "cuBLAS"),
)


def _tiny_model() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"], name="double")],
        "trt_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def _gpu() -> tuple[str | None, str]:
    """The first GPU's name, or None, with how we know."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            result = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"nvidia-smi failed: {exc}"
        names = [line.strip() for line in result.stdout.splitlines() if line.strip()]
        if result.returncode == 0 and names:
            return names[0], "nvidia-smi"
        return None, f"nvidia-smi lists no GPU ({(result.stderr or result.stdout).strip()[:200]})"
    if Path("/dev/nvidia0").exists():
        return "NVIDIA GPU (no nvidia-smi to name it)", "/dev/nvidia0"
    return None, "no nvidia-smi, no /dev/nvidia0"


def _load(sonames: tuple[str, ...]) -> tuple[str | None, ctypes.CDLL | None]:
    for soname in sonames:
        try:
            return soname, ctypes.CDLL(soname)
        except OSError:
            continue
    return None, None


def _tensorrt_version(library: ctypes.CDLL | None) -> str | None:
    if library is None:
        return None
    try:
        # TensorRT 10: NV_TENSORRT_VERSION = major * 10000 + minor * 100 + patch (NvInferVersion.h).
        major, rest = divmod(int(library.getInferLibVersion()), 10000)
    except (AttributeError, OSError):
        return "10 (version unknown)"
    minor, patch = divmod(rest, 100)
    return f"{major}.{minor}.{patch}"


@dataclass(frozen=True)
class TensorrtEnvironment:
    onnxruntime: str
    providers: tuple[str, ...]  # what this onnxruntime lists
    session_providers: tuple[str, ...]  # what a session that asked for TensorRT got; () if none was tried
    session_error: str | None
    gpu: str | None
    gpu_evidence: str
    libraries: dict[str, str | None] = field(default_factory=dict)  # what -> soname loaded, or None
    tensorrt_version: str | None = None

    @property
    def available(self) -> bool:
        return bool(self.session_providers) and self.session_providers[0] == TRT_EP

    def missing(self) -> list[str]:
        found = []
        if TRT_EP not in self.providers:
            found.append(
                f"{TRT_EP} is not among this onnxruntime's providers: {', '.join(self.providers)} "
                f"({self.onnxruntime}; the TensorRT EP ships in onnxruntime-gpu)"
            )
        elif not self.available:
            got = ", ".join(self.session_providers) or "nothing"
            error = f": {self.session_error}" if self.session_error else ""
            found.append(f"{TRT_EP} is listed by {self.onnxruntime}, but a session asked for it runs on {got}{error}")
        if self.gpu is None:
            found.append(f"no NVIDIA GPU visible ({self.gpu_evidence})")
        for (sonames, what) in LIBRARIES:
            if self.libraries.get(what) is None:
                found.append(f"{' / '.join(sonames)} not found ({what})")
        return found

    def reason(self) -> str:
        if self.available:
            return f"{TRT_EP} on {self.gpu or 'an unnamed GPU'} (TensorRT {self.tensorrt_version}, {self.onnxruntime})"
        return "; ".join(self.missing())


@functools.cache
def probe() -> TensorrtEnvironment:
    """Look once per process: the session test builds a TensorRT engine where TensorRT works."""
    providers = tuple(ort.get_available_providers())
    gpu, evidence = _gpu()
    libraries: dict[str, str | None] = {}
    handles = {}
    for sonames, what in LIBRARIES:
        libraries[what], handles[what] = _load(sonames)
    session_providers: tuple[str, ...] = ()
    error = None
    if TRT_EP in providers:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(_tiny_model(), sess_options=options,
                                           providers=[TRT_EP, *FALLBACK_PROVIDERS])
            session_providers = tuple(session.get_providers())
        except Exception as exc:  # any failure to build the session means "not available", with why
            error = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
    return TensorrtEnvironment(
        onnxruntime=active_onnxruntime_distribution(),
        providers=providers,
        session_providers=session_providers,
        session_error=error,
        gpu=gpu,
        gpu_evidence=evidence,
        libraries=libraries,
        tensorrt_version=_tensorrt_version(handles["TensorRT 10"]),
    )
