"""The one exception type users see: the CLI prints its message and exits non-zero."""


class HfCompressError(Exception):
    """A user-facing error: bad input, missing model, corrupt directory. One clear sentence."""


def first_line(err: Exception) -> str:
    """An exception's message in one line (its type where it has none): what a one-sentence error quotes."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
