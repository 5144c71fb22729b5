"""The thinking world: chains of one-digit sums and differences at five difficulty levels, solved in a ``<think>``.

Level L is a chain of L operations on one-digit numbers (level 1: ``What is 7+5?``, level 5:
``What is 7+5-9+3+8-2?``; every running total stays in 0..18). The assistant thinks by rewriting the
chain, one operation at a time, until one number is left, then closes the think block and states the answer on
the line the checker reads:

    What is 7+5-9+3?          <think>
                              7+5-9+3
                              12-9+3
                              3+3
                              6
                              </think>
                              The answer is 6.

Each line is the line before with its first operation done: a copy and one small sum, which a ~3M-parameter model
learns in minutes, whereas answering directly needs the whole chain at once. So thinking is what solves the hard
levels. Demonstrations vary in length on purpose:

    direct   an empty think block, ``<think></think>``, the answer at once (what budget 0 writes and asks for)
    steps    the rewrites, then the answer
    check    the rewrites, then ``Wait`` and a check of every operation (``12-9=3 ok``); a mistake found is
             corrected and the rewriting redone from there: ``wait: 12-9=3, not 4`` -> ``3+3`` -> ``6``

and some demonstrations slip (one operation off by one or two, the rest of the chain following the slip); a check
catches its slip, an unchecked slip ends in a wrong answer, so checking really fixes mistakes, and pays more on
the hard levels (more operations, more slips). Harder problems are checked more often, as a careful
demonstrator would.

The hasty variant (``think_hasty_text``, ``think_hasty_sft``: a world where "Wait" has something to fix) adds a
fourth style, most common on the short chains of levels 2-3, where a chain looks easy enough to do at once:

    hasty    the chain, then its total in one line (``= 6``), done in the head (a slip lands on that total);
             30% of them then write ``Wait``, restate the chain and rewrite it, and answer from the rewrites

so a model trained on it often stops after one line, and a forced ``Wait`` (s1's budget forcing) turns that into
the rewriting it knows, which is what decides whether "Wait" raises accuracy in this world.

``step_labels`` is the step checker: whether each line of a think block is right given the lines before it (the
labels of the PRM's stepwise data). Problems split into train and test by a hash of the
problem, so every source agrees on what is held out; the held-out set is stratified by level.

Sources (``builtin:tinyworld/NAME``): ``think_text`` (documents for pre-training), ``think_sft``
({"messages"}), ``think_hasty_text`` and ``think_hasty_sft`` (the same in the hasty variant), ``think_rl``,
``think_eval`` and ``think_eval_large`` ({"prompt", "answer", "level"}),
``think_eval_hard`` and ``think_rl_hard`` (the hardest levels alone), ``think_stepwise`` (TRL's stepwise rows
{"prompt", "completions", "labels"}, half of them with a slip).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from lmforge.answers import format_answer, is_correct
from lmforge.thinking import split_steps

LEVELS = (1, 2, 3, 4, 5)
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
WAIT = "Wait"  # opens the check section; budget forcing appends the same word (s1)
TEST_FRACTION = {1: 0.3, 2: 0.1, 3: 0.1, 4: 0.1, 5: 0.1}  # level 1 has only ~150 problems
CHECK_RATE = {1: 0.1, 2: 0.25, 3: 0.4, 4: 0.55, 5: 0.7}  # share of thinking demonstrations that check
DIRECT_RATE = 0.1  # share of demonstrations that answer with an empty think block
HASTY_RATE = {1: 0.0, 2: 0.6, 3: 0.6, 4: 0.1, 5: 0.05}  # hasty worlds: share of thinking demonstrations in one line
HASTY_WAIT_RATE = 0.3  # share of the hasty ones that then write Wait and rewrite the chain
SLIP_RATE = 0.2  # share of thinking demonstrations with one slipped operation
MAX_TOTAL = 18  # running totals stay in [0, 18]
_CHAIN = re.compile(r"\d+(?:[+-]\d+)*")


@dataclass(frozen=True)
class Problem:
    numbers: tuple[int, ...]  # one-digit operands (the running total may grow past 9)
    ops: tuple[str, ...]  # "+" or "-", one fewer than numbers

    @property
    def level(self) -> int:
        return len(self.ops)

    @property
    def answer(self) -> int:
        return self.totals()[-1]

    @property
    def question(self) -> str:
        return "What is " + _chain(self.numbers, self.ops) + "?"  # no spaces: the first line copies it as is

    @property
    def split(self) -> str:
        return "test" if unit_hash(f"think/{_chain(self.numbers, self.ops)}") < TEST_FRACTION[self.level] else "train"

    def totals(self, slip: tuple[int, int] | None = None) -> list[int]:
        """The running total after each operation; slip=(k, delta) writes operation k's result off by delta
        (never below 0) and carries on from the slipped total, as a careless solver would."""
        out, total = [], self.numbers[0]
        for k, (op, x) in enumerate(zip(self.ops, self.numbers[1:], strict=True)):
            total = total + x if op == "+" else total - x
            if slip is not None and slip[0] == k:
                total += slip[1]
            out.append(max(total, 0))  # only a slipped chain could go below 0: the careless solver stops at 0
            total = out[-1]
        return out


def _chain(numbers, ops, space: str = "") -> str:
    parts = [str(numbers[0])]
    for op, x in zip(ops, numbers[1:], strict=True):
        parts += [op, str(x)]
    return space.join(parts)


def unit_hash(text: str) -> float:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") / 2**64


def rewrite_lines(p: Problem, totals: list[int], start: int = 0) -> list[str]:
    """The chain rewritten after each operation from ``start`` on: ``12-9+3``, ``3+3``, ``6``."""
    return [_chain((t,) + p.numbers[k + 2:], p.ops[k + 1:]) for k, t in enumerate(totals) if k >= start]


def op_text(p: Problem, k: int, before: int, result: int) -> str:
    """``12-9=3``: operation k applied to the total before it."""
    return f"{before}{p.ops[k]}{p.numbers[k + 1]}={result}"


def think_lines(p: Problem, style: str, slip: tuple[int, int] | None = None) -> list[str]:
    """The lines of a think block in one style (direct | steps | check | hasty | hasty_wait), with an optional
    slip (in the hasty styles, on the one-line total)."""
    if style == "direct":
        return []
    mine = p.totals(slip)
    if style in ("hasty", "hasty_wait"):
        head = [_chain(p.numbers, p.ops), f"= {mine[-1]}"]
        return head if style == "hasty" else head + [WAIT, head[0]] + rewrite_lines(p, p.totals())
    lines = [_chain(p.numbers, p.ops)] + rewrite_lines(p, mine)
    if style == "steps":
        return lines
    right = p.totals()
    lines.append(WAIT)
    before = p.numbers[0]
    for k, (got, true) in enumerate(zip(mine, right, strict=True)):
        if got == true:
            lines.append(op_text(p, k, before, true) + " ok")
            before = true
            continue
        lines.append(f"wait: {op_text(p, k, before, true)}, not {got}")
        return lines + rewrite_lines(p, right, k)
    return lines


def result_of(lines: list[str]) -> int | None:
    """The number the think block ends on: its last line that is a bare number (or a hasty ``= N``)."""
    for line in reversed(lines):
        if line.removeprefix("= ").isdigit():
            return int(line.removeprefix("= "))
    return None


def think_text(lines: list[str]) -> str:
    """``<think>\\n`` + one line each + ``</think>``; no lines: ``<think></think>``, exactly what a thinking budget
    of 0 writes (the close forced right after the open), so budget 0 asks for the direct demonstrations' answer."""
    return "\n".join([THINK_OPEN, *lines, THINK_CLOSE]) if lines else THINK_OPEN + THINK_CLOSE


