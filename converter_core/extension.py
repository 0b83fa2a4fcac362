"""The two kinds of object plugins contribute through `converter_register_*` hooks: backends and passes."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from converter_core.specs import (
    Availability,
    BackendArtifacts,
    BackendValidation,
    ExportedModule,
    ModuleReferences,
    PassReport,
)


class Backend(ABC):
    """A deployment target: prepares artifacts from the exported graphs and proves them.

    `prepare` may run where `availability()` is False (a TensorRT configuration can be written on a
    machine with no GPU); `validate` must then answer `skipped` with the reason, never `passed`.
    """

    name: ClassVar[str]
    description: ClassVar[str]

    @abstractmethod
    def availability(self) -> Availability: ...

    @abstractmethod
    def prepare(
        self, modules: list[ExportedModule], out_dir: Path, options: dict[str, Any]
    ) -> BackendArtifacts: ...

    @abstractmethod
    def validate(
        self, artifacts: BackendArtifacts, out_dir: Path, references: dict[str, ModuleReferences]
    ) -> BackendValidation: ...


class GraphPass(ABC):
    """A rewrite of one ONNX graph. It writes `target` and reports; `kept=False` keeps `source`."""

    name: ClassVar[str]
    description: ClassVar[str]

    @abstractmethod
    def apply(self, source: Path, target: Path, references: ModuleReferences) -> PassReport: ...
