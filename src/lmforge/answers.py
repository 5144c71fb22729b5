r"""Final answers out of free-form solutions, for math rewards, evaluation and majority votes.

What counts as the answer (``extract_answer``). The first rule whose marker is in the text decides; later rules
are not tried, so a marker that holds no clean answer gives no answer rather than some other number's guess.

1. ``#### X``: GSM8K's marker, the last one. X is the math that starts the rest of its line.
2. ``\boxed{X}`` (or ``\fbox{X}``): MATH's convention, the last box (nested braces fine; ``\boxed 5`` too; a box
   that never closes gives no answer). Boxes at the end joined only by commas, "and" or "or"
   (``\boxed{1} or \boxed{-2}``) are one answer, the list ``1, -2``.
3. "The answer is X", "Final answer: X", "Answer: X": the last such phrase. X is the math that starts the rest of
   the line, after a few neutral words (is, equals, exactly, therefore, ...): "42 because 6 * 7 = 42" gives 42,
   "$\frac{3}{4}$." gives 3/4. Alternatives ("5 or 6", "$x=5$ and $x=6$") are one list answer. Any other word
   before the math ("not 5", "either 5 or 6", "probably 5") gives no answer. A phrase with no math at all
   ("Evelyn.") is the answer as text, up to its first punctuation.
4. No marker: the last number in the text ("so 7 apples" gives 7), never one glued to a word ("x2", "H2O").

The answer is then cleaned: Unicode minus and spaces, ``$``, ``\left``/``\right``, spacing commands, units in
``\text{}`` after a number, ``%``, ``\$`` and degrees go; ``{,}`` is a thousands comma; an equation keeps its last
side ("x = 5" gives 5, "3 - 5 = -2" gives -2), except in a list ("x=1, y=2"); "(C)" and ``\text{(C)}`` are the
choice C. ``extract_answer`` returns it in canonical form, so that equal answers vote together: a number as
"1234", "0.75" or "1/3" (exact value), anything else without spaces.

Comparison (``answers_match``, ``is_correct``), first rule that applies:

- equal canonical text is equal (``1,234.0`` and ``1234``; ``\dfrac12`` and ``\frac{1}{2}``);
- two plain numbers that differ are different, compared as exact fractions: 0.333 is not 1/3 (the fast path: no
  sympy, a whole ``is_correct`` in about 0.1 ms against math-verify's 10 ms, bench/bench_answers.py);
- a number against a word ("18" against "banana") is different;
- anything else is decided by math-verify (Hugging Face's grader, the one TRL and open-r1 use): both sides
  parsed from LaTeX by sympy and compared symbolically and numerically, so ``\sqrt2`` equals ``\sqrt{2}``,
  ``\pi/2`` equals ``\frac{\pi}{2}``, ``10^{3}`` equals 1000; sets, intervals, matrices (two constants more than
  0.01% apart are a no before its slow simplify runs; its verdict would be the same). A side sympy could spend
  unbounded time on (over 200 characters, nesting deeper than 8, power towers, exponents over 999, factorials of
  big numbers, sums, products, integrals, limits, binomials) is compared as text only. Each parse and comparison
  has a 2 s limit; math-verify enforces it with ``signal.alarm``, which works only in the main thread, so from any
  other thread (``serve``, thread pools) the comparison runs in a helper process (``python -m lmforge.answers``,
  started on first use) that is killed after 10 s.

An answer longer than 1,000 characters is no answer, and only the last 100,000 characters of a text are scanned for
a number (rule 4), so a huge input costs time linear in its size and never more.

A false positive is worse than a false negative for an RL reward (the policy learns whatever is paid for), so a
doubtful case is a no: a hedge is a list, which equals only a gold list with the same members.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import select
import subprocess
import sys
import threading
import warnings
from collections import deque
from decimal import Decimal, localcontext
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

ANSWER_PREFIX = "The answer is"
MAX_ANSWER_CHARS = 1000  # a longer "answer" is no answer
MAX_SYMBOLIC_CHARS = 200  # longer answers are compared as text (MATH-500's longest gold answer has 53 characters)
SYMBOLIC_TIMEOUT_S = 2  # per math-verify parse or comparison (signal.alarm counts whole seconds)
WORKER_TIMEOUT_S = 10.0  # off the main thread: one comparison (2 parses + 1 check) in the helper process

_UNICODE = str.maketrans({"\u2212": "-", "\uff0d": "-", "\u00a0": " ", "\u2009": " ", "\u202f": " ",
                          "\u2007": " ", "\u00d7": "\\times ", "\u00f7": "\\div ", "\u22c5": "\\cdot ",
                          "\u00b7": "\\cdot ", "\u03c0": "\\pi ", "\u221e": "\\infty ", "\u221a": "\\sqrt",
                          "\u2264": "\\le ", "\u2265": "\\ge ", "\u2260": "\\ne ", "\u00b0": "^\\circ"})
_FRAC = re.compile(r"\\[dt]?frac\s*(?:\{([^{}]*)\}|(\d))\s*(?:\{([^{}]*)\}|(\d))")
# A number not glued to a letter, digit, underscore or dot on either side ("x2", "H2O", "3rd" are not numbers):
# 1,234 (groups of three) or 1234, optional decimals, optional "/denominator".
_NUMBER = re.compile(r"(?<![\w.])[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?(?![\w]|\.\d)"
                     r"|(?<![\w.])[-\u2212]?\.\d+(?![\w])")
_PLAIN_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:/-?\d+(?:\.\d+)?)?")
_ANSWER_IS = re.compile(r"\banswers?(?:\s+(?:is|are)\b|\s*[:=])", re.IGNORECASE)
_BOX = re.compile(r"\\(?:boxed|fbox)")
_BOX_JOIN = re.compile(r"(?:\s|\$|,|\\quad|\\qquad|\\[,;]|\\text\{\s*(?:and|or|,)?\s*\}|\b(?:and|or)\b)*")
_FILLER = re.compile(r"(?:\s+|\*\*|__|[:=]|\\[(\[]|(?:is|equals?|to|then|therefore|thus|hence|so|just|simply|exactly"
                     r"|of)\b)*", re.IGNORECASE)
_CONNECTOR = re.compile(r"\s*,?\s*(?:or|and)\s+", re.IGNORECASE)
_MATH_CHARS = frozenset("0123456789+-*/^_=<>()[]|.,:;!'&% \t$")
_COMMAND = re.compile(r"\\(?:[A-Za-z]+|.)", re.DOTALL)
_INTEGER = re.compile(r"-?\d{1,4000}")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_NUMBER_SPACES = re.compile(r"(?<![\d,])\s+|\s+(?![\d,])")
_OR_AND = re.compile(r"\\(?:text|mbox|mathrm)\s*\{\s*(?:or|and)\s*\}|\s+(?:or|and)\s+")
_SPACING = re.compile(r"\\(?:left|right|displaystyle|[dt]extstyle|quad|qquad)(?![A-Za-z])|(?<!\\)\\[!,;: ]\s*")
_DEGREES = re.compile(r"\^\s*\{?\\circ\}?")
_EQUALS = re.compile(r"(?<![<>!\\])=")
_CHOICE = re.compile(r"\(([A-Z])\)|([A-Z])\)")
_TEXT_GROUP = re.compile(r"\\(?:text|textbf|textit|mbox|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}")
_COSTLY = re.compile(r"\\(?:[id]?int|oint|sum|prod|lim|[dt]?binom|choose)(?![A-Za-z])"  # unbounded sympy work
                     r"|(?:\d{4,}|[)}\]])\s*!"  # factorial of a big number or of an expression
                     r"|\^\s*\{[^{}]*\^|\^\s*\(?[-+]?\d+\)?\s*\^"  # power towers: 10^{10^{10}}, 2^3^4
                     r"|\^\s*\{?\s*\(?[-+]?\d{4,}"  # exponents over 999
                     r"|\d{31,}")


def format_answer(answer) -> str:
    """The arithmetic world's answer line: ``The answer is 42.``"""
    return f"{ANSWER_PREFIX} {answer}."


