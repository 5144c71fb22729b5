"""The tiny arithmetic world: a task small enough to learn on a laptop CPU in minutes, with exactly checkable answers.

Every stage of the built-in tiny pipeline trains on data made here, so each stage's effect can be measured:

    pretrain / midtrain  quiz pages (exercises, then an answer key with worked solutions) mixed with Shakespeare:
                         asked "What is 57 + 68?", the base model continues the page with more exercises
    SFT                  {"messages": [user question, assistant worked solution]}: now it answers, in format.
                         The recipe's demonstrations (/sft_careless) forget 40% of the carries and borrows,
                         as human demonstrations carry systematic mistakes: SFT learns them too
    reward model, DPO    {"prompt", "chosen", "rejected"}: chosen is correct and concise, rejected is wrong
                         (a misread operand, a forgotten carry, a slipped column), sometimes padded as well
    PPO / GRPO           {"prompt", "answer"}: a verifiable reward (answers.is_correct)
    evaluation           held-out problems with gold answers; evaluation.evaluate_arithmetic() scores any checkpoint

A worked solution does the sum column by column from the right, carries and borrows written out, and ends in
the line answers.extract_answer reads:

    What is 57 + 68?    ->  57 + 68: 7+8=15, 5+6+1=12. The answer is 125.
    What is 347 - 289?  ->  347 - 289: 17-9=8, 13-8=5, 2-2=0. The answer is 58.

(in "17-9" the 1 is a borrow; "13" is the 4 that lent one, plus ten.) Operands have up to MAX_DIGITS = 2 digits;
the steps are short enough for a ~2M-parameter model and are the "thinking tokens" an inference-time-scaling
budget cuts. After the tiny recipe's SFT most of the model's errors are the demonstrations' forgotten carries,
which the reward model, DPO and GRPO (learning from which answers are right) can unlearn. Problems are split into
train and test by a hash of the problem itself, so every stage and every seed agrees on what is held out.
All producers are deterministic functions of their seed; they are served to recipes as data sources:
``builtin:tinyworld/quiz`` (text), ``/sft``, ``/sft_careless``, ``/preference``, ``/rl``, ``/eval`` (rows; see
SOURCES).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from lmforge.answers import ANSWER_PREFIX, format_answer
from lmforge.data import thinkworld
from lmforge.errors import DataError

TEST_FRACTION = 0.1  # share of all possible problems held out for evaluation
MAX_DIGITS = 2  # operands have 1..MAX_DIGITS digits (3 is beyond a 2M-parameter model in minutes: ~3% after SFT)
OPS = "+-"
CARELESS_SFT = 0.4  # builtin:tinyworld/sft_careless: this share of carry/borrow demonstrations forgets it


@dataclass(frozen=True)
class Problem:
    a: int
    op: str  # "+" or "-" (a >= b, so answers are never negative)
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    @property
    def question(self) -> str:
        return f"What is {self.a} {self.op} {self.b}?"

    @property
    def split(self) -> str:
        return "test" if _unit_hash(f"{self.a}{self.op}{self.b}") < TEST_FRACTION else "train"

    def steps(self, carry: bool = True) -> list[str]:
        """Column-by-column work, units first. carry=False forgets every carry/borrow (a typical wrong solution)."""
        da, db = _digits(self.a), _digits(self.b)
        width = max(len(da), len(db))
        da, db = da + [0] * (width - len(da)), db + [0] * (width - len(db))
        steps, c = [], 0
        for x, y in zip(da, db, strict=True):
            if self.op == "+":
                total = x + y + c
                steps.append(f"{x}+{y}+{c}={total}" if c else f"{x}+{y}={total}")
                c = total // 10 if carry else 0
            else:
                top = x - c
                borrow = int(top < y)
                top += 10 * borrow
                steps.append(f"{top}-{y}={top - y}")
                c = borrow if carry else 0
        return steps

    def worked_answer(self, steps: list[str] | None = None, answer: int | None = None) -> str:
        """``347 + 289: 7+9=16, 4+8+1=13, 3+2+1=6. The answer is 636.`` (steps/answer override, for wrong ones)."""
        steps = self.steps() if steps is None else steps
        return f"{self.a} {self.op} {self.b}: {', '.join(steps)}. {format_answer(self.answer if answer is None else answer)}"

    def careless_answer(self) -> int:
        """The result with every carry (or borrow) forgotten: each column keeps only its last digit."""
        cols = [int(s.rsplit("=", 1)[1]) % 10 for s in self.steps(carry=False)]
        return int("".join(map(str, reversed(cols))))


def _digits(n: int) -> list[int]:
    return [int(d) for d in reversed(str(n))]


def _unit_hash(text: str) -> float:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") / 2**64


def random_problem(rng: random.Random, max_digits: int | None = None, ops: str = OPS) -> Problem:
    """Operand lengths uniform in 1..max_digits (so short and long sums are equally common), op uniform."""
    max_digits = max_digits or MAX_DIGITS
    a, b = (rng.randint(10 ** (d - 1) if d > 1 else 0, 10 ** d - 1)
            for d in (rng.randint(1, max_digits), rng.randint(1, max_digits)))
    op = rng.choice(ops)
    if op == "-" and a < b:
        a, b = b, a
    return Problem(a, op, b)


def problems(n: int, split: str = "train", seed: int = 0, max_digits: int | None = None, ops: str = OPS,
             unique: bool = False) -> list[Problem]:
    """``n`` problems of one split ("train" or "test"), a deterministic function of the arguments.

    unique=True never repeats a problem (evaluation sets); training streams may repeat the short sums.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"tinyworld/{split}/{seed}")
    out, seen, tries = [], set(), 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise ValueError(f"could not draw {n} {'distinct ' if unique else ''}{split} problems with "
                             f"max_digits={max_digits or MAX_DIGITS}, ops={ops!r}; ask for fewer")
        p = random_problem(rng, max_digits, ops)
        if p.split == split and not (unique and p in seen):
            seen.add(p)
            out.append(p)
    return out


