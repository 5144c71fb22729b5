"""Process reward models: stepwise data, labels on separators, the loss, ProcessBench's F1, Monte-Carlo labels."""

import json
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lmforge_cli import lmforge

from lmforge.data import thinkworld as tw
from lmforge.data.sources import read_documents
from lmforge.data.stepwise import (
    check_stepwise_row,
    collate_steps,
    read_stepwise,
    tokenize_steps,
)
from lmforge.errors import DataError
from lmforge.model import ModelConfig, Transformer
from lmforge.objectives.prm import aggregate_steps, first_error_f1, prm_loss
from lmforge.prm import CheckerScorer, PRMScorer, load_process_scorer, mc_step_labels, step_logits
from lmforge.thinking import split_steps
from lmforge.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(list(read_documents("builtin:tinyshakespeare"))[:300], vocab_size=400, think_tokens=True)


def prm_model(vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                    num_labels=1))
    torch.nn.init.normal_(model.score.weight, std=0.5)
    return model.eval()


# ---- reading stepwise rows ----

def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


GOOD = {"prompt": "What is 2 + 3?", "completions": ["2+3", "5"], "labels": [True, True]}


def test_stepwise_rows_read_and_bad_rows_name_file_line_and_field(tmp_path):
    assert len(read_stepwise(write_rows(tmp_path / "ok.jsonl", [GOOD, GOOD]))) == 2
    mismatch = write_rows(tmp_path / "a.jsonl", [GOOD, {**GOOD, "labels": [True]}])
    with pytest.raises(DataError, match=r"a\.jsonl:2: field 'labels' has 1 labels for 2 completions"):
        read_stepwise(mismatch)
    ints = write_rows(tmp_path / "b.jsonl", [{**GOOD, "labels": [True, 1]}])
    with pytest.raises(DataError, match=r"b\.jsonl:1: field 'labels'\[1\] must be a boolean"):
        read_stepwise(ints)
    for bad, field in [({"prompt": "x", "labels": []}, "completions"), ({**GOOD, "completions": ["a", 3]},
                                                                        r"completions'\[1\]")]:
        with pytest.raises(DataError, match=field):
            check_stepwise_row(bad, "f.jsonl:9")


def test_bad_stepwise_row_is_one_cli_error_exit_2(tmp_path):
    data = write_rows(tmp_path / "bad.jsonl", [GOOD, {**GOOD, "labels": ["yes", True]}])
    result = lmforge("prm", "model=does-not-matter", f"data={data}", f"eval_data={data}",
                     f"out_dir={tmp_path / 'out'}", check=False)
    assert result.returncode == 2
    assert "bad.jsonl:2: field 'labels'[0] must be a boolean" in result.stderr
    assert "Traceback" not in result.stderr


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=5), max_size=4), st.lists(st.one_of(st.booleans(), st.integers(0, 1), st.none()),
                                                            max_size=4))
def test_stepwise_reader_never_lets_a_bad_row_through(steps, labels):
    row = {"prompt": "p", "completions": steps, "labels": labels}
    ok = bool(steps) and len(steps) == len(labels) and all(isinstance(x, bool) for x in labels)
    try:
        check_stepwise_row(row, "f:1")
        assert ok
    except DataError:
        assert not ok


# ---- tokens and labels ----

def test_labels_land_on_the_last_token_of_each_step_separator(tok):
    prompt = tok.encode("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n<think>\n")
    ex = tokenize_steps(tok, prompt, ["2+3", "5", "</think>\nThe answer is 5."], [True, False, True])
    newline = tok.encode("\n")
    assert len(newline) == 1
    assert [ex.input_ids[p] for p in ex.label_positions] == newline * 3
    assert ex.labels == [1.0, 0.0, 1.0]
    # what comes before each separator is exactly the step
    ends = [0] + [p + 1 for p in ex.label_positions]
    assert tok.decode(ex.input_ids[len(prompt):ends[2]]) == "2+3\n5\n"
    batch = collate_steps([ex], tok.pad_id)
    assert (batch["labels"] != -100).nonzero()[:, 1].tolist() == ex.label_positions


def test_packed_and_unpacked_batches_give_the_same_loss(tok):
    model = prm_model(tok.vocab_size)
    rows = tw.stepwise_rows(12)
    examples = [tokenize_steps(tok, tok.encode(r["prompt"]), r["completions"], r["labels"]) for r in rows]
    unpacked = collate_steps(examples, tok.pad_id)
    packed = collate_steps(examples, tok.pad_id, packed=True, seq_len=128)
    assert packed["input_ids"].shape[0] < len(examples)
    with torch.no_grad():
        a, ma = prm_loss(step_logits(model, unpacked), unpacked["labels"])
        b, mb = prm_loss(step_logits(model, packed), packed["labels"])
    assert ma["num_steps"] == mb["num_steps"] == sum(len(r["labels"]) for r in rows)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_scorer_reads_one_probability_per_step_and_batched_equals_alone(tok):
    model = prm_model(tok.vocab_size)
    scorer = PRMScorer(model, tok, prefix="<think>\n", batch_size=2)
    prompts = [tok.encode("What is 2 + 3?"), tok.encode("What is 7 - 4 + 1?")]
    steps = [["2+3", "5", "</think>\nThe answer is 5."], ["7-4+1", "3+1", "4"]]
    together = scorer.step_probs(prompts, steps)
    alone = [scorer.step_probs([p], [s])[0] for p, s in zip(prompts, steps)]
    assert [len(x) for x in together] == [3, 3]
    for x, y in zip(together, alone):
        assert x == pytest.approx(y, abs=1e-5)
    assert split_steps("<think>\n2+3\n5\n</think>\nThe answer is 5.") == steps[0]


