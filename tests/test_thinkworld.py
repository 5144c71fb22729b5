"""The thinking world: levels, the think format, checks that fix slips, the step checker, and the chat format."""

import random

import pytest

from lmforge.answers import extract_answer, is_correct
from lmforge.data import thinkworld as tw
from lmforge.data.chat import EMPTY_THINK, encode_prompt, generation_prompt, tokenize_conversation
from lmforge.data.sources import read_documents
from lmforge.data.tinyworld import source_rows
from lmforge.evaluation import load_task
from lmforge.thinking import ThinkState, ThinkTags
from lmforge.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(list(read_documents("builtin:tinyshakespeare"))[:300], vocab_size=400, think_tokens=True)


P = tw.Problem((7, 5, 9, 3), ("+", "-", "+"))


def test_a_worked_solution_rewrites_the_chain_and_ends_in_the_answer():
    assert P.question == "What is 7+5-9+3?" and (P.level, P.answer) == (3, 6)
    assert tw.solution(P, "steps") == "<think>\n7+5-9+3\n12-9+3\n3+3\n6\n</think>\nThe answer is 6."
    assert tw.solution(P, "direct") == "<think></think>\nThe answer is 6."
    assert tw.parse_question(P.question) == P and tw.parse_question("What is 57 + 68?") is None
    assert tw.parse_question("Q: What is 1-1+9?") == tw.Problem((1, 1, 9), ("-", "+"))


def test_every_level_and_style_is_right_without_a_slip_and_a_check_fixes_every_slip():
    rng = random.Random(0)
    for level in tw.LEVELS:
        for _ in range(50):
            p = tw.random_problem(rng, level)
            assert p.level == level and 0 <= min(p.totals()) <= max(p.totals()) <= tw.MAX_TOTAL
            for style in ("direct", "steps", "check"):
                assert is_correct(tw.solution(p, style), p.answer)
            slip = (rng.randrange(level), rng.choice([-2, -1, 1, 2]))
            assert is_correct(tw.solution(p, "check", slip), p.answer)  # the check finds and corrects it
            if p.totals(slip)[-1] != p.answer:
                assert not is_correct(tw.solution(p, "steps", slip), p.answer)  # unchecked, the slip stands


def test_a_check_names_the_slip_and_redoes_the_chain_from_there():
    lines = tw.think_lines(P, "check", slip=(1, 1))
    assert lines == ["7+5-9+3", "12-9+3", "4+3", "7", "Wait", "7+5=12 ok", "wait: 12-9=3, not 4", "3+3", "6"]


def test_step_checker_labels_each_line():
    assert all(tw.step_labels(P, tw.think_lines(P, "check")))
    # the slipped rewrite and the one built on it are wrong; Wait, the checks, the correction and the redo are right
    assert tw.step_labels(P, tw.think_lines(P, "check", slip=(1, 1))) == [True, True, False, False, True, True,
                                                                          True, True, True]
    assert tw.step_labels(P, ["7+5-9+3", "12-9+3", "banana", "3+4", "7"]) == [True, True, False, False, False]
    assert tw.step_labels(P, ["7+5-9+4"]) == [False]  # the restatement must be the question's
    # an "ok" on an operation the first pass got wrong is wrong; a correction of a right one is wrong
    assert tw.step_labels(P, ["7+5-9+3", "13-9+3", "7+5=12 ok"]) == [True, False, False]
    assert tw.step_labels(P, ["7+5-9+3", "12-9+3", "wait: 7+5=12, not 13"]) == [True, True, False]
    steps, labels = tw.label_solution(P, tw.solution(P, "steps", slip=(2, -1)))
    assert steps[-1] == "</think>\nThe answer is 5." and labels == [True, True, True, False, False]


def test_splits_and_the_stratified_eval():
    rows = tw.eval_rows(per_level=10)
    assert [r["level"] for r in rows] == [lv for lv in tw.LEVELS for _ in range(10)]
    held_out = {r["question"] for r in rows}
    assert not held_out & {r["messages"][0]["content"] for r in tw.sft_rows(3000)}
    assert len(held_out) == 50
    task = load_task("thinkworld", limit=4)
    assert len(task) == 20 and {r["level"] for r in task} == set(tw.LEVELS)


def test_sft_demonstrations_vary_in_length_and_hard_levels_check_more():
    rows = tw.sft_rows(2000)
    texts = [r["messages"][1]["content"] for r in rows]
    assert any(t.startswith(tw.think_text([])) for t in texts)  # direct answers
    lengths = [len(t) for t in texts]
    assert max(lengths) > 4 * min(lengths)
    checked = {lv: [] for lv in tw.LEVELS}
    for r, t in zip(rows, texts):
        checked[tw.parse_question(r["messages"][0]["content"]).level].append("\nWait\n" in t)
    rates = [sum(v) / len(v) for v in checked.values()]
    assert rates[0] < rates[2] < rates[4]


def test_stepwise_rows_have_both_labels():
    rows = tw.stepwise_rows(200)
    assert all(len(r["completions"]) == len(r["labels"]) for r in rows)
    flat = [x for r in rows for x in r["labels"]]
    assert 0.1 < 1 - sum(flat) / len(flat) < 0.6


def test_think_tags_are_single_tokens_kept_when_decoding(tok, tmp_path):
    text = tw.solution(P, "check", slip=(0, 1))
    ids = tok.encode(text)
    assert tok.token_to_id("<think>") in ids and tok.token_to_id("</think>") in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    tok.save(tmp_path)
    saved = Tokenizer.load(tmp_path)
    assert saved.token_to_id("</think>") == tok.token_to_id("</think>")
    assert saved.decode(ids, skip_special_tokens=True) == text


