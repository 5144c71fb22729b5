"""Final answers out of free-form solutions, for math rewards, evaluation and majority votes.

Where the answer is, in order of trust:

    "... #### 1,234"            GSM8K's marker (the last one)
    "... \\boxed{\\frac{1}{2}}"   MATH's convention (the last box; nested braces are fine)
    "... The answer is 42."     what lmforge's arithmetic world teaches (see ``format_answer``)
    "... so 7 apples"           otherwise the last number in the text

``extract_answer`` returns a canonical string, so equal answers written differently (``1,234.0`` and ``1234``,
``\\frac{3}{4}`` and ``0.75``) vote together; ``is_correct`` compares numbers exactly as fractions and
everything else as whitespace-free strings.
"""

from __future__ import annotations

import re
from decimal import Decimal, localcontext
from fractions import Fraction

ANSWER_PREFIX = "The answer is"

_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}|\\[dt]?frac\s*(\d)\s*(\d)")
# A number not glued to a letter, digit, underscore or dot on either side ("x2", "H2O", "3rd" are not numbers):
# 1,234 (groups of three) or 1234, optional decimals, optional "/denominator".
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?(?![\w]|\.\d)|(?<![\w.])-?\.\d+(?![\w])")
_PLAIN_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:/-?\d+(?:\.\d+)?)?")
_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*", re.IGNORECASE)


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
    if not text:
        return None
    if "####" in text:
        answer = _answer_phrase(text.rsplit("####", 1)[1].strip().split("\n", 1)[0])
        if answer is not None:
            return answer
    boxed = last_boxed(text)
    if boxed is not None:
        return normalize_answer(boxed)
    said = list(_ANSWER_IS.finditer(text))
    if said:
        rest = text[said[-1].end():].split("\n", 1)[0].strip()
        answer = _answer_phrase(rest)
        if answer is not None:
            return answer
    numbers = _NUMBER.findall(_frac_to_slash(text))
    return normalize_answer(numbers[-1]) if numbers else None


def last_boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}`` (or ``\\fbox{...}``), matching nested braces; ``\\boxed 5`` too."""
    boxes = list(re.finditer(r"\\(?:boxed|fbox)", text))
    if not boxes:
        return None
    i = boxes[-1].end()
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] != "{":  # "\boxed 5": up to the next space or dollar sign
        return re.split(r"[\s$]", text[i:], maxsplit=1)[0] or None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None  # unbalanced: the box never closes


def _answer_phrase(rest: str) -> str | None:
    """After "the answer is": the whole phrase when it is one number, else its first number, else the phrase."""
    phrase = rest.rstrip(".").strip()
    if not phrase:
        return None
    if parse_number(phrase) is not None:
        return normalize_answer(phrase)
    first = _NUMBER.search(_frac_to_slash(phrase))
    if first is not None:
        return normalize_answer(first.group())
    return normalize_answer(phrase)


def _frac_to_slash(text: str) -> str:
    r"""\frac{1}{2}, \dfrac{1}{2}, \frac12 -> 1/2 (as plain text, so the number scanner sees one fraction)."""
    return _FRAC.sub(lambda m: f"{m.group(1) or m.group(3)}/{m.group(2) or m.group(4)}", text)


def _strip_latex(text: str) -> str:
    """Remove the LaTeX and typography around an answer: $...$, \\text{units}, \\left( , \\! spacing, %, $."""
    s = text.strip()
    s = re.sub(r"\\text\{([^{}]*)\}|\\mathrm\{([^{}]*)\}", lambda m: m.group(1) or m.group(2) or "", s)
    s = re.sub(r"\\left|\\right|\\[!,;: ]|\\displaystyle", "", s)
    s = s.replace("\\$", "").replace("\\%", "").replace("$", "").replace("%", "").replace("^\\circ", "")
    s = s.replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", "")
    return s.strip().rstrip(".").strip()


def parse_number(text: str) -> Fraction | None:
    """The exact value of a number written as 1,234.50 / -3 / $5 / 50% / 3/4 / \\frac{3}{4}, else None."""
    s = _frac_to_slash(_strip_latex(text)).replace(" ", "")
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    if s.startswith("(") and s.endswith(")"):
        s = s[1:-1]
    if not _PLAIN_NUMBER.fullmatch(s):
        return None
    try:
        numerator, _, denominator = s.partition("/")
        value = Fraction(numerator.rstrip(".") or "0")
        return value / Fraction(denominator) if denominator else value
    except (ValueError, ZeroDivisionError):
        return None


def normalize_number(text: str) -> str | None:
    """Canonical text of a number: "1,234.50" -> "1234.5", "$5.00" -> "5", "3/4" -> "0.75", "1/3" -> "1/3"."""
    value = parse_number(text)
    if value is None:
        return None
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
    """A number's canonical text (units in \\text{...} dropped), else the answer without LaTeX and whitespace."""
    number = normalize_number(text)
    if number is None and "\\text" in text:
        number = normalize_number(re.sub(r"\\text\{[^{}]*\}", "", text))
    if number is not None:
        return number
    s = _strip_latex(text).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return re.sub(r"\s+", "", s)


def answers_match(a: str, b: str) -> bool:
    """Numbers compare by exact value (0.5 == 1/2 == \\frac{1}{2}); anything else as normalized strings."""
    x, y = parse_number(a), parse_number(b)
    if x is not None and y is not None:
        return x == y
    return normalize_answer(a) == normalize_answer(b)


def is_correct(prediction_text: str, gold) -> bool:
    """Does the final answer in a model's solution equal ``gold``?

    gold: the answer itself (42, "3/4", "\\frac{1}{2}") or a reference solution that marks it
    ("... #### 42", "\\boxed{42}", "The answer is 42.").
    """
    predicted = extract_answer(prediction_text)
    if predicted is None:
        return False
    gold_text = str(gold)
    if "####" in gold_text or "\\boxed" in gold_text or _ANSWER_IS.search(gold_text):
        gold_text = extract_answer(gold_text) or ""
    return answers_match(predicted, gold_text)