def strip_thinking(text: str) -> str:
    """The text after the think block: an answer inside ``<think> ... </think>`` never counts.

    After the last ``</think>`` (also when the prompt opened the block and the text holds only its close);
    a ``<think>`` never closed (thinking cut off) leaves only what came before it.
    """
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    return text.split("<think>", 1)[0] if "<think>" in text else text


def extract_answer(text: str) -> str | None:
    """The canonical final answer in ``text``, or None when there is none (see the module docstring)."""
    text = strip_thinking(text) if text else text
    answer = _find_answer(text) if text else None
    if answer is None or len(answer) > MAX_ANSWER_CHARS:
        return None
    answer = normalize_answer(answer)
    return answer or None


def _find_answer(text: str) -> str | None:
    """The raw answer, by the module docstring's rules 1-4."""
    if "####" in text:
        start = text.rindex("####") + 4
        return _phrase_answer(text[start:start + MAX_ANSWER_CHARS])
    boxes = _final_boxes(text)
    if boxes is not None:
        return ", ".join(boxes) if all(boxes) else None
    said = _last_anchor(text)
    if said is not None:
        return _phrase_answer(text[said:said + MAX_ANSWER_CHARS])
    numbers = _NUMBER.findall(_frac_to_slash(text[-100_000:]))
    return numbers[-1] if numbers else None


