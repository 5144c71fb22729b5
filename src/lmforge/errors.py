"""The errors lmforge raises on purpose, in one place: every raiser and every catcher imports them from here.

The CLI turns a ConfigError, DataError, ModelLoadError, EnvError or RunError into one line naming the key, file,
directory, environment or step (exit 2, no traceback); a JudgeError (a critic or judge backend that cannot
answer) into one line saying how to resume.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad recipe or override; the message names the key (and file, when there is one)."""


class DataError(ValueError):
    """Bad input data; the message names the file, the line and the field."""


class ModelLoadError(DataError):
    """A model directory (or hub id) that cannot be opened: missing, not a model, or weights that do not fit."""


class JudgeError(RuntimeError):
    """A backend that cannot answer: unreachable, timing out, or speaking something other than the protocol."""


class EnvError(DataError):
    """An RL environment that misbehaves (raises, returns the wrong types, never finishes); the message names the
    environment, the prompt and the step."""


class RunError(RuntimeError):
    """A run that cannot go on: the message names the step or the directory, and what to do (e.g. a non-finite
    loss under nan_policy=stop, or an out_dir another live run is writing)."""


class OutDirInUse(RunError):
    """Another live process holds the out_dir's lock file (train/runlock.py); the message names its PID."""