# ---- producers: one function per data format ----

HEADERS = ["Practice page {n}", "Arithmetic quiz {n}", "Exercises, set {n}", "Homework {n}", "Mental math drill {n}",
           "Sums for the schoolroom, lesson {n}"]
INSTRUCTIONS = ["Add or subtract. Show your work, column by column.", "Work each sum from the right.",
                "Answer every question. Carry and borrow with care.", "Solve the following."]
FILLER = ["Hmm, let me think about this carefully.", "Let me see.", "This one needs some care.",
          "I will go column by column.", "Okay."]


def quiz_page(rng: random.Random, page: int, seed: int = 0) -> str:
    """A page of exercises then an answer key with worked solutions (or, one page in four, worked examples)."""
    qs = problems(rng.randint(4, 8), "train", seed=rng.randrange(2**31) + seed)
    header = rng.choice(HEADERS).format(n=page)
    if rng.random() < 0.25:
        body = "\n\n".join(f"Example {i}. {p.question}\n{p.worked_answer()}" for i, p in enumerate(qs, 1))
        return f"{header}: worked examples\n\n{body}"
    exercises = "\n".join(f"{i}. {p.question}" for i, p in enumerate(qs, 1))
    key = "\n".join(f"{i}. {p.worked_answer()}" for i, p in enumerate(qs, 1))
    return f"{header}\n{rng.choice(INSTRUCTIONS)}\n\n{exercises}\n\nAnswers\n{key}"


