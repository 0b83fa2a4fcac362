"""The sizes a backend compiles a module for: (min, opt, max) per dynamic input axis.

Both compiled backends need them: `tensorrt` builds an optimisation profile from the whole range,
`mobile` fixes every axis to one size. Their option `axis_ranges` ({axis: (min, opt, max)} from
Python, `--backend-option axis_ranges.AXIS=MIN,OPT,MAX` from the command line) overrides the
module spec's `axis_ranges`; an axis in neither is an input error naming the module and the axis,
since guessing a size the model was never meant to serve would hide the mistake.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from converter_core.errors import InputError
from converter_core.specs import ModuleSpec

Range = tuple[int, int, int]
AXIS_RANGES_HELP = "AXIS -> MIN,OPT,MAX: the sizes to build for, instead of the module's own ranges"


def input_axes(spec: ModuleSpec) -> list[str]:
    """The dynamic axis names of the module's inputs, in order of first appearance."""
    names: dict[str, None] = {}
    for tensor in spec.inputs:
        for dim in tensor.shape:
            if isinstance(dim, str):
                names.setdefault(dim)
    return list(names)


def _checked(spec: ModuleSpec, axis: str, value: Any, origin: str) -> Range:
    if isinstance(value, str):
        value = value.split(",")
    try:
        low, opt, high = (int(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(
            f"{spec.name}: the range of axis {axis!r} ({origin}) is {value!r}; expected (min, opt, max)"
        ) from None
    if not 1 <= low <= opt <= high:
        raise InputError(
            f"{spec.name}: the range of axis {axis!r} ({origin}) is {[low, opt, high]}; "
            "expected 1 <= min <= opt <= max"
        )
    return low, opt, high


def axis_range(spec: ModuleSpec, axis: str, overrides: Mapping[str, Range], backend: str) -> tuple[Range, str]:
    """(min, opt, max) of one axis and where it came from: "option" (`overrides`) or "spec"."""
    if axis in overrides:
        return _checked(spec, axis, overrides[axis], "backend option axis_ranges"), "option"
    if axis in spec.axis_ranges:
        return _checked(spec, axis, spec.axis_ranges[axis], "module spec"), "spec"
    raise InputError(
        f"backend {backend}: module {spec.name!r} has no size range for its dynamic axis {axis!r}; "
        f"give it in the model plugin's ModuleSpec.axis_ranges or with --backend-option "
        f"axis_ranges.{axis}=MIN,OPT,MAX"
    )


def axis_ranges(spec: ModuleSpec, overrides: Mapping[str, Range], backend: str) -> dict[str, tuple[Range, str]]:
    """Every dynamic input axis of `spec` with its (min, opt, max) and where that range came from."""
    return {axis: axis_range(spec, axis, overrides, backend) for axis in input_axes(spec)}


def shape_at(spec_shape: tuple[int | str, ...], sizes: dict[str, int]) -> list[int]:
    return [sizes[dim] if isinstance(dim, str) else dim for dim in spec_shape]