def solution(p: Problem, style: str = "steps", slip: tuple[int, int] | None = None) -> str:
    """The whole assistant turn: the think block, then ``The answer is N.`` (N as the thinking found it)."""
    lines = think_lines(p, style, slip)
    found = result_of(lines)
    return f"{think_text(lines)}\n{format_answer(p.answer if found is None else found)}"


# ---- drawing problems ----

def random_problem(rng: random.Random, level: int) -> Problem:
    """``level`` operations on one-digit numbers, each "+" or "-" at random, as long as the running total stays
    in [0, MAX_TOTAL] (so every step is one of a few hundred small sums a tiny model can learn)."""
    numbers, ops = [rng.randint(0, 9)], []
    total = numbers[0]
    for _ in range(level):
        x = rng.randint(0, 9)
        can = [op for op, ok in (("+", total + x <= MAX_TOTAL), ("-", x <= total)) if ok]
        op = rng.choice(can)
        total = total + x if op == "+" else total - x
        numbers.append(x)
        ops.append(op)
    return Problem(tuple(numbers), tuple(ops))


def problems(n: int, split: str = "train", seed: int = 0, levels=LEVELS, unique: bool = False) -> list[Problem]:
    """``n`` problems of one split, levels drawn uniformly from ``levels``; deterministic in the arguments."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"thinkworld/{split}/{seed}/{','.join(map(str, levels))}")
    out, seen = [], set()
    for _ in range(400 * n + 1000):
        if len(out) == n:
            return out
        p = random_problem(rng, rng.choice(levels))
        if p.split == split and not (unique and p in seen):
            seen.add(p)
            out.append(p)
    raise ValueError(f"could not draw {n} {split} problems at levels {levels}; ask for fewer")


def stratified_test(per_level: int, seed: int = 0, levels=LEVELS) -> list[Problem]:
    """``per_level`` distinct held-out problems of every level, level by level."""
    return [p for level in levels for p in problems(per_level, "test", seed, levels=(level,), unique=True)]


def draw_style(rng: random.Random, level: int, hasty: bool = False) -> str:
    if rng.random() < DIRECT_RATE:
        return "direct"
    if hasty and rng.random() < HASTY_RATE[level]:  # only hasty worlds draw here: the default data stays as it was
        return "hasty_wait" if rng.random() < HASTY_WAIT_RATE else "hasty"
    return "check" if rng.random() < CHECK_RATE[level] else "steps"


def draw_slip(rng: random.Random, p: Problem, rate: float = SLIP_RATE) -> tuple[int, int] | None:
    if rng.random() >= rate:
        return None
    return rng.randrange(p.level), rng.choice([-2, -1, 1, 2])


def demonstration(p: Problem, rng: random.Random, hasty: bool = False) -> str:
    style = draw_style(rng, p.level, hasty)
    return solution(p, style, draw_slip(rng, p) if style != "direct" else None)


# ---- the step checker ----

def step_labels(p: Problem, lines: list[str]) -> list[bool]:
    """Is each think line right, given the lines before it? A chain line (``12-9+3``) with m operations left
    stands for the total after operation level - m - 1 (the first line, level operations left, restates the
    question) and is right when it is that true rewrite; a hasty total ``= N`` is right when N is the answer;
    ``Wait`` is right; a check ``a+b=c ok`` is right when it is a true operation and the first pass had its total
    right; a correction ``wait: a+b=c, not d`` is right when it names a true operation and the wrong total d the
    first pass wrote. Lines after a wrong one are judged against the true work all the same (a later correction
    can be right).
    """
    right = p.totals()
    rewrites = [_chain(p.numbers, p.ops)] + rewrite_lines(p, right)  # index j + 1: after operation j
    ops = {op_text(p, k, ([p.numbers[0]] + right)[k], right[k]): k for k in range(p.level)}
    written: dict[int, int] = {}  # operation -> the total the first pass wrote after it
    labels = []
    for line in lines:
        if _CHAIN.fullmatch(line):
            j = p.level - 1 - (len(line.split("+")) + len(line.split("-")) - 2)
            if -1 <= j < p.level:
                labels.append(line == rewrites[j + 1])
                if j >= 0:
                    written.setdefault(j, int(re.match(r"\d+", line).group()))
            else:
                labels.append(False)
        elif line.startswith("= ") and line[2:].isdigit():
            labels.append(int(line[2:]) == p.answer)
        elif line == WAIT:
            labels.append(True)
        elif line.endswith(" ok"):
            k = ops.get(line.removesuffix(" ok"))
            labels.append(k is not None and written.get(k) == right[k])
        elif line.startswith("wait: ") and ", not " in line:
            body, _, wrong = line.removeprefix("wait: ").partition(", not ")
            k = ops.get(body)
            labels.append(k is not None and wrong.isdigit() and written.get(k) == int(wrong) != right[k])
        else:
            labels.append(False)
    return labels


_QUESTION = re.compile(r"What is (\d(?:[+-]\d)+)\?")


def parse_question(text: str) -> Problem | None:
    """``What is 7+5-9?`` -> Problem((7, 5, 9), ("+", "-")); None for any other text."""
    m = _QUESTION.search(text)
    if not m:
        return None
    parts = re.findall(r"\d|[+-]", m.group(1))
    return Problem(tuple(int(x) for x in parts[::2]), tuple(parts[1::2]))


def label_solution(p: Problem, text: str) -> tuple[list[str], list[bool]]:
    """A completion (think block and answer) as the PRM's steps (data.stepwise.split_steps) with the step
    checker's labels; the answer step is right when its answer is the problem's."""
    steps = split_steps(text)
    return steps, label_steps(p, steps)


def label_steps(p: Problem, steps: list[str]) -> list[bool]:
    """The step checker on a completion already split into the PRM's steps (the last may be the answer step)."""
    if steps and steps[-1].startswith(THINK_CLOSE):
        return step_labels(p, steps[:-1]) + [is_correct(steps[-1], p.answer)]
    return step_labels(p, steps)