def _last_anchor(text: str) -> int | None:
    """Where the text after the last "the answer is" starts; the tail is searched first (huge texts)."""
    for start in (max(0, len(text) - 10_000), 0):
        said = _last(_ANSWER_IS.finditer(text, start))
        if said is not None or start == 0:
            return said.end() if said is not None else None
    return None


def _last(matches):
    return next(iter(deque(matches, maxlen=1)), None)


def last_boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}`` (or ``\\fbox{...}``), matching nested braces; ``\\boxed 5`` too."""
    start = _last(_BOX.finditer(text))
    return _box_at(text, start.end())[0] if start is not None else None


def _box_at(text: str, i: int) -> tuple[str | None, int]:
    """(contents, end) of the box whose ``\\boxed`` ends at ``i``; contents None when it never closes."""
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] != "{":  # "\boxed 5": up to the next space or dollar sign
        word = re.match(r"[^\s$]*", text[i:i + 1000]).group()
        return word or None, i + len(word)
    end = _closing_brace(text, i, MAX_ANSWER_CHARS + 1)
    return (text[i + 1:end], end + 1) if end >= 0 else (None, len(text))


def _closing_brace(text: str, i: int, within: int | None = None) -> int:
    """Index of the brace closing the one at ``text[i]`` (within ``within`` characters), or -1."""
    depth = 0
    for j in range(i, len(text) if within is None else min(len(text), i + within + 1)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return j
    return -1


def _final_boxes(text: str) -> list[str | None] | None:
    """The last box and the boxes before it joined only by commas/and/or (last 20 at most); None: no box."""
    starts = list(deque(_BOX.finditer(text), maxlen=20))
    if not starts:
        return None
    boxes, end_of_next = [], None
    for m in reversed(starts):
        contents, end = _box_at(text, m.end())
        if end_of_next is not None and not _BOX_JOIN.fullmatch(text[end:end_of_next]):
            break
        boxes.append(contents)
        if contents is None:
            break
        end_of_next = m.start()
    return boxes[::-1]


def _phrase_answer(rest: str) -> str | None:
    """The answer after a marker: the math that starts the line (module docstring, rule 3)."""
    line = rest.split("\n", 1)[0].translate(_UNICODE)
    s = line[_FILLER.match(line).end():]
    parts = []
    while True:
        k = _leading_math(s)
        part = s[:k].strip().strip("*").strip().rstrip(",.;:([").strip()
        if not re.search(r"[0-9A-Za-z\\]", part):
            break
        parts.append(part)
        more = _CONNECTOR.match(s, k)
        if more is None:
            break
        s = s[more.end():]
    if parts:
        return ", ".join(parts)
    if re.search(r"\d", s):  # math after a word: "not 5", "either 5 or 6"
        return None
    return re.split(r"[.,;:!?()]", s, maxsplit=1)[0].strip().strip("*") or None


def _leading_math(s: str) -> int:
    """Length of the math at the start of ``s``: numbers, operators, $...$, LaTeX commands, {groups} and single
    letters. It ends at the first word of two or more letters (prose) or any other character."""
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == "{":
            end = _closing_brace(s, i)
            if end < 0:
                break
            i = end + 1
        elif c == "\\":
            i = _COMMAND.match(s, i).end() if i + 1 < n else n
        elif c.isascii() and c.isalpha():
            j = i + 1
            while j < n and s[j].isascii() and s[j].isalpha():
                j += 1
            if j - i > 1:
                break
            i = j
        elif c in _MATH_CHARS:
            i += 1
        else:
            break
    return i


def _frac_to_slash(text: str) -> str:
    r"""\frac{1}{2}, \dfrac{1}{2}, \frac12, \frac{270}7 -> 1/2 (plain text, so the number scanner sees one number);
    after a digit with a space (137\frac{1}{2} is a mixed number, not 1371/2)."""
    return _FRAC.sub(lambda m: f"{' ' if m.start() and text[m.start() - 1].isdigit() else ''}"
                               f"{m.group(1) or m.group(2)}/{m.group(3) or m.group(4)}", text)


def _clean(text: str) -> str:
    """An answer without its LaTeX dressing and typography (see the module docstring); idempotent."""
    s = str(text)
    if _INTEGER.fullmatch(s):
        return s  # the common case, nothing to clean
    s = s.translate(_UNICODE).strip()
    s = _OR_AND.sub(", ", s)
    s = s.replace("{,}", ",").replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = s.replace("**", "")
    if "\\" in s:
        s = s.replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", "")
        s = _DEGREES.sub("", _SPACING.sub("", s))
    s = s.strip().rstrip(".").strip()
    if "\\" in s and _TEXT_GROUP.search(s):
        without = _TEXT_GROUP.sub("", s).strip()
        s = without if without and _as_number(without) is not None else _TEXT_GROUP.sub(r"\1", s).strip()
    if "=" in s and not _top_level(s, ",;"):
        s = _EQUALS.split(s)[-1].strip()
    choice = _CHOICE.fullmatch(s)
    return (choice.group(1) or choice.group(2)) if choice else s


def _top_level(s: str, chars: str) -> bool:
    """Does ``s`` hold one of ``chars`` outside every bracket?"""
    depth = 0
    for c in s:
        if c in "({[":
            depth += 1
        elif c in ")}]":
            depth -= 1
        elif depth == 0 and c in chars:
            return True
    return False


def _as_number(s: str) -> Fraction | None:
    """The exact value of an already cleaned answer that is one plain number, else None."""
    if _INTEGER.fullmatch(s):
        return Fraction(int(s))
    s = _frac_to_slash(s) if "frac" in s else s
    s = _NUMBER_SPACES.sub("", s)  # spaces go, except between digits ("1 2" is two numbers)
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if s.startswith("(") and s.endswith(")"):
        s = s[1:-1]
    if len(s) > 4000 or not _PLAIN_NUMBER.fullmatch(s):
        return None
    try:
        numerator, _, denominator = s.partition("/")
        value = Fraction(numerator.rstrip(".") or "0")
        return value / Fraction(denominator) if denominator else value
    except (ValueError, ZeroDivisionError):
        return None


def parse_number(text: str) -> Fraction | None:
    """The exact value of a number written as 1,234.50 / -3 / $5 / 50% / 3/4 / \\frac{3}{4} / x = 5, else None."""
    return _as_number(_clean(text))


def normalize_number(text: str) -> str | None:
    """Canonical text of a number: "1,234.50" -> "1234.5", "$5.00" -> "5", "3/4" -> "0.75", "1/3" -> "1/3"."""
    value = parse_number(text)
    return None if value is None else _number_text(value)


def _number_text(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    d = value.denominator
    while d % 2 == 0:
        d //= 2
    while d % 5 == 0:
        d //= 5
    if d != 1:  # no finite decimal: keep the reduced fraction
        return f"{value.numerator}/{value.denominator}"
    with localcontext() as ctx:
        ctx.prec = 60
        return format((Decimal(value.numerator) / Decimal(value.denominator)).normalize(), "f")


def normalize_answer(text: str) -> str:
    """Canonical text of an answer: a number's exact value ("1234", "0.75", "1/3"), else the cleaned answer with
    ``\\dfrac``/``\\tfrac`` as ``\\frac``, ``\\frac12`` and ``\\sqrt2`` braced, and no whitespace."""
    s = _clean(text)
    value = _as_number(s)
    if value is not None:
        return _number_text(value)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt\s*(\d)", r"\\sqrt{\1}", s)
    # no whitespace, except one space between digits ("1 2" is two numbers) and after a command ("\\pi r")
    s = re.sub(r"(?<=\d)\s+(?=\d)", "\x00", s)
    s = re.sub(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])", "\\1\x00", s)
    return re.sub(r"\s+", "", s).replace("\x00", " ")


def answers_match(predicted: str, gold: str) -> bool:
    """Is ``predicted`` the same answer as ``gold``? (the module docstring's comparison rules)."""
    a, b = normalize_answer(predicted), normalize_answer(gold)
    if not a or not b:
        return False
    if a == b:
        return True
    x, y = _as_number(a), _as_number(b)
    if x is not None and y is not None:
        return False  # canonical numbers are equal exactly when their texts are
    if (x is not None or y is not None) and re.fullmatch(r"[A-Za-z ,]*[A-Za-z]{2}[A-Za-z ,]*", a if y is not None
                                                         else b):
        return False  # a word against a number: nothing for sympy to find
    return _symbolic_equal(b, a)


def is_correct(prediction_text: str, gold) -> bool:
    """Does the final answer in a model's solution equal ``gold``?

    gold: the answer itself (42, "3/4", "\\frac{1}{2}", "x=5") or a reference solution that marks it
    ("... #### 42", "\\boxed{42}", "The answer is 42.").
    """
    predicted = extract_answer(prediction_text)
    if predicted is None:
        return False
    gold_text = str(gold)
    if "####" in gold_text or "\\boxed" in gold_text or "\\fbox" in gold_text or _ANSWER_IS.search(gold_text):
        gold_text = extract_answer(gold_text) or ""
    return answers_match(predicted, gold_text)


def too_costly(answer: str) -> bool:
    """Would sympy risk unbounded time on this answer? (then it is compared as text only)"""
    if len(answer) > MAX_SYMBOLIC_CHARS or _COSTLY.search(answer):
        return True
    depth = deepest = 0
    for c in answer:
        depth += (c in "({[") - (c in ")}]")
        deepest = max(deepest, depth)
    return deepest > 8


@lru_cache(maxsize=8192)
def _symbolic_equal(gold: str, predicted: str) -> bool:
    """math-verify's verdict on two canonical answers, within the time limits (module docstring)."""
    if too_costly(gold) or too_costly(predicted):
        return False
    if threading.current_thread() is threading.main_thread():
        return math_verify_equal(gold, predicted)
    return _WORKER.equal(gold, predicted)


def math_verify_equal(gold: str, predicted: str) -> bool:
    """math-verify's ``verify(parse(gold), parse(predicted))`` on two answers (LaTeX or plain), with its
    signal-based time limits: call it from the main thread. False when math-verify is not installed.

    Two constants whose values differ by more than 0.01% are a no before ``verify`` runs: its answer would be
    the same, but it spends 0.1-1 s in simplify to find it, and most wrong answers are such constants."""
    mv = _math_verify()
    if mv is None:
        return False
    try:
        parsed_gold, parsed = _mv_parse(gold), _mv_parse(predicted)
        if _clearly_different(parsed_gold, parsed):
            return False
        return bool(mv.verify(parsed_gold, parsed, timeout_seconds=SYMBOLIC_TIMEOUT_S))
    except Exception:  # a sympy failure on a strange input is a no, never a crash of the reward
        return False


def _clearly_different(gold: list, predicted: list) -> bool:
    """Are the first parses of both sides numeric constants (sympy's is_number) more than 0.01% apart?"""
    if not gold or not predicted:
        return False
    a, b = gold[0], predicted[0]
    if getattr(a, "is_number", False) is not True or getattr(b, "is_number", False) is not True:
        return False  # a symbol, set, interval, relation, matrix or string: for verify to judge
    try:
        x, y = complex(a.evalf(30)), complex(b.evalf(30))
    except (TypeError, ValueError, OverflowError):
        return False
    if not all(math.isfinite(v) for v in (x.real, x.imag, y.real, y.imag)):
        return False
    return abs(x - y) > 1e-4 * max(1.0, abs(x), abs(y))


@lru_cache(maxsize=4096)
def _mv_parse(answer: str) -> list:
    mv = _math_verify()
    return mv.parse(f"${answer}$", extraction_config=[mv.LatexExtractionConfig(), mv.ExprExtractionConfig()],
                    parsing_timeout=SYMBOLIC_TIMEOUT_S)


@lru_cache(maxsize=1)
def _math_verify():
    try:
        import math_verify
    except ImportError:
        warnings.warn("math-verify is not installed: symbolic answers (\\sqrt2 vs \\sqrt{2}) are compared as text "
                      "only (pip install math-verify)", stacklevel=3)
        return None
    # its warnings quote the input at every timeout: an RL policy's strange LaTeX would flood the log
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    # sympy's first symbolic comparisons load modules and caches for about a second each: do that once here, with
    # no time limit (known inputs), so that a real answer's first check is not cut off by the limit
    for gold, predicted in _WARM_UP:
        math_verify.verify(math_verify.parse(f"${gold}$", parsing_timeout=None),
                           math_verify.parse(f"${predicted}$", parsing_timeout=None), timeout_seconds=None)
    return math_verify


_WARM_UP = [(r"\frac{\pi}{2}", r"\pi/2"), ("x^{2}+1", "1+x^2"), ("1000", "10^{3}"), (r"2\sqrt{2}", r"\sqrt{8}"),
            (r"(-\infty,2)\cup(3,\infty)", r"(3,\infty)\cup(-\infty,2)"), ("1,-2", "-2,1"), ("6-5i", "6-5i"),
            (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}"), ("y=2x", "2x")]


class _HelperProcess:
    """math_verify_equal in a child Python (``python -m lmforge.answers``, one JSON line per comparison), for
    callers off the main thread: signal.alarm works only in a main thread, and the child's main thread has it.
    A comparison that takes over WORKER_TIMEOUT_S kills the child; the next comparison starts a fresh one."""

    def __init__(self):
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._broken = False

    def equal(self, gold: str, predicted: str) -> bool:
        with self._lock:
            if self._broken or (self._proc is None or self._proc.poll() is not None) and not self._start():
                return False
            return self._ask(gold, predicted, WORKER_TIMEOUT_S) or False

    def _start(self) -> bool:
        src = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", "lmforge.answers"], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, text=True, encoding="utf-8", env=env)
        except OSError as e:
            self._proc = None
            return self._give_up(repr(e))
        return self._ask("1", "1", 120.0) is not None or self._give_up("it did not answer")  # imports sympy

    def _ask(self, gold: str, predicted: str, timeout: float) -> bool | None:
        """The child's verdict, or None when it did not give one in time (then it is killed)."""
        try:
            self._proc.stdin.write(json.dumps([gold, predicted]) + "\n")
            self._proc.stdin.flush()
            if select.select([self._proc.stdout], [], [], timeout)[0]:
                line = self._proc.stdout.readline()
                if line:
                    return line.strip() == "1"
        except (OSError, ValueError):
            pass
        self._proc.kill()
        self._proc.wait()
        self._proc = None
        return None

    def _give_up(self, why: str) -> bool:
        self._broken = True
        warnings.warn(f"answers: no helper process for symbolic checks off the main thread ({why}); such answers "
                      "are compared as text only", stacklevel=5)
        return False


_WORKER = _HelperProcess()


def _serve_comparisons() -> None:
    """The helper process: read [gold, predicted] JSON lines, answer "1" or "0" per line."""
    for line in sys.stdin:
        gold, predicted = json.loads(line)
        sys.stdout.write("1\n" if math_verify_equal(gold, predicted) else "0\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve_comparisons()
