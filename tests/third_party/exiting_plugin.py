"""A plugin whose import ends the process with success, as a careless `if __name__` guard can."""

import sys

sys.exit(0)