# ---- producers ----

def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def sft_rows(n: int = 12000, seed: int = 0, hasty: bool = False) -> list[dict]:
    """{"messages": [user question, assistant think block + answer]}, styles and slips as the module says."""
    rng = random.Random(f"thinkworld/sft/{seed}")
    return [{"messages": _user(p.question) + [{"role": "assistant", "content": demonstration(p, rng, hasty)}]}
            for p in problems(n, "train", seed + 1)]


def text_rows(n: int = 40000, seed: int = 0, hasty: bool = False) -> list[dict]:
    """{"text": question + solution}: the same demonstrations as plain documents, for pre-training."""
    rng = random.Random(f"thinkworld/text/{seed}")
    return [{"text": f"{p.question}\n{demonstration(p, rng, hasty)}"} for p in problems(n, "train", seed + 2)]


def _problem_row(p: Problem) -> dict:
    return {"prompt": _user(p.question), "answer": str(p.answer), "question": p.question, "level": p.level}


def rl_rows(n: int = 4000, seed: int = 0, levels=LEVELS) -> list[dict]:
    return [_problem_row(p) for p in problems(n, "train", seed + 3, levels=levels)]


def eval_rows(per_level: int = 40, seed: int = 0, levels=LEVELS) -> list[dict]:
    """Held-out problems, ``per_level`` of each of ``levels``: {"prompt", "answer", "question", "level"}."""
    return [_problem_row(p) for p in stratified_test(per_level, seed, levels)]


