"""`ResNetLitError`: the base of every error a user fixes in the config, the data or the run folder.

`resnet-lit` prints such an error as one line, `resnet-lit: error: <message>`, and exits non-zero; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class ResNetLitError(Exception):
    """A problem the user can fix; the message names the bad key, value, file or folder."""
