"""The one exception type users see: the CLI prints its message and exits non-zero."""


class HfCompressError(Exception):
    """A user-facing error: bad input, missing model, corrupt directory. One clear sentence."""
