"""Entry point of the built-in backends."""

from __future__ import annotations

from collections.abc import Callable

from converter_core import hookimpl
from converter_core.extension import Backend
from plugins.backends.cpu import CpuBackend
from plugins.backends.mobile import MobileBackend
from plugins.backends.tensorrt import TensorrtBackend
from plugins.backends.triton import TritonBackend
from plugins.backends.web import WebBackend


@hookimpl
def converter_register_backends(register: Callable[[Backend], None]) -> None:
    register(CpuBackend())
    register(TensorrtBackend())
    register(MobileBackend())
    register(TritonBackend())
    register(WebBackend())
