"""Atomic file writes: the one place that writes files that must never be half-written.

Used for .nsk files, training checkpoints and cached baselines: data goes to a temp file in
the same folder, is flushed and fsynced, then renamed over the target, and the folder is
fsynced so the rename survives a crash. A failed write leaves no temp file behind. The file
gets the permissions a plain `open(path, "wb")` would give it (an existing file's mode, else
0666 less the umask), not the 0600 of the temp file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | os.PathLike[str], data: bytes | Callable[[BinaryIO], object]
                 ) -> None:
    """Write `data` (bytes, or a function that writes to a binary stream) to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _mode_for(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as stream:
            if isinstance(data, (bytes, bytearray, memoryview)):
                stream.write(data)
            else:
                data(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def _mode_for(path: Path) -> int:
    """The permission bits `open(path, "wb")` would leave: the existing file's, or 0666
    less the process umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (a no-op where folders cannot be opened)."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)
