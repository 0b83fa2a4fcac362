"""The Triton Python-backend model of BLIP's task models (`blip_caption`, `blip_match`, `blip_embed`).

The `triton` backend copies this file as `<model>/1/model.py`; the config's parameters say which
task it serves (`task`) and where the conversion output is (`output_dir`, relative to the model's
folder); `python_path.json` beside it lists folders to put first on sys.path (the environment that
converted; folders missing here are skipped, so a server whose own Python has vlm-converter
installed works too). Everything else is `plugins.blip.serving_triton.BlipTritonModel`.
"""

from __future__ import annotations

import json
import os
import sys


# The same few lines stand in the other model.py Triton runs (plugins/backends/triton_onnx_model.py,
# plugins/blip/triton_model.py): each file is copied alone into the repository and runs before
# this package is importable, so it cannot share them by import.
def _add_python_path() -> None:
    # Before anything imports numpy: Triton's stub imports its utilities (which need it) right after this file.
    listed = os.path.join(os.path.dirname(os.path.abspath(__file__)), "python_path.json")
    if os.path.isfile(listed):
        with open(listed) as file:
            folders = [p for p in json.load(file) if os.path.isdir(p)]
        sys.path[:0] = [p for p in folders if p not in sys.path]


_add_python_path()


def _parameter(config: dict, key: str) -> str:
    return config.get("parameters", {}).get(key, {}).get("string_value", "")


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        import triton_python_backend_utils as pb_utils

        from plugins.blip.serving_triton import BlipTritonModel

        out_dir = os.path.normpath(os.path.join(args["model_repository"], _parameter(config, "output_dir")))
        threads = _parameter(config, "intra_op_threads")
        self.model = BlipTritonModel(_parameter(config, "task"), out_dir, pb_utils, int(threads) if threads else None)

    def execute(self, requests: list) -> list:
        return self.model.execute(requests)
