"""``lmforge(*args)``: run the CLI in a fresh interpreter, as a user would, for the end-to-end tests."""

import os
import subprocess
import sys


def lmforge(*args: str, check: bool = True, input: str | None = None, timeout: int = 900,
            threads: int | None = None) -> subprocess.CompletedProcess:
    """``python -m lmforge ARGS``; with ``check`` a non-zero exit raises with both outputs. ``threads`` sets
    OMP_NUM_THREADS for the child (tiny models gain nothing from more, and busy machines lose)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    proc = subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, input=input,
                          timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"lmforge {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc
