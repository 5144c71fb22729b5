"""Files and directories that appear whole or not at all: a kill at any moment leaves the old version or the new.

    write_atomic(path, text or bytes)   write ``path.tmp``, flush and fsync it, rename it over ``path``, fsync the dir
    atomic_open(path)                   the same as a context manager, for writers that want a file (csv, numpy)
    replace_dir(src, dst)               fsync every file of a finished directory, then rename it over an existing
                                        one (moved aside first): checkpoints and model directories

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


def fsync_tree(root: str | Path) -> None:
    """fsync every file under ``root`` and every directory in it (``root`` included), so that a rename of
    ``root`` that follows publishes data already on disk."""
    root = Path(root)
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            fsync_file(path)
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(root)


def fsync_file(path: str | Path) -> None:
    """Flush a written file's data to disk (read-only first: POSIX allows it; Windows needs a writable handle)."""
    for flags in (os.O_RDONLY, os.O_RDWR):
        fd = os.open(path, flags)
        try:
            os.fsync(fd)
            return
        except OSError:
            if flags == os.O_RDWR:
                raise
        finally:
            os.close(fd)


def replace_dir(src: Path, dst: Path) -> None:
    """Make ``src``'s files durable, then rename it to ``dst``, moving an existing ``dst`` aside first (a directory
    cannot be replaced)."""
    src, dst = Path(src), Path(dst)
    fsync_tree(src)
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
