"""The errors lmforge raises on purpose, in one place: every raiser and every catcher imports them from here.

The CLI turns a ConfigError, DataError or ModelLoadError into one line naming the key, file or directory (exit 2,
no traceback); a JudgeError (a critic or judge backend that cannot answer) into one line saying how to resume.
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
