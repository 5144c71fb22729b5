"""The tiny arithmetic world: problems, worked answers, the data producers, builtin sources, the mix, the evaluator."""

import random
import re
from collections import Counter

import pytest
import torch

from lmforge.answers import extract_answer, is_correct
from lmforge.data import tinyworld as tw
from lmforge.data.mix import MixSource, mix_documents, mix_name
from lmforge.data.sources import FilterConfig, generated_rows, read_documents
from lmforge.errors import DataError
from lmforge.evaluation import evaluate_arithmetic
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import train_tokenizer

QUESTION = re.compile(r"What is (\d+) ([+-]) (\d+)\?")


def test_worked_answers_by_hand():
    assert tw.Problem(347, "+", 289).worked_answer() == "347 + 289: 7+9=16, 4+8+1=13, 3+2+1=6. The answer is 636."
    assert tw.Problem(347, "-", 289).worked_answer() == "347 - 289: 17-9=8, 13-8=5, 2-2=0. The answer is 58."
    assert tw.Problem(95, "+", 7).worked_answer() == "95 + 7: 5+7=12, 9+0+1=10. The answer is 102."
    assert tw.Problem(100, "-", 1).steps() == ["10-1=9", "9-0=9", "0-0=0"]  # a borrow through a zero
    assert tw.Problem(347, "+", 289).careless_answer() == 526  # 7+9 -> 6, 4+8 -> 2, 3+2 -> 5
    assert tw.Problem(347, "-", 289).careless_answer() == 168
    assert tw.Problem(347, "+", 289).question == "What is 347 + 289?"


def test_every_worked_answer_is_extractable_and_correct():
    for p in tw.problems(500, "train", seed=1) + tw.problems(200, "test", seed=1, unique=True):
        text = p.worked_answer()
        assert extract_answer(text) == str(p.answer) and is_correct(text, p.answer), text
        assert p.answer >= 0 and p.op in "+-" and max(p.a, p.b) < 10 ** tw.MAX_DIGITS


def test_problems_are_deterministic_and_seeded():
    assert tw.problems(100, seed=3) == tw.problems(100, seed=3)
    assert tw.problems(100, seed=3) != tw.problems(100, seed=4)
    assert tw.quiz_pages(5, seed=2) == tw.quiz_pages(5, seed=2)
    assert tw.sft_rows(20) == tw.sft_rows(20) and tw.preference_rows(20) == tw.preference_rows(20)
    digits = Counter(len(str(max(p.a, p.b))) for p in tw.problems(3000))
    assert set(digits) == set(range(1, tw.MAX_DIGITS + 1))
    assert digits[tw.MAX_DIGITS] > digits[1]  # long operands are common, not rare


def test_train_and_test_never_share_a_problem():
    test = set(tw.problems(300, "test", unique=True))
    assert len(test) == 300 and all(p.split == "test" for p in test)
    train = set(tw.problems(5000, "train")) | {q for page in tw.quiz_pages(200) for q in _questions(page)}
    train |= {_problem(r["messages"][0]["content"]) for r in tw.sft_rows(500)}
    train |= {_problem(r["prompt"][0]["content"]) for r in tw.preference_rows(300) + tw.rl_rows(300)}
    assert train and not train & test
    assert {_problem(r["question"]) for r in tw.eval_rows(300)} == test  # the eval set is the test split


def test_quiz_pages_hold_exercises_and_a_correct_answer_key():
    pages = tw.quiz_pages(40)
    keyed = [p for p in pages if "\nAnswers\n" in p]
    assert 0 < len(keyed) < len(pages)  # mostly exercises + answer key, some worked examples
    for page in keyed:
        exercises, key = page.split("\nAnswers\n")
        questions = _questions(exercises)
        lines = key.strip().split("\n")
        assert len(questions) == len(lines) >= 4
        for i, (p, line) in enumerate(zip(questions, lines, strict=True), 1):
            assert line == f"{i}. {p.worked_answer()}" and is_correct(line, p.answer)


def test_sft_preference_rl_and_eval_rows_are_well_formed():
    for row in tw.sft_rows(50):
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert is_correct(assistant["content"], _problem(user["content"]).answer)
    for row in tw.preference_rows(300):
        p = _problem(row["prompt"][0]["content"])
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
        assert chosen != rejected and is_correct(chosen, p.answer) and not is_correct(rejected, p.answer)
        assert extract_answer(rejected) is not None  # wrong, but in format: a preference about correctness
    for row in tw.rl_rows(50) + tw.eval_rows(50):
        assert row["answer"] == str(_problem(row["question"]).answer)
        assert row["prompt"] == [{"role": "user", "content": row["question"]}]


def test_builtin_tinyworld_sources():
    first = next(read_documents("builtin:tinyworld/quiz"))
    assert first == tw.quiz_pages(1)[0]
    rows = generated_rows("builtin:tinyworld/sft")
    assert rows[0] == tw.sft_rows(1)[0] and len(rows) == len(tw.sft_rows())
    with pytest.raises(DataError, match=r"builtin:tinyworld/nope: no such generated source.*builtin:tinyworld/sft"):
        generated_rows("builtin:tinyworld/nope")
    with pytest.raises(DataError, match=r"builtin:tinyworld/sft: row 1: field 'text' missing"):
        next(read_documents("builtin:tinyworld/sft"))


@pytest.fixture(scope="module")
def mix_sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    (d / "prose.txt").write_text("\n\n".join(f"Paragraph {i} of some prose about kings and queens." * (1 + i % 5)
                                             for i in range(300)))
    (d / "short.jsonl").write_text("".join(f'{{"text": "note {i}"}}\n' for i in range(400)))
    return d


