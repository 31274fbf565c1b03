"""Writing a file so that a reader never sees it half-written: write beside the target, then rename over it.

Pure Python, no imports from the pack or ComfyUI: the nodes and demo modules import it relatively, and the scripts and
benchmarks (outside the package) through scripts/atomic.py.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_destination(path: Path | str) -> Iterator[str]:
    """Yield a temporary path in the target's folder for the caller to write; on success it is flushed to disk and
    becomes `path` (world-readable like any shipped file: mkstemp makes 0600); on failure, Cancel included, it is
    removed and the target is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as written:  # the rename must not reach the disk before the data
            os.fsync(written.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomically(path: Path | str, data: str | bytes) -> None:
    with atomic_destination(path) as tmp:
        Path(tmp).write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
