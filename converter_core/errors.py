"""Typed errors. The CLI maps `InputError`, `PluginError` and `EnvironmentFailure` to exit code 2 and
`CheckFailed` to exit code 1."""

from __future__ import annotations

import errno


class ConverterError(Exception):
    """Base class of every error the converter raises on purpose."""


class InputError(ConverterError):
    """Bad input from the user: a missing file, a checkpoint of the wrong kind, a bad option. Exit 2."""


class PluginError(ConverterError):
    """A plugin is broken or two plugins claim the same name."""


class CheckFailed(ConverterError):
    """A measured check did not pass (validation above tolerance, a gate). Exit 1."""


class EnvironmentFailure(ConverterError):
    """The machine, not the input or the model, stopped the run: a full disk, a read-only or
    unwritable folder. Exit 2, never reported as a failed check."""


# What a machine says when it, not the input, is the problem.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EMFILE, errno.ENFILE}


def environment_error(exc: BaseException) -> EnvironmentFailure | None:
    """The environment failure behind `exc` (or behind what it wraps), if it is one: a full disk,
    a read-only filesystem, a folder we may not write. Code that turns tool errors into verdicts
    re-raises these, so that a full disk is never reported as a failed check."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, EnvironmentFailure):
            return exc
        if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
            where = f" ({exc.filename})" if exc.filename else ""
            return EnvironmentFailure(f"environment error: {exc.strerror or exc}{where}")
        exc = exc.__cause__ or exc.__context__
    return None


def raise_if_environment(exc: BaseException) -> None:
    failure = environment_error(exc)
    if failure is not None:
        raise failure from exc