def test_template_and_prompt_encoder_know_the_think_block(tok):
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    plain = generation_prompt(tok, messages)
    assert plain.endswith("<|im_start|>assistant\n")
    assert generation_prompt(tok, messages, thinking=False) == plain + EMPTY_THINK  # the template's own
    assert generation_prompt(tok, messages, thinking=True) == plain + "<think>\n"
    ids = encode_prompt(tok, messages, thinking=False)
    assert ids[-3:] == tok.encode("<think></think>\n")
    # a conversation with thinking trains on exactly the prefix the encoder gives at inference
    full, mask = tokenize_conversation(tok, messages + [{"role": "assistant", "content": tw.solution(
        tw.Problem((2, 3), ("+",)), "steps")}])
    prompt = encode_prompt(tok, messages)
    assert full[:len(prompt)] == prompt and not any(mask[:len(prompt)]) and all(mask[len(prompt):-1])


def test_a_template_without_enable_thinking_gets_the_empty_block_appended():
    plain_tok = train_tokenizer(["some text here"] * 5, vocab_size=300)
    messages = [{"role": "user", "content": "hi"}]
    assert generation_prompt(plain_tok, messages, thinking=False).endswith("assistant\n" + EMPTY_THINK)


def test_the_answer_in_the_thinking_never_counts():
    text = "<think>\n2+3\n5\nThe answer is 5.\n</think>\nThe answer is 6."
    assert extract_answer(text) == "6"


def test_budget_zero_writes_the_direct_demonstrations_empty_block(tok):
    """A budget of 0 forces the close right after the model's open: the text must be the direct demonstrations'
    (and enable_thinking=False's) empty block, or budget 0 asks the model for something it never saw."""
    tags = ThinkTags.from_tokenizer(tok)
    direct = tok.encode(tw.solution(P, "direct"))
    state = ThinkState(tags, max_tokens=0)
    wants_to_think = [tags.open[0]] + tok.encode("\n7+5-9+3\n")  # the model would open a line of thinking
    forced = [state.step(t) for t in wants_to_think][:2]
    assert tok.decode(forced) == "<think></think>" and direct[:2] == forced
    assert EMPTY_THINK.startswith(tok.decode(forced))


def test_the_large_held_out_set_extends_the_standard_one_and_stays_held_out():
    large, standard = source_rows("think_eval_large"), source_rows("think_eval")
    assert [sum(r["level"] == lv for r in large) for lv in (1, 2, 3, 4, 5)] == [0, 200, 200, 200, 200]
    for level in (2, 3, 4, 5):  # its first 40 of a level are think_eval's 40
        assert [r["question"] for r in large if r["level"] == level][:40] == \
            [r["question"] for r in standard if r["level"] == level]
    train = {r["question"] for r in source_rows("think_rl")}
    assert not train & {r["question"] for r in large}


def test_the_hard_sets_are_the_hardest_levels_and_the_eval_stays_held_out():
    hard, large = source_rows("think_eval_hard"), source_rows("think_eval_large")
    assert len(hard) == 1000 and {r["level"] for r in hard} == {5} and len({r["question"] for r in hard}) == 1000
    assert [r["question"] for r in hard[:200]] == [r["question"] for r in large if r["level"] == 5]
    train = source_rows("think_rl_hard")
    assert len(train) == 2000 and {r["level"] for r in train} == {4, 5}
    assert not {r["question"] for r in train} & {r["question"] for r in hard}


def test_the_hasty_world_answers_short_chains_in_one_line_and_a_wait_rewrites_them():
    assert tw.think_lines(P, "hasty") == ["7+5-9+3", "= 6"]
    slipped = tw.think_lines(P, "hasty_wait", slip=(1, 1))  # the head's total is off; the rewrites are not
    assert slipped == ["7+5-9+3", "= 7", "Wait", "7+5-9+3", "12-9+3", "3+3", "6"]
    assert tw.solution(P, "hasty", slip=(1, 1)).endswith("The answer is 7.")
    assert is_correct(tw.solution(P, "hasty_wait", slip=(1, 1)), P.answer)
    assert tw.step_labels(P, slipped) == [True, False, True, True, True, True, True]
    assert tw.step_labels(P, ["7+5-9+3", "= 6"]) == [True, True]
    styles = {lv: [] for lv in tw.LEVELS}
    for r in tw.sft_rows(3000, hasty=True):
        lines = r["messages"][1]["content"].split("\n")
        styles[tw.parse_question(r["messages"][0]["content"]).level].append(len(lines) > 2 and
                                                                            lines[2].startswith("= "))
    share = {lv: sum(v) / len(v) for lv, v in styles.items()}
    assert share[1] == 0 and share[2] > 0.4 and share[3] > 0.4 and share[5] < 0.1  # most short chains, few long
    # the default world has no hasty line: its data (and every number measured on it) is unchanged
    assert not any("\n= " in r["messages"][1]["content"] for r in tw.sft_rows(3000))
    assert len(source_rows("think_hasty_text")) == len(source_rows("think_text"))


def test_a_forced_wait_on_a_hasty_answer_writes_what_the_hasty_wait_demonstrations_write(tok):
    """Budget forcing replaces the close by "Wait": the tokens must be the hasty_wait demonstrations' own, so the
    model goes on into the rewriting it was shown, not into a text it never saw."""
    tags = ThinkTags.from_tokenizer(tok)
    hasty, waited = tok.encode(tw.solution(P, "hasty")), tok.encode(tw.solution(P, "hasty_wait"))
    state = ThinkState(tags, max_tokens=1000, num_waits=1)
    forced = [state.step(t) for t in hasty]
    cut = hasty.index(tags.close[0])
    assert forced[:cut] == hasty[:cut] and forced[cut:cut + len(tags.wait)] == waited[cut:cut + len(tags.wait)]
    assert waited[:cut] == hasty[:cut]
