"""The two kinds of object plugins contribute through `converter_register_*` hooks: backends and passes."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from converter_core.options import NoOptions
from converter_core.specs import (
    Availability,
    BackendArtifacts,
    BackendContext,
    BackendValidation,
    ExportedModule,
    ModuleReferences,
    PassReport,
)


class Backend(ABC):
    """A deployment target: prepares artifacts from the final graphs and proves them.

    `options_type` is a frozen dataclass of the backend's options with their defaults (fields typed
    int, float, str, bool, Path, Literal[...], tuples, `dict[str, T]`, optionally `| None`; a field's
    `metadata={"help": ...}` is what `convert backends` shows); `prepare` gets an instance of it.
    `prepare` may run where `availability()` is False (a TensorRT configuration can be written on a
    machine with no GPU); `validate` must then answer `skipped` with the reason, never `passed`.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    options_type: ClassVar[type] = NoOptions

    @abstractmethod
    def availability(self) -> Availability: ...

    @abstractmethod
    def prepare(
        self, modules: list[ExportedModule], out_dir: Path, options: Any, context: BackendContext
    ) -> BackendArtifacts: ...

    @abstractmethod
    def validate(
        self, artifacts: BackendArtifacts, out_dir: Path, references: dict[str, ModuleReferences],
        context: BackendContext,
    ) -> BackendValidation: ...


class GraphPass(ABC):
    """A rewrite of one ONNX graph. It writes `target` and reports; `kept=False` keeps `source`.

    A pass that `needs_calibration` finds realistic inputs in `references.calibration` (the model
    plugin's, through its split plan), or an empty list where the source offers none.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    needs_calibration: ClassVar[bool] = False

    @abstractmethod
    def apply(self, source: Path, target: Path, references: ModuleReferences) -> PassReport: ...