def stepwise_rows(n: int = 3000, seed: int = 0, slip_rate: float = 0.5, split: str = "train") -> list[dict]:
    """TRL stepwise rows {"prompt", "completions": [think line, ..., answer step], "labels": [bool, ...]} labelled
    by ``label_solution``: thinking with and without checks, half of it with a slipped column."""
    rng = random.Random(f"thinkworld/stepwise/{split}/{seed}")
    rows = []
    for p in problems(n, split, seed + 4, levels=(2, 3, 4, 5)):
        style = "check" if rng.random() < 0.5 else "steps"
        steps, labels = label_solution(p, solution(p, style, draw_slip(rng, p, slip_rate)))
        rows.append({"prompt": p.question, "completions": steps, "labels": labels, "level": p.level})
    return rows


SOURCES = {  # builtin:tinyworld/NAME -> rows (registered in lmforge.data.tinyworld.SOURCES)
    "think_text": text_rows,
    "think_sft": sft_rows,
    "think_rl": rl_rows,
    # the hasty world: the same problems, with one-line totals on the short chains (see the module docstring)
    "think_hasty_text": lambda: text_rows(hasty=True),
    "think_hasty_sft": lambda: sft_rows(hasty=True),
    "think_eval": eval_rows,
    # 200 held-out problems at each of levels 2-5 (level 1 has fewer than 100 distinct held-out problems): for
    # intervals a quarter as wide where 40 problems per level cannot tell two methods apart
    "think_eval_large": lambda: eval_rows(200, levels=(2, 3, 4, 5)),
    # the hardest level alone: 1,000 held-out level-5 problems (the first 200 are think_eval_large's), where
    # search methods differ by a few points, and 2,000 training problems of levels 4-5 to train a PRM on
    "think_eval_hard": lambda: eval_rows(1000, levels=(5,)),
    "think_rl_hard": lambda: rl_rows(2000, seed=2, levels=(4, 5)),  # seed 2: the draw the README's hard PRM saw
    "think_stepwise": stepwise_rows,
    "think_stepwise_eval": lambda: stepwise_rows(400, split="test"),
}
