"""Environments for multi-turn RL and tool use: the model takes turns, the environment answers each one.

An environment is any class with

    stop_strings: list[str]                     (optional) where a model turn ends besides end-of-turn / EOS
    reset(row: dict) -> str | None              a new episode for a prompt row {"prompt", "answer", ...}; optional
                                                text appended to the prompt before the first turn
    step(text: str) -> (observation, reward, done)
                                                the model's turn (its text, up to and including a stop string):
                                                the text the environment puts after it (masked out of the loss: the
                                                model never learns to produce it), a float reward, and whether the
                                                episode is over. The episode's reward is the sum of its steps'.

one fresh instance per episode. ``lmforge grpo environment=NAME`` runs GRPO over whole trajectories with it
(rollout.sample_trajectories); NAME is a built-in below or a user's class, ``package.module:Class`` or
``path/to/file.py:Class``. A misbehaving environment (raises, returns a non-string observation, a non-finite
reward, or never finishes within ``max_env_steps``) stops the run with one error naming it and the step
(errors.EnvError): the last checkpoint, written atomically before, stays the run's valid resume point.

Built in (the tiny world's arithmetic):

    calculator   a tool: a turn ending in ``<calc>347 + 289</calc>`` gets back `` = 636.`` (+ - * / and brackets
                 on numbers; `` = error.`` otherwise) and another turn; a turn without a call is the answer,
                 reward 1 if answers.is_correct, else 0. At most ``max_calls`` calls, then the episode ends at 0.
    feedback     multi-turn: a wrong answer gets back "Not quite. Check the carries and try again." and another
                 turn, up to ``max_turns``; reward 1 / (the turn that got it right), 0 if none did.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import math
import operator
import re
from fractions import Fraction
from pathlib import Path

from lmforge.answers import is_correct
from lmforge.errors import EnvError

CALL = re.compile(r"<calc>(.*?)</calc>\s*$", re.DOTALL)
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def calculate(expression: str) -> str:
    """The value of an arithmetic expression (numbers, + - * /, brackets) as text: exact, an integer when it is
    one, else a decimal rounded to 6 places; "error" for anything else (never evaluates names or calls)."""
    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -value(node.operand) if isinstance(node.op, ast.USub) else value(node.operand)
        raise ValueError(node)
    try:
        result = value(ast.parse(expression.strip().replace("x", "*").replace("×", "*"), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return "error"
    if result.denominator == 1:
        return str(result.numerator)
    return f"{float(result):.6f}".rstrip("0")


class Calculator:
    """The calculator tool (see the module docstring)."""
    stop_strings = ["</calc>"]

    def __init__(self, max_calls: int = 3):
        self.max_calls = max_calls

    def reset(self, row: dict) -> None:
        self.answer, self.calls = row.get("answer"), 0

    def step(self, text: str) -> tuple[str, float, bool]:
        call = CALL.search(text)
        if call is None:
            return "", float(self.answer is not None and is_correct(text, self.answer)), True
        self.calls += 1
        if self.calls > self.max_calls:
            return "", 0.0, True
        return f" = {calculate(call.group(1))}.", 0.0, False


class Feedback:
    """Multi-turn answering with feedback (see the module docstring)."""
    stop_strings: list[str] = []
    hint = "\nNot quite. Check the carries and try again.\n"

    def __init__(self, max_turns: int = 3):
        self.max_turns = max_turns

    def reset(self, row: dict) -> None:
        self.answer, self.turn = row.get("answer"), 0

    def step(self, text: str) -> tuple[str, float, bool]:
        self.turn += 1
        if self.answer is not None and is_correct(text, self.answer):
            return "", 1.0 / self.turn, True
        if self.turn >= self.max_turns:
            return "", 0.0, True
        return self.hint, 0.0, False


BUILTIN = {"calculator": Calculator, "feedback": Feedback}


@functools.cache
def load_environment(spec: str):
    """The environment class ``spec`` names: a built-in, ``package.module:Class`` or ``file.py:Class`` (a file is
    loaded once per process, so the rollouts and the evaluation share its module)."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    module_name, _, class_name = spec.rpartition(":")
    if not module_name or not class_name:
        raise EnvError(f"environment {spec!r}: not a built-in ({', '.join(BUILTIN)}) nor module:Class")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            loader = importlib.util.spec_from_file_location(path.stem, path)
            if loader is None or not path.exists():
                raise FileNotFoundError(path)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        cls = getattr(module, class_name)
    except Exception as e:  # a user's file: any failure to load is the one error
        raise EnvError(f"environment {spec!r}: cannot load it ({type(e).__name__}: {e})") from e
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if missing:
        raise EnvError(f"environment {spec!r}: has no {' or '.join(missing)} method")
    return cls


class Episode:
    """One episode of an environment, every call checked: errors name the environment, the prompt and the step.
    ``max_steps``: the step limit after which an episode that has not finished is an error."""

    def __init__(self, env_cls, name: str, row: dict, index: int, max_steps: int):
        self.name, self.index, self.max_steps, self.steps = name, index, max_steps, 0
        self.env = self._call(env_cls, "creating it")
        self.stop_strings = list(getattr(self.env, "stop_strings", None) or [])
        first = self._call(self.env.reset, "reset", row)
        if first is not None and not isinstance(first, str):
            self._fail("reset", f"returned {type(first).__name__}, not a string or None")
        self.first = first or ""

    def step(self, text: str) -> tuple[str, float, bool]:
        self.steps += 1
        where = f"step {self.steps}"
        out = self._call(self.env.step, where, text)
        if not (isinstance(out, tuple) and len(out) == 3):
            self._fail(where, f"returned {out!r:.80}, not (observation, reward, done)")
        observation, reward, done = out
        if not isinstance(observation, str):
            self._fail(where, f"returned a {type(observation).__name__} observation, not a string")
        if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
            self._fail(where, f"returned the reward {reward!r}, not a finite number")
        if not isinstance(done, bool):
            self._fail(where, f"returned done={done!r}, not True or False")
        if not done and self.steps >= self.max_steps:
            self._fail(where, f"never finished: still not done after max_env_steps={self.max_steps} steps")
        return observation, float(reward), done

    def _call(self, fn, where: str, *args):
        try:
            return fn(*args)
        except Exception as e:  # a user's environment: whatever it raises becomes the one error
            self._fail(where, f"raised {type(e).__name__}: {e}", e)

    def _fail(self, where: str, what: str, cause: Exception | None = None):
        raise EnvError(f"environment {self.name!r}, prompt {self.index}, {where}: {what}") from cause