def test_the_checker_scorer_gives_the_step_checkers_labels_as_step_rewards(tok):
    """process_reward=checker: 1.0 for each right step and 0.0 for each wrong one, the answer step included."""
    p = tw.Problem((7, 5, 9, 3), ("+", "-", "+"))
    scorer = load_process_scorer("checker", tok, "cpu")
    assert isinstance(scorer, CheckerScorer)
    prompt = tok.encode("<|im_start|>user\n" + p.question + "<|im_end|>\n<|im_start|>assistant\n")
    slipped = split_steps(tw.solution(p, "steps", slip=(1, 1)))  # 12-9+3 right, then 4+3, 7 and "7" wrong
    right = split_steps(tw.solution(p, "steps"))
    assert scorer.step_probs([prompt, prompt], [slipped, right]) == [[1.0, 1.0, 0.0, 0.0, 0.0], [1.0] * 5]
    with pytest.raises(ValueError, match="thinking-world prompts"):
        scorer.step_probs([tok.encode("Tell me a story")], [["once"]])


# ---- the loss and the metrics, by hand ----

def test_prm_loss_against_hand_computed_values():
    logits = torch.tensor([[0.0, 2.0, -100.0], [-1.0, 0.0, 0.0]])
    labels = torch.tensor([[1.0, 0.0, -100.0], [0.0, -100.0, 0.25]])
    loss, m = prm_loss(logits, labels)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    terms = [-math.log(sig(0.0)), -math.log(1 - sig(2.0)), -math.log(1 - sig(-1.0)),
             -(0.25 * math.log(sig(0.0)) + 0.75 * math.log(1 - sig(0.0)))]
    assert float(loss) == pytest.approx(sum(terms) / 4, abs=1e-6)
    # step accuracy: 0 > 0 is False vs label 1 -> wrong; 2 > 0 vs 0 -> wrong; -1 vs 0 -> right; 0 vs 0.25 -> right
    assert float(m["step_accuracy"]) == pytest.approx(0.5) and float(m["num_steps"]) == 4
    empty, _ = prm_loss(logits, torch.full_like(labels, -100.0))
    assert float(empty) == 0.0


def test_aggregations_and_first_error_f1_by_hand():
    assert aggregate_steps([0.9, 0.5, 0.8], "min") == 0.5
    assert aggregate_steps([0.9, 0.5, 0.8], "prod") == pytest.approx(0.36)
    assert aggregate_steps([0.9, 0.5, 0.8], "last") == 0.8
    predicted = [[0.9, 0.2, 0.9], [0.9, 0.9, 0.1], [0.9, 0.9], [0.3, 0.9]]
    labels = [[True, False, False], [True, False, True], [True, True], [True, True]]
    # errors: first found at 1 (right), found at 2 but gold 1 (wrong) -> 1/2; correct: [-1 right, 0 wrong] -> 1/2
    f = first_error_f1(predicted, labels)
    assert (f["error_accuracy"], f["correct_accuracy"], f["f1"]) == (0.5, 0.5, 0.5)
    always_fine = first_error_f1([[1.0] * len(x) for x in labels], labels)
    assert always_fine["f1"] == 0.0 and always_fine["correct_accuracy"] == 1.0


# ---- Monte-Carlo labels (Math-Shepherd) ----

class CharTokenizer:
    def encode(self, text, add_bos=False):
        return [ord(c) for c in text]


def test_mc_labels_recover_known_success_probabilities():
    """A toy whose rollouts from step k succeed with a known probability: soft labels estimate it, hard labels
    are 'any success', and the answer step is judged by itself."""
    success = {1: 0.9, 2: 0.5, 3: 0.0}  # by the number of steps in the prefix
    rng = random.Random(0)

    def rollout(prefixes, n):
        return [["right" if rng.random() < success[len(chr_text(p).strip().split("\n"))] else "wrong"
                 for _ in range(n)] for p in prefixes]

    def chr_text(ids):
        return "".join(map(chr, ids))

    steps = [["a", "b", "c", "</think>\nThe answer is 5."]]
    hard, soft = mc_step_labels(CharTokenizer(), [[]], steps, lambda i, text: text.endswith("right")
                                or text.endswith("The answer is 5.\n"), rollout, n=400)
    assert soft[0][0] == pytest.approx(0.9, abs=0.05) and soft[0][1] == pytest.approx(0.5, abs=0.07)
    assert soft[0][2] == 0.0 and hard[0][:3] == [True, True, False]
    assert hard[0][3] and soft[0][3] == 1.0  # the answer step: no rollout, its own correctness
    few_hard, _ = mc_step_labels(CharTokenizer(), [[]], steps, lambda i, t: t.endswith("right"), rollout, n=1)
    assert few_hard[0][2] is False  # zero success probability is never labelled good