def quiz_pages(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(f"tinyworld/quiz/{seed}")
    return [quiz_page(rng, i + 1, seed) for i in range(n)]


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def sft_rows(n: int = 4000, seed: int = 0, careless: float = 0.0) -> list[dict]:
    """TRL conversational SFT rows: {"messages": [user question, assistant worked solution]}.

    careless: share of the problems that need a carry or borrow whose demonstration forgets it (a wrong answer,
    worked in the same format): demonstrations with mistakes, as human ones have. SFT imitates them; the
    preference and RL stages, which learn from which answers are right, can unlearn them.
    """
    rng = random.Random(f"tinyworld/sft/{seed}/{careless}")
    rows = []
    for p in problems(n, "train", seed + 1):
        slip = careless > 0 and p.careless_answer() != p.answer and rng.random() < careless
        answer = p.worked_answer(p.steps(carry=False), p.careless_answer()) if slip else p.worked_answer()
        rows.append({"messages": _user(p.question) + _assistant(answer)})
    return rows


def misread(p: Problem, rng: random.Random) -> Problem:
    """The problem with one operand digit copied wrong: the commonest mistake of a small model after SFT."""
    for _ in range(20):
        which = rng.randrange(2)
        digits = list(str((p.a, p.b)[which]))
        i = rng.randrange(len(digits))
        digits[i] = str((int(digits[i]) + rng.choice([1, 2, 3, 7, 8, 9])) % 10)
        value = int("".join(digits))
        a, b = (value, p.b) if which == 0 else (p.a, value)
        if p.op == "-" and a < b:
            continue
        q = Problem(a, p.op, b)
        if q.answer != p.answer:
            return q
    return Problem(p.a + 1, p.op, p.b)


def slipped_steps(p: Problem, rng: random.Random) -> tuple[list[str], int]:
    """The worked steps with one column's result off by one or two, and the answer those steps lead to."""
    steps = p.steps()
    i = rng.randrange(len(steps))
    expr, value = steps[i].rsplit("=", 1)
    value = int(value)
    wrong = value + rng.choice([-2, -1, 1, 2]) if value >= 2 else value + rng.choice([1, 2])
    steps[i] = f"{expr}={wrong}"
    results = [int(s.rsplit("=", 1)[1]) for s in steps]
    digits = "".join(str(r % 10) for r in reversed(results[:-1]))  # every column but the last gives one digit
    return steps, int(f"{results[-1]}{digits}")


def wrong_answer(p: Problem, rng: random.Random) -> str:
    """A plausible wrong solution, in format, sometimes padded with filler as well; the mistakes a ~2M model makes:
    an operand misread when restating the problem (then worked correctly), a forgotten carry or borrow, a slip
    in one column's sum."""
    kind, careless = rng.random(), p.careless_answer()
    if kind < 0.45:
        q = misread(p, rng)
        text = f"{q.a} {q.op} {q.b}: {', '.join(q.steps())}. {format_answer(q.answer)}"
    elif kind < 0.75 and careless != p.answer:
        text = p.worked_answer(p.steps(carry=False), careless)
    else:
        steps, answer = slipped_steps(p, rng)
        text = p.worked_answer(steps, answer)
    return f"{rng.choice(FILLER)} {rng.choice(FILLER)} {text}" if rng.random() < 0.3 else text


def preference_rows(n: int = 2000, seed: int = 0) -> list[dict]:
    """TRL conversational preference rows: {"prompt": [user], "chosen": [assistant], "rejected": [assistant]}."""
    rng = random.Random(f"tinyworld/preference/{seed}")
    return [{"prompt": _user(p.question), "chosen": _assistant(p.worked_answer()),
             "rejected": _assistant(wrong_answer(p, rng))} for p in problems(n, "train", seed + 2)]


def tool_sft_rows(n: int = 2000, seed: int = 0, max_digits: int = 3) -> list[dict]:
    """SFT rows that use the calculator tool (environments.Calculator) instead of working the columns:
    ``<calc>347 + 289</calc> = 636. The answer is 636.`` for operands of up to ``max_digits`` digits."""
    return [{"messages": _user(p.question) + _assistant(f"<calc>{p.a} {p.op} {p.b}</calc> = {p.answer}. "
                                                        f"{format_answer(p.answer)}")}
            for p in problems(n, "train", seed + 5, max_digits=max_digits)]


def rl_rows(n: int = 2000, seed: int = 0) -> list[dict]:
    """Verifiable-reward prompts: {"prompt": [user], "answer": "636"} (plus the bare "question")."""
    return [{"prompt": _user(p.question), "answer": str(p.answer), "question": p.question}
            for p in problems(n, "train", seed + 3)]


def eval_rows(n: int = 200, seed: int = 0, max_digits: int | None = None) -> list[dict]:
    """Held-out problems (test split, distinct): {"prompt": [user], "answer", "question"}."""
    return [{"prompt": _user(p.question), "answer": str(p.answer), "question": p.question}
            for p in problems(n, "test", seed, max_digits=max_digits, unique=True)]


SOURCES = {  # builtin:tinyworld/NAME -> the rows it serves
    "quiz": lambda: [{"text": page} for page in quiz_pages()],
    "sft": sft_rows,
    "sft_careless": lambda: sft_rows(careless=CARELESS_SFT),
    "preference": preference_rows,
    "rl": rl_rows,
    "eval": eval_rows,
    "sft_tool": tool_sft_rows,  # the calculator tool's demonstrations, up to 3 digits
    "rl_hard": lambda: [{"prompt": _user(p.question), "answer": str(p.answer), "question": p.question}
                        for p in problems(2000, "train", 7, max_digits=3)],
    "eval_hard": lambda: eval_rows(200, max_digits=3),  # held-out, up to 3 digits (beyond the model unaided)
    **thinkworld.SOURCES,  # think_*: the thinking world with difficulty levels (lmforge.data.thinkworld)
}


def source_rows(name: str) -> list[dict]:
    """The rows of ``builtin:tinyworld/NAME`` (data.sources reads them like a JSON Lines file)."""
    if name not in SOURCES:
        raise DataError(f"builtin:tinyworld/{name}: no such generated source "
                        f"(tinyworld sources: {', '.join(f'builtin:tinyworld/{k}' for k in SOURCES)})")
    return SOURCES[name]()


# ---- evaluation ----

# In format: one answer, stated last ("... The answer is 636."), as a chat model learns to write and then stop.
_FORMAT = re.compile(re.escape(ANSWER_PREFIX) + r" -?\d+\.?\s*$")


def is_formatted(text: str) -> bool:
    """Ends with "The answer is <number>." and states no other answer (a base model that runs on into more
    exercises does not)."""
    return _FORMAT.search(text) is not None and text.count(ANSWER_PREFIX) == 1
