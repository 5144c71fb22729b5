"""One live run per out_dir: ``out_dir/lmforge.lock`` holds the owner's PID, host, start time and command.

    lock_out_dir(out_dir)     take the lock (a no-op for a process that holds it already; counted); another live
                              process holding it is an OutDirInUse error naming its PID
    unlock_out_dir(out_dir)   give one hold back; the last one removes the file
    unlock_all()              every lock this process holds (the CLI, after a verb; atexit)

The mutual exclusion is the operating system's (``flock`` on POSIX, ``msvcrt.locking`` on Windows) on the open
lock file, so it ends with the process however the process ends: a lock file left behind by a run that was
killed (kill -9, a power cut, an OOM kill) names a PID that no longer holds it, and the next run takes it over
with a note saying so. Two runs started at the same moment cannot both win.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
from pathlib import Path

from lmforge.errors import OutDirInUse

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

LOCK_FILE = "lmforge.lock"
_held: dict[Path, list[int]] = {}  # lock file -> [fd, holds] for this process


def _forget_inherited() -> None:
    """In a forked child: the parent's locks are the parent's (closing our copies of their descriptors leaves
    the parent's flock in place), so a lock_out_dir here must win the lock itself or fail."""
    for fd, _ in _held.values():
        os.close(fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_inherited)


def lock_out_dir(out_dir: str | Path) -> Path:
    """Take ``out_dir``'s lock for this process; returns the lock file. Raises OutDirInUse when another live
    process holds it; takes over (with a note on stderr) a lock file whose process is gone."""
    path = Path(out_dir).resolve() / LOCK_FILE
    if path in _held:
        _held[path][1] += 1
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            owner = _read_owner(fd)
            os.close(fd)
            raise OutDirInUse(f"{out_dir} is in use by another run: {_describe(owner)} holds {path}. Wait for "
                              "it to finish or stop it, or give this run another out_dir")
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else its last owner removed the file between our open and our lock: lock the new one
            break
        os.close(fd)
    previous = _read_owner(fd)
    if previous.get("pid") not in (None, os.getpid()):
        print(f"note: {path} was left by {_describe(previous)}, which is no longer running (killed before it "
              "could clean up); this run takes it over", file=sys.stderr, flush=True)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)[:500]}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(record) + "\n").encode())
    if not _held:
        atexit.register(unlock_all)
    _held[path] = [fd, 1]
    return path


def unlock_out_dir(out_dir: str | Path) -> None:
    """Give back one hold of ``out_dir``'s lock; the last one removes the lock file and releases it."""
    path = Path(out_dir).resolve() / LOCK_FILE
    entry = _held.get(path)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        _release(path)


def unlock_all() -> None:
    """Release every lock this process holds."""
    for path in list(_held):
        _release(path)


def _release(path: Path) -> None:
    fd, _ = _held.pop(path)
    if fcntl is not None:
        path.unlink(missing_ok=True)  # while still locked: whoever opens the path next gets a fresh file
        os.close(fd)
    else:
        os.close(fd)  # Windows removes no open file
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def _try_lock(fd: int) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:  # BlockingIOError (POSIX) or PermissionError (Windows): another process holds it
        return False
    return True


def _read_owner(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        record = json.loads(os.read(fd, 4096).decode("utf-8", "replace") or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _describe(owner: dict) -> str:
    if not owner.get("pid"):
        return "a process that left no PID"
    where = f" on {owner['host']}" if owner.get("host") and owner["host"] != socket.gethostname() else ""
    since = f", started {owner['started']}" if owner.get("started") else ""
    command = f" ({owner['command'][:120]})" if owner.get("command") else ""
    return f"PID {owner['pid']}{where}{since}{command}"
