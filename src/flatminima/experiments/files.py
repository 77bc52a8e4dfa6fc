"""Files that appear whole or not at all.

A report, a plot or a weights file killed half-way through being written must not be left
behind as a truncated file that looks like the real one (a SIGKILL once left a 0-byte PNG). So
each is written beside its final place under a temporary name, flushed to disk, and renamed over
the final name in one step (``os.replace``: atomic on POSIX within one filesystem). A failure
(a full disk) deletes the temporary file and raises; the file that was there before, if any,
stays as it was.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place: the same directory (a rename
    across filesystems is not atomic), a hidden name, the same suffix (writers such as
    matplotlib choose the format by it)."""
    return path.with_name(f".{path.stem}.{uuid.uuid4().hex}.partial{path.suffix}")


def write_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(temporary_path)`` and rename what it wrote to ``path``; returns ``path``."""
    temporary = partial_path(path)
    try:
        write(temporary)
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def write_text_atomically(path: Path, text: str) -> Path:
    """``path.write_text(text)``, atomically."""
    return write_atomically(path, lambda temporary: temporary.write_text(text))
