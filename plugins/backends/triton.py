"""The `triton` backend: a Triton Inference Server model repository in `OUT/triton/`, proven on a real server.

`prepare` writes one model per graph (`OUT/triton/<graph>/config.pbtxt` and `1/model.onnx`) and the
model family's task models (for BLIP: `blip_caption`, `blip_match`, `blip_embed`, Python-backend
models that run the torch-free runtime in-process), plus a README. Per graph:

- `engine=onnxruntime` (default): `platform: "onnxruntime_onnx"`, for Triton's ONNX Runtime backend;
  with `accelerator=tensorrt` its TensorRT execution accelerator (`instance_kind=gpu`).
- `engine=python`: a Python-backend model running the graph with onnxruntime, for a server that has
  only the Python backend (the nvidia-pytriton wheel's).

`max_batch_size` is the graph's batch range (`convert blip --max-batch`) unless given; dims come from
the graph's dynamic axes (-1, the batch dimension left out); every model batches dynamically.

`validate` parses every config.pbtxt with Triton's schema and holds each graph model's inputs and
outputs against its ONNX graph; then, where a tritonserver is found (see `triton_server`), starts
it on loopback with the repository, compares every graph model with PyTorch's references over HTTP
and lets the task layer check its models (for BLIP: captions token for token as `BlipRuntime`'s,
ITM/ITC within 1e-5, batching under 16 concurrent clients). What could not be served is named, and
the validation is then `skipped`, never `passed`.

A model family that serves tasks answers `converter_backend_tasks(backend="triton")` with an object
offering what `TritonTasks` lists.
"""

from __future__ import annotations

import json
import os
import shutil
import sysconfig
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from converter_core.errors import InputError
from converter_core.extension import Backend
from converter_core.specs import (
    Availability,
    BackendArtifacts,
    BackendContext,
    BackendValidation,
    ExportedModule,
    ModuleReferences,
)
from converter_core.validate import Policy, compare, validation_record
from plugins.backends.tensorrt import DEFAULT_WORKSPACE_GIB
from plugins.backends.triton_config import (
    CONFIG_NAME,
    TritonTensor,
    batch_axis,
    build_config,
    check_graph_config,
    config_text,
    graph_tensors,
    model_config_pb2,
    read_config,
)
from plugins.backends.triton_server import ServerFailed, find_server, running_server

REPOSITORY = "triton"
VERSION = "1"
PYTHON_PATH_FILE = "python_path.json"  # read by the model files themselves, see their docstrings
GRAPH_MODEL_SOURCE = Path(__file__).with_name("triton_onnx_model.py")
Engine = Literal["onnxruntime", "python"]


