"""Write whole directories or nothing: users never see a half-written output; resumable states
are written whole and read back without unpickling code."""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import HfCompressError, first_line


def check_output(path: str | Path, overwrite: bool) -> Path:
    """Refuse to replace an existing output unless asked to."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise HfCompressError(f"output {path} already exists; pass --overwrite to replace it")
    return path


def umask() -> int:
    """The process umask (reading it means setting it: set it back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False):
    """Yield a temporary sibling directory; on success it replaces `path` in one rename.

    On any error the temporary directory is removed and `path` is left as it was.
    """
    path = check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o777 & ~umask())  # mkdtemp makes it private; the output should not be
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            path.rename(old / path.name)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_save(payload, path: Path) -> None:
    """torch.save through a temporary file: a crash mid-write leaves the previous file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def read_state(path: Path) -> dict:
    """A state `atomic_save` wrote, read without unpickling code (tensors and plain data only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise HfCompressError(f"{path} is not a state hf-compress can read ({first_line(err)}); pass --overwrite to "
                              "start afresh") from None
