"""Typed errors. The CLI maps `InputError` to exit code 2 and `CheckFailed` to exit code 1."""

from __future__ import annotations


class ConverterError(Exception):
    """Base class of every error the converter raises on purpose."""


class InputError(ConverterError):
    """Bad input from the user: a missing file, a checkpoint of the wrong kind, a bad option. Exit 2."""


class PluginError(ConverterError):
    """A plugin is broken or two plugins claim the same name."""


class CheckFailed(ConverterError):
    """A measured check did not pass (validation above tolerance, a gate). Exit 1."""
