"""A plugin whose split hook calls sys.exit(0): loading works, the first conversion would end "successfully"."""

import sys

from converter_core import hookimpl


@hookimpl(tryfirst=True)
def converter_split_model(source):
    sys.exit(0)
