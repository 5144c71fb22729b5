"""Files and directories that appear whole or not at all: a kill at any moment leaves the old version or the new.

    write_atomic(path, text or bytes)   write ``path.tmp``, flush and fsync it, rename it over ``path``, fsync the dir
    atomic_open(path)                   the same as a context manager, for writers that want a file (csv, numpy)
    replace_dir(src, dst)               rename a finished directory over an existing one (moved aside first)

The fsyncs make the rename durable: without them a power cut can leave the new name pointing at empty blocks.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Make a rename (or a new entry) in directory ``path`` durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs) -> Iterator:
    """Open ``path.tmp`` for writing; on a clean exit fsync it and rename it to ``path`` (then fsync the directory).
    On an exception the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Replace ``path`` with ``data`` (text as UTF-8) atomically and durably; returns the path."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return Path(path)


def replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, moving an existing ``dst`` aside first (a directory cannot be replaced)."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        old = dst.with_name(dst.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old)
    else:
        os.replace(src, dst)
    fsync_dir(dst.parent)
