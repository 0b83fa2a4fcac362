"""A Triton Python-backend model that runs one ONNX graph with onnxruntime (`triton.engine=python`).

The `triton` backend copies this file as `model.py` beside the graph (`1/model.onnx`), for servers
without Triton's ONNX Runtime backend (the nvidia-pytriton wheel's). Requests that Triton hands over
together are stacked along the batch dimension and run as one batch where their other dimensions
agree (a decoder step with a different cache length runs on its own).

`python_path.json` beside it lists folders to put first on sys.path (the environment that
converted, which has onnxruntime and numpy); folders that do not exist here are left out, so the
model also runs where those packages are installed in the server's own Python.
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


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        global np, pb_utils
        import numpy as np
        import onnxruntime as ort
        import triton_python_backend_utils as pb_utils

        self.batched = config.get("max_batch_size", 0) > 0
        self.inputs = [entry["name"] for entry in config["input"]]
        self.outputs = [entry["name"] for entry in config["output"]]
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        options = ort.SessionOptions()
        threads = config.get("parameters", {}).get("intra_op_threads", {}).get("string_value", "")
        if threads:
            options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def execute(self, requests: list) -> list:
        feeds = [{name: pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in self.inputs} for r in requests]
        responses: list = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for index, feed in enumerate(feeds):
            # Without batching every request runs alone; with it, those whose other dimensions agree run together.
            key = (tuple((name, value.dtype.str, value.shape[1:]) for name, value in feed.items())
                   if self.batched else (index,))
            groups.setdefault(key, []).append(index)
        for indices in groups.values():
            try:
                stacked = {name: np.concatenate([feeds[i][name] for i in indices]) for name in self.inputs} \
                    if self.batched else feeds[indices[0]]
                outputs = self.session.run(self.outputs, stacked)
                if self.batched:
                    ends = np.cumsum([len(feeds[i][self.inputs[0]]) for i in indices])[:-1]
                    parts = [np.split(value, ends) for value in outputs]
                    for k, i in enumerate(indices):
                        responses[i] = self._response([part[k] for part in parts])
                else:
                    responses[indices[0]] = self._response(outputs)
            except Exception as exc:  # the request's answer says what failed; the server keeps serving
                for i in indices:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}"))
        return responses

    def _response(self, outputs: list) -> object:
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(name, value) for name, value in zip(self.outputs, outputs)])