@dataclass(frozen=True)
class TritonOptions:
    engine: Engine = field(default="onnxruntime", metadata={
        "help": "graph models for Triton's ONNX Runtime backend, or as Python-backend models running onnxruntime"})
    max_batch_size: int | None = field(default=None, metadata={
        "help": "Triton max_batch_size (default: the graphs' batch range, convert blip --max-batch)"})
    instance_kind: Literal["cpu", "gpu"] = field(default="cpu", metadata={"help": "instance_group kind"})
    instances: int = field(default=1, metadata={"help": "instances of each model"})
    preferred_batch_sizes: tuple[int, ...] = field(default=(), metadata={
        "help": "dynamic_batching preferred sizes, comma-separated (default: none, Triton's choice)"})
    queue_delay_us: int = field(default=1000, metadata={"help": "dynamic_batching max queue delay, microseconds"})
    accelerator: Literal["none", "tensorrt"] = field(default="none", metadata={
        "help": "tensorrt: ONNX Runtime's TensorRT accelerator for the graph models (needs instance_kind=gpu)"})
    precision: Literal["fp32", "fp16"] = field(default="fp32", metadata={"help": "TensorRT accelerator precision"})
    workspace_gib: float = field(default=DEFAULT_WORKSPACE_GIB, metadata={"help": "TensorRT accelerator workspace"})
    threads: int = field(default=0, metadata={
        "help": "onnxruntime intra-op threads in the Python-backend models; 0 lets it choose"})
    server: Path | None = field(default=None, metadata={
        "help": "tritonserver binary to validate with (default: PATH, /opt/tritonserver, the nvidia-pytriton wheel)"})

    def __post_init__(self) -> None:
        if self.max_batch_size is not None and self.max_batch_size < 0:
            raise ValueError(f"max_batch_size must be >= 0, got {self.max_batch_size}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.instances < 1:
            raise ValueError(f"instances must be >= 1, got {self.instances}")
        if self.queue_delay_us < 0:
            raise ValueError(f"queue_delay_us must be >= 0, got {self.queue_delay_us}")
        if any(size < 1 for size in self.preferred_batch_sizes):
            raise ValueError(f"preferred_batch_sizes must be >= 1, got {list(self.preferred_batch_sizes)}")
        if not self.workspace_gib > 0:
            raise ValueError(f"workspace_gib must be > 0, got {self.workspace_gib}")
        if self.accelerator == "tensorrt" and (self.instance_kind != "gpu" or self.engine != "onnxruntime"):
            raise ValueError("accelerator=tensorrt runs in Triton's ONNX Runtime backend on a GPU: "
                             "it needs engine=onnxruntime and instance_kind=gpu")


@dataclass(frozen=True)
class TaskModel:
    """A model of the family's task layer: its tensors, parameters, and the Python-backend file to serve."""

    name: str
    inputs: list[TritonTensor]
    outputs: list[TritonTensor]
    source: Path  # copied as <name>/1/model.py
    parameters: dict[str, str] = field(default_factory=dict)


@dataclass
class TaskCheck:
    """What the task layer found on the server: failures, what it could not check and why, measurements."""

    failures: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


class TritonTasks(Protocol):
    """What a model family's task layer offers the triton backend (`converter_backend_tasks`)."""

    def task_models(self, out_dir: Path, repository: Path, modules: list[ExportedModule]) -> list[TaskModel]:
        """The task models to write; `parameters` may use paths relative to the model's folder."""

    def check_served(self, address: str, out_dir: Path, models: list[str]) -> TaskCheck:
        """Check the served task `models` at `address` (HTTP) against the family's own runtime on `out_dir`."""

    def readme(self, models: list[str]) -> str:
        """Markdown with example requests for `models`."""


def python_path() -> list[str]:
    """Where this environment's packages are, for Python-backend models (Triton's stub Python does not see a venv)."""
    import plugins

    folders = [str(Path(plugins.__file__).resolve().parent.parent)]
    folders += [sysconfig.get_paths()[key] for key in ("purelib", "platlib")]
    return list(dict.fromkeys(folders))


def _python_model(source: Path, version: Path) -> None:
    """`source` as the version's model.py, with the folders it must import from beside it: Triton's
    stub imports the model and its utilities before the config reaches it, so they cannot live there."""
    shutil.copy2(source, version / "model.py")
    (version / PYTHON_PATH_FILE).write_text(json.dumps(python_path(), indent=2) + "\n")


def _link_or_copy(source: Path, target: Path) -> None:
    # A hard link where the filesystem allows: a base model's graphs are hundreds of MB.
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _max_batch(options: TritonOptions, module: ExportedModule) -> tuple[int, str | None]:
    axis = batch_axis(module.spec)
    if axis is None:
        return 0, None
    if options.max_batch_size is not None:
        return options.max_batch_size, axis
    if axis not in module.spec.axis_ranges:
        raise InputError(f"backend triton: module {module.spec.name!r} has no size range for its batch axis {axis!r}; "
                         "give --backend-option triton.max_batch_size=N")
    return int(module.spec.axis_ranges[axis][2]), axis


def _accelerator(options: TritonOptions) -> dict[str, str] | None:
    if options.accelerator != "tensorrt":
        return None
    # The parameters of Triton's ONNX Runtime backend for its TensorRT accelerator (onnxruntime_backend README).
    return {"precision_mode": options.precision.upper(),
            "max_workspace_size_bytes": str(int(options.workspace_gib * (1 << 30))),
            "trt_engine_cache_enable": "1"}


class TritonBackend(Backend):
    name = "triton"
    description = "a Triton Inference Server model repository (graph models, task models), proven on a real server"
    options_type = TritonOptions

    def availability(self) -> Availability:
        try:
            model_config_pb2()
        except InputError as exc:
            return Availability(False, str(exc))
        server, reason = find_server()
        return Availability(server is not None, reason)

    def prepare(self, modules: list[ExportedModule], out_dir: Path, options: TritonOptions,
                context: BackendContext) -> BackendArtifacts:
        repository = out_dir / REPOSITORY
        repository.mkdir(exist_ok=True)
        common = {"instance_kind": options.instance_kind, "instances": options.instances,
                  "preferred_batch_sizes": options.preferred_batch_sizes, "queue_delay_us": options.queue_delay_us}
        python = {"intra_op_threads": str(options.threads)} if options.threads else {}
        models: dict[str, Any] = {}
        largest = 0
        for module in modules:
            spec = module.spec
            max_batch, axis = _max_batch(options, module)
            largest = max(largest, max_batch)
            version = repository / spec.name / VERSION
            version.mkdir(parents=True)
            _link_or_copy(module.path, version / "model.onnx")
            for data in module.data_files:  # the graph names them relative to itself
                _link_or_copy(module.path.parent / data, version / data)
            tensors = {"inputs": graph_tensors(spec.inputs, max_batch > 0),
                       "outputs": graph_tensors(spec.outputs, max_batch > 0)}
            if options.engine == "onnxruntime":
                config = build_config(spec.name, **tensors, max_batch_size=max_batch, platform="onnxruntime_onnx",
                                      accelerator=_accelerator(options), **common)
            else:
                _python_model(GRAPH_MODEL_SOURCE, version)
                config = build_config(spec.name, **tensors, max_batch_size=max_batch, backend="python",
                                      parameters=python, **common)
            (repository / spec.name / CONFIG_NAME).write_text(config_text(config))
            models[spec.name] = {"kind": "graph", "max_batch_size": max_batch, "batch_axis": axis,
                                 "graph": f"{REPOSITORY}/{spec.name}/{VERSION}/model.onnx",
                                 "backend": "onnxruntime" if options.engine == "onnxruntime" else "python"}
        tasks: TritonTasks | None = context.tasks  # type: ignore[assignment]
        task_models = tasks.task_models(out_dir, repository, modules) if tasks is not None else []
        for task in task_models:
            version = repository / task.name / VERSION
            version.mkdir(parents=True)
            _python_model(task.source, version)
            config = build_config(task.name, inputs=task.inputs, outputs=task.outputs, max_batch_size=largest or 1,
                                  backend="python", parameters={**python, **task.parameters}, **common)
            (repository / task.name / CONFIG_NAME).write_text(config_text(config))
            models[task.name] = {"kind": "task", "max_batch_size": largest or 1, "backend": "python"}
        readme = repository / "README.md"
        readme.write_text(_readme(models, options, tasks.readme([t.name for t in task_models]) if tasks else ""))
        files = sorted(str(p.relative_to(out_dir)) for p in repository.rglob("*") if p.is_file())
        config = {"repository": REPOSITORY, "engine": options.engine, "models": models,
                  "server": str(options.server) if options.server else None}
        return BackendArtifacts(self.name, files, config)

    def validate(
        self, artifacts: BackendArtifacts, out_dir: Path, references: dict[str, ModuleReferences],
        context: BackendContext,
    ) -> BackendValidation:
        repository = out_dir / artifacts.config["repository"]
        models: dict[str, Any] = artifacts.config["models"]
        details: dict[str, Any] = {"configs": {}, "served": {}}
        problems = check_repository(repository, models)
        details["configs"] = {name: "agrees" for name in models} if not problems else {"problems": problems}
        if problems:
            return BackendValidation("failed", "; ".join(problems), details)
        checked = f"{len(models)} config.pbtxt files parse with Triton's ModelConfig schema and agree with their graphs"
        given = artifacts.config.get("server")
        server, found = find_server(Path(given) if given else None)
        details["server"] = found
        if server is None:
            return BackendValidation("skipped", f"{checked}; not served: {found}", details)
        unservable = {name: f"this tritonserver has no {info['backend']} backend; it has: "
                            f"{', '.join(server.backends) or 'none'}"
                      for name, info in models.items() if info["backend"] not in server.backends}
        servable = [name for name in models if name not in unservable]
        details["not_served"] = unservable
        failures: list[str] = []
        by_reason: dict[str, list[str]] = {}
        for name, why in unservable.items():
            by_reason.setdefault(why, []).append(name)
        unchecked = [f"{', '.join(names)} ({why})" for why, names in by_reason.items()]
        if servable:
            try:
                with running_server(server, repository, servable) as address:
                    failures, more = _check_served(address, out_dir, models, servable, references, context, details)
                    unchecked += more
            except ServerFailed as exc:
                failures.append(f"tritonserver could not serve the repository: {exc}")
        if failures:
            return BackendValidation("failed", "; ".join(failures), details)
        served = f"served by {found}: {', '.join(servable)} answered as the references do"
        if unchecked:
            return BackendValidation("skipped", f"{checked}; {served if servable else 'nothing served'}; "
                                     f"not checked live: {'; '.join(unchecked)}", details)
        return BackendValidation("passed", f"{checked}; {served}", details)


def check_repository(repository: Path, models: dict[str, Any]) -> list[str]:
    """Every config parses with Triton's schema, names its model, and (graph models) agrees with the graph."""
    problems = []
    for name, info in models.items():
        path = repository / name / CONFIG_NAME
        try:
            config = read_config(path)
        except (ValueError, OSError) as exc:
            problems.append(f"model {name}: {exc}")
            continue
        if config.name != name:
            problems.append(f"model {name}: {CONFIG_NAME} names the model {config.name!r}")
        if info["kind"] == "graph":
            problems += check_graph_config(config, repository / name / VERSION / "model.onnx")
        if info["backend"] == "python" and not (repository / name / VERSION / "model.py").is_file():
            problems.append(f"model {name}: {VERSION}/model.py is missing")
    return problems


class TritonRunner:
    """One graph model on a running server, called as `compare` calls a runner: a feed dict in, outputs out."""

    def __init__(self, address: str, model: str) -> None:
        import tritonclient.http as httpclient

        self.client = httpclient.InferenceServerClient(address, network_timeout=300.0)
        self.model = model
        metadata = self.client.get_model_metadata(model)
        config = self.client.get_model_config(model)
        self.outputs = [o["name"] for o in metadata["outputs"]]
        self.types = {i["name"]: i["datatype"] for i in metadata["inputs"]}
        # Clients see `dims`; a tensor the config reshapes (a per-sample scalar as [1]) is reshaped back here.
        self.batched = config.get("max_batch_size", 0) > 0
        self.dims = {e["name"]: [int(d) for d in e["dims"]] for e in config["input"] if "reshape" in e}
        self.reshape = {e["name"]: [int(d) for d in e["reshape"].get("shape", [])] for e in config["output"]
                        if "reshape" in e}

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tritonclient.http as httpclient

        requests = []
        for name, value in inputs.items():
            if name in self.dims:
                value = value.reshape([*value.shape[:1], *self.dims[name]] if self.batched else self.dims[name])
            request = httpclient.InferInput(name, list(value.shape), self.types[name])
            request.set_data_from_numpy(value, binary_data=True)
            requests.append(request)
        wanted = [httpclient.InferRequestedOutput(name, binary_data=True) for name in self.outputs]
        result = self.client.infer(self.model, requests, outputs=wanted)
        outputs = {name: result.as_numpy(name) for name in self.outputs}
        for name, shape in self.reshape.items():
            value = outputs[name]
            outputs[name] = value.reshape([*value.shape[:1], *shape] if self.batched else shape)
        return outputs


def _check_served(address: str, out_dir: Path, models: dict[str, Any], servable: list[str],
                  references: dict[str, ModuleReferences], context: BackendContext,
                  details: dict[str, Any]) -> tuple[list[str], list[str]]:
    failures: list[str] = []
    unchecked: list[str] = []
    for name in servable:
        info = models[name]
        if info["kind"] != "graph":
            continue
        if name not in references:
            unchecked.append(f"{name}: no PyTorch references")
            continue
        module_refs = references[name]
        limit = info["max_batch_size"]
        cases = [r for r in module_refs.cases
                 if not limit or all(v.shape[0] <= limit for v in r.case.inputs.values())]
        if not cases:
            unchecked.append(f"{name}: no reference case fits max_batch_size {limit}")
            continue
        served = replace(module_refs, cases=cases)
        validation, failure = compare(served, TritonRunner(address, name), Policy.of(served))
        details["served"][name] = {"cases": validation.cases, **validation_record(validation)}
        if failure:
            failures.append(f"model {name} on tritonserver: {failure}")
    tasks = [name for name in servable if models[name]["kind"] == "task"]
    if tasks and context.tasks is not None:
        check = context.tasks.check_served(address, out_dir, tasks)
        failures += check.failures
        unchecked += check.unchecked
        details["served"].update(check.details)
    return failures, unchecked


def _readme(models: dict[str, Any], options: TritonOptions, examples: str) -> str:
    rows = "\n".join(
        f"| `{name}` | {'graph' if info['kind'] == 'graph' else 'task'} | "
        f"{'onnxruntime_onnx' if info['backend'] == 'onnxruntime' else 'python'} | {info['max_batch_size']} |"
        for name, info in models.items())
    python_note = (
        "Python-backend models put the folders in their `1/python_path.json` (the environment that "
        "converted) first on `sys.path` where those folders exist; elsewhere (a Triton container) "
        "install the runtime into the server's Python: `pip install vlm-converter`.")
    return f"""# Triton model repository

Written by `convert ... --backend triton` (engine `{options.engine}`). The task models read the
conversion output this folder lives in (`..`: its `manifest.json` and graphs), so serve the whole
output directory, not this folder alone.

| model | kind | backend | max_batch_size |
|---|---|---|---|
{rows}

## Start the server

In a Triton container (`nvcr.io/nvidia/tritonserver:<yy.mm>-py3`), with the conversion output at `$OUT`:

```bash
docker run --rm -p 8000:8000 -v "$OUT":/out nvcr.io/nvidia/tritonserver:24.10-py3 \\
  bash -c "pip install vlm-converter && tritonserver --model-repository /out/triton"
curl -s localhost:8000/v2/health/ready -o /dev/null -w '%{{http_code}}\\n'   # 200 once every model loaded
```

{python_note}

Without a container, the `nvidia-pytriton` wheel ships a `tritonserver` with the Python backend
only (convert with `--backend-option triton.engine=python`); `convert` starts it itself to validate.

## Requests

A graph model takes its graph's tensors by name (`curl -s localhost:8000/v2/models/<model>/config`
lists them, with the batch dimension first where `max_batch_size` > 0).
{examples}
"""
