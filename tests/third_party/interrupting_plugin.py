"""A plugin whose import raises KeyboardInterrupt (a stray Ctrl-C handler, a misused exception)."""

raise KeyboardInterrupt