def _shares(docs, report, tok):
    per_source = {s: set(info["documents"]) for s, info in report.items()}
    counts = Counter()
    for doc, ids in zip(docs, tok.encode_batch(docs), strict=True):
        counts[next(s for s, texts in per_source.items() if doc in texts)] += len(ids) + 1
    total = sum(counts.values())
    return {s: n / total for s, n in counts.items()}, total


def test_mix_weights_are_token_shares(mix_sources):
    prose, short = str(mix_sources / "prose.txt"), str(mix_sources / "short.jsonl")
    tok = train_tokenizer(read_documents(prose), vocab_size=300)
    mix = [MixSource(prose, 3.0), MixSource(short, 1.0)]  # weights are normalized: 0.75 / 0.25
    docs, stats, report = mix_documents(mix, tok, FilterConfig(), seed=0)
    shares, total = _shares(docs, report, tok)
    assert shares[prose] == pytest.approx(0.75, abs=0.03) and shares[short] == pytest.approx(0.25, abs=0.03)
    assert report[short]["epochs"] == pytest.approx(1.0, abs=0.01)  # the scarce source is used exactly once
    assert report[prose]["epochs"] < 1 and stats["kept"] == 700
    assert mix_name(mix) == f"{prose}=3+{short}=1"

    docs, _, report = mix_documents(mix, tok, FilterConfig(), seed=0, total_tokens=3 * total)
    shares, bigger = _shares(docs, report, tok)
    assert bigger == pytest.approx(3 * total, rel=0.02) and report[short]["epochs"] > 2.5  # upsampled by repeats
    assert shares[short] == pytest.approx(0.25, abs=0.03)
    assert mix_documents(mix, tok, FilterConfig(), seed=0)[0] == mix_documents(mix, tok, FilterConfig(), seed=0)[0]


def test_mix_of_shakespeare_and_quiz_pages():
    tok = train_tokenizer(list(read_documents("builtin:tinyshakespeare"))[:2000], vocab_size=400)
    mix = [MixSource("builtin:tinyshakespeare", 0.7), MixSource("builtin:tinyworld/quiz", 0.3)]
    docs, _, report = mix_documents(mix, tok, FilterConfig(max_chars=2000), seed=0)
    shares, _ = _shares(docs, report, tok)
    assert shares["builtin:tinyworld/quiz"] == pytest.approx(0.3, abs=0.02)
    assert sum("What is" in d for d in docs[:200]) > 5  # shuffled: the sources interleave


def test_evaluate_arithmetic_scores_greedy_answers():
    tok = train_tokenizer(tw.quiz_pages(30), vocab_size=300)

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    problems = tw.problems(6, "test", unique=True)
    for chat in (True, False):
        out = evaluate_arithmetic(model, tok, problems, chat=chat, max_new_tokens=6, batch_size=4, n_samples=3)
        assert 0 <= out["accuracy"] <= 1 and 0 <= out["format_rate"] <= 1 and len(out["samples"]) == 3
        assert out["samples"][0]["question"] == problems[0].question
        assert out["samples"][0]["answer"] == str(problems[0].answer)
    rows = tw.eval_rows(4)
    assert evaluate_arithmetic(model, tok, rows, max_new_tokens=2)["samples"][0]["question"] == rows[0]["question"]
    assert model.training  # left as it was found


def _problem(question: str) -> tw.Problem:
    a, op, b = QUESTION.search(question).groups()
    return tw.Problem(int(a), op, int(b))


def _questions(page: str) -> list[tw.Problem]:
    return [tw.Problem(int(a), op, int(b)) for a, op, b in QUESTION.findall(page)]


def test_wrong_answers_make_the_mistakes_small_models_make():
    """Rejected answers: misread operands (worked correctly for the wrong problem), forgotten carries, one
    column's slip; each is wrong for the asked problem and consistent with its own restated problem."""
    rng, misread, other = random.Random(0), 0, 0
    for p in tw.problems(300, "train"):
        text = tw.wrong_answer(p, rng)
        a, op, b = re.search(r"(\d+) ([+-]) (\d+):", text).groups()
        q = tw.Problem(int(a), op, int(b))
        assert not is_correct(text, p.answer) and q.op == p.op
        if q != p:
            misread += 1
            assert is_correct(text, q.answer) and text.endswith(q.worked_answer())
        else:
            other += 1
    assert misread > 90 and other > 90
    steps, answer = tw.slipped_steps(tw.Problem(57, "+", 68), random.Random(1))
    assert steps != tw.Problem(57, "+", 68).steps() and answer != 125


def test_careless_sft_demonstrations_forget_carries_only():
    """builtin:tinyworld/sft_careless: the same problems as /sft; a share of those that need a carry or borrow
    forget it (in format, wrong); problems without one are always right."""
    clean, careless = tw.sft_rows(400), tw.sft_rows(400, careless=0.4)
    wrong = 0
    for a, b in zip(clean, careless, strict=True):
        assert a["messages"][0] == b["messages"][0]
        p = _problem(a["messages"][0]["content"])
        text = b["messages"][1]["content"]
        if is_correct(text, p.answer):
            assert text == p.worked_answer()
        else:
            wrong += 1
            assert p.careless_answer() != p.answer and text == p.worked_answer(p.steps(carry=False), p.careless_answer())
    assert 0.08 * len(clean) < wrong < 0.3 * len(clean)
    assert generated_rows("builtin:tinyworld/sft_careless")[:400] == tw.sft_rows(400, careless=tw.CARELESS_SFT)
