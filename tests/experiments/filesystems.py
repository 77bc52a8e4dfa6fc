"""Real filesystem faults for tests: a tiny full disk and a read-only directory.

Both need either root (a tmpfs mounted for the test) or, for read-only, an ordinary user (file
modes stop an ordinary user, not root). Where neither works the test is skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _mount(*arguments: str) -> bool:
    return subprocess.run(["mount", *arguments], capture_output=True).returncode == 0


@contextmanager
def small_disk(path: Path, size: str = "2m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` for the block (root only)."""
    if os.geteuid() != 0:
        pytest.skip("a small real disk needs root to mount a tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    if not _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)):
        pytest.skip("mounting a tmpfs failed (no CAP_SYS_ADMIN here)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path, leave_bytes: int) -> Path:
    """Fill ``directory``'s filesystem until about ``leave_bytes`` are free; the filler file."""
    filler = directory / "filler"
    free = shutil.disk_usage(directory).free
    with open(filler, "wb") as stream:
        stream.write(b"\0" * max(0, free - leave_bytes))
    return filler


@contextmanager
def read_only_copy(source: Path, path: Path) -> Iterator[Path]:
    """The files of directory ``source`` copied into ``path``, which is read-only for the
    block: a read-only tmpfs as root, file modes otherwise."""
    if os.geteuid() != 0:
        shutil.copytree(source, path)
        for file in path.rglob("*"):
            file.chmod(0o555 if file.is_dir() else 0o444)
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    with small_disk(path, size="64m"):
        shutil.copytree(source, path, dirs_exist_ok=True)
        if not _mount("-o", "remount,ro", str(path)):
            pytest.skip("remounting the tmpfs read-only failed")
        yield path
