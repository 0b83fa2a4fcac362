"""A plugin that implements a hook that does not exist (a typo of converter_register_backends)."""

from converter_core import hookimpl


@hookimpl
def converter_register_backend(register):
    raise AssertionError("never called: the hook does not exist")
