#!/usr/bin/env bash
# Prove the `tensorrt` backend on a machine with an NVIDIA GPU: build its engines and compare them
# with PyTorch. Elsewhere the backend can only write its configuration and report `skipped`.
#
#   scripts/validate_tensorrt_gpu.sh                  # the two-module toy model of tests/third_party
#   scripts/validate_tensorrt_gpu.sh blip ARGS...     # any model command and its arguments
#
# It makes a venv of its own (VENV, default .venv-tensorrt) with onnxruntime-gpu in place of the CPU
# onnxruntime, TensorRT 10, cuDNN 9 and cuBLAS from pip, points LD_LIBRARY_PATH at those libraries,
# then runs `convert MODEL ... --backend tensorrt --require-validation` into OUT (default: a new
# temporary directory) and prints the manifest's tensorrt section. Exit status: that of `convert`
# (0 validated, 1 a check failed or TensorRT could not validate), or 1 with a message when a step
# before it fails.
#
# Versions: onnxruntime-gpu 1.31 wheels are built for CUDA 13 (its `cuda` extra pins
# nvidia-cuda-runtime~=13.0, its `cudnn` extra nvidia-cudnn-cu13~=9.0) and its TensorRT EP loads
# libnvinfer.so.10, so TensorRT must be 10.x for CUDA 13 (tensorrt-cu13-libs 10.*, not 11). The
# tensorrt-cu13-libs release on PyPI is a stub that fetches the wheel from NVIDIA's index, which is
# therefore named as an extra index. torch comes from PyTorch's CPU index: it only computes references.
set -euo pipefail

die() { echo "validate_tensorrt_gpu: $*" >&2; exit 1; }

REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$REPO/.venv-tensorrt}
PYTHON=${PYTHON:-python3}
ORT_GPU_VERSION=${ORT_GPU_VERSION:-1.31.1}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
NVIDIA_INDEX_URL=${NVIDIA_INDEX_URL:-https://pypi.nvidia.com}
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/vlm-converter-tensorrt.XXXXXX")/out}

command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this script needs an NVIDIA GPU and its driver"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
    || die "nvidia-smi cannot talk to a GPU"

echo "== venv $VENV"
"$PYTHON" -m venv "$VENV" || die "cannot create a venv with $PYTHON"
PIP=("$VENV/bin/python" -m pip install --quiet)
"${PIP[@]}" --upgrade pip || die "cannot upgrade pip"
"${PIP[@]}" torch==2.13.0 --index-url "$TORCH_INDEX_URL" || die "cannot install torch 2.13.0 from $TORCH_INDEX_URL"
"${PIP[@]}" -e "${REPO}[test]" || die "cannot install vlm-converter from $REPO"
# The CPU wheel ships the same `onnxruntime` package: whichever is installed last is the one imported,
# and removing one deletes files of the other. So: remove the CPU wheel, then rewrite the GPU wheel's
# files even if pip thinks it is installed (a second run), then add its CUDA and cuDNN extras.
"$VENV/bin/python" -m pip uninstall --quiet --yes onnxruntime || die "cannot remove the CPU onnxruntime"
"${PIP[@]}" --force-reinstall --no-deps "onnxruntime-gpu==$ORT_GPU_VERSION" \
    || die "cannot install onnxruntime-gpu $ORT_GPU_VERSION"
"${PIP[@]}" "onnxruntime-gpu[cuda,cudnn]==$ORT_GPU_VERSION" || die "cannot install onnxruntime-gpu's CUDA 13 extras"
"${PIP[@]}" --extra-index-url "$NVIDIA_INDEX_URL" "tensorrt-cu13-libs==10.*" "nvidia-cudnn-cu13==9.*" "nvidia-cublas==13.*" \
    || die "cannot install TensorRT 10 / cuDNN 9 / cuBLAS 13 for CUDA 13"

# The dynamic loader reads LD_LIBRARY_PATH when a process starts: set it before Python runs.
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# (`|| true`: find fails when one of the two folders is missing; the checks below say which library.)
LIBDIRS=$({ find "$SITE/nvidia" "$SITE/tensorrt_libs" -name 'lib*.so*' -printf '%h\n' 2>/dev/null || true; } \
    | sort -u | paste -sd: -)
[ -n "$LIBDIRS" ] || die "no NVIDIA libraries found under $SITE/nvidia or $SITE/tensorrt_libs"
export LD_LIBRARY_PATH="$LIBDIRS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
for lib in libnvinfer.so.10 libnvonnxparser.so.10 libcudnn.so.9 libcublas.so.13 libcudart.so.13; do
    [ -n "$(find "$SITE/nvidia" "$SITE/tensorrt_libs" -name "$lib" -print -quit 2>/dev/null || true)" ] \
        || die "$lib is not among the pip-installed libraries ($LIBDIRS)"
done

echo "== what the tensorrt backend finds"
"$VENV/bin/python" - <<'EOF' || die "the TensorRT EP does not run here (reason above)"
import onnxruntime
from plugins.backends.tensorrt import TensorrtBackend

print("onnxruntime", onnxruntime.__version__, "from", onnxruntime.__file__)
availability = TensorrtBackend().availability()
print(availability.reason)
raise SystemExit(0 if availability.available else 1)
EOF

if [ "$#" -eq 0 ]; then
    # The toy plugin is installed as a distribution with an entry point, as the tests install it.
    SITE_DIR=$(mktemp -d "${TMPDIR:-/tmp}/vlm-converter-toy.XXXXXX")
    (cd "$REPO" && "$VENV/bin/python" -c "import sys; from pathlib import Path; from tests.conftest import install_plugin; install_plugin(Path(sys.argv[1]), 'toy_vlm_plugin', 'toy-vlm-plugin', 'toy')" "$SITE_DIR") \
        || die "cannot install the toy plugin"
    export PYTHONPATH="$SITE_DIR${PYTHONPATH:+:$PYTHONPATH}"
    set -- toy
fi

echo "== convert $* -o $OUT --backend tensorrt --require-validation"
status=0
"$VENV/bin/convert" "$@" -o "$OUT" --backend tensorrt --require-validation || status=$?

[ -f "$OUT/manifest.json" ] || die "convert exited $status and wrote no manifest in $OUT"
echo "== manifest: backends.tensorrt ($OUT/manifest.json)"
"$VENV/bin/python" - "$OUT/manifest.json" <<'EOF' || die "cannot read the manifest"
import json, sys

section = json.load(open(sys.argv[1]))["backends"]["tensorrt"]
print(json.dumps({key: section[key] for key in ("status", "reason", "available", "availability", "details")}, indent=2))
print("precision:", section["config"]["precision"], "| tolerance:", section["config"]["tolerance"])
for name, module in section["config"]["modules"].items():
    print(module["precheck"])
    for bound in ("min", "opt", "max"):
        print(f"  {bound}: {module['provider_options'].get(f'trt_profile_{bound}_shapes', '(static shapes)')}")
EOF
[ "$status" -eq 0 ] || die "convert exited $status: the tensorrt backend did not pass (see the reason above)"
echo "tensorrt backend validated on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1)"
