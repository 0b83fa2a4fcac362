"""vlm-converter's plugin host: hook specs, the conversion pipeline and the `convert` CLI.

Plugin authors import `hookimpl` from here and nothing else is needed to implement a hook.
"""

from __future__ import annotations

import pluggy

PROJECT_NAME = "vlm_converter"
ENTRY_POINT_GROUP = "vlm_converter"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

__all__ = ["ENTRY_POINT_GROUP", "PROJECT_NAME", "hookimpl", "hookspec"]
