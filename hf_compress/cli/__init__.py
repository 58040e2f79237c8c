"""The `hf-compress` command line: one module per group of commands, every option declared once
(options.py). Every user mistake is one line on stderr and exit code 1.

Each command imports what it runs inside its own body: `--help` then starts without torch and
transformers (well under a second instead of several)."""

import sys
import warnings

from ..errors import HfCompressError
from . import compress, materialize, report, shrink  # noqa: F401  (each registers its commands on `app`)
from .app import app, console


def _show_warning(message, category, filename, lineno, file=None, line=None):
    console.print(f"[yellow]warning:[/yellow] {message}", highlight=False)


def main() -> None:
    warnings.showwarning = _show_warning
    warnings.filterwarnings("ignore", "Initializing zero-element tensors")  # factors of rank 0
    warnings.filterwarnings("ignore", "Attempting to save a model with offloaded")  # --max-shard-size bounds it
    try:
        app()
    except HfCompressError as err:
        console.print(f"[red]error:[/red] {err}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: rerun the same command to resume the pass")
        sys.exit(130)
