"""Preference data: both TRL formats, implicit prompts, counted validation, file:line errors, tokenizing, batching."""

import json
import re
from collections import Counter

import pytest
import torch
from preference_helpers import easy_pairs, micro_tokenizer, write_jsonl

from lmforge.data.preference import (
    Batches,
    PreferenceDataConfig,
    TokenPair,
    collate_pairs,
    load_preference_data,
    pair_from_row,
    read_pairs,
    read_unpaired,
    split_implicit,
    tokenize_pairs,
    tokenize_unpaired,
)
from lmforge.errors import DataError
from lmforge.objectives import dpo_loss

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731


def test_explicit_string_and_conversational_pairs():
    p = pair_from_row({"prompt": "2+2?", "chosen": "4", "rejected": "5"}, "f:1")
    assert (p.prompt, p.chosen, p.rejected) == ("2+2?", "4", "5")
    p = pair_from_row({"prompt": [U("2+2?")], "chosen": [A("4")], "rejected": [A("5")]}, "f:1")
    assert p.prompt == [U("2+2?")] and p.chosen == [A("4")]
    # an explicit prompt with full conversations in chosen/rejected: the prompt is stripped off
    p = pair_from_row({"prompt": [U("hi")], "chosen": [U("hi"), A("hello")], "rejected": [U("hi"), A("go")]}, "f:1")
    assert p.chosen == [A("hello")] and p.rejected == [A("go")]


def test_implicit_prompt_is_the_shared_prefix():
    chosen = [U("a"), A("b"), U("c"), A("good")]
    rejected = [U("a"), A("b"), U("c"), A("bad")]
    assert split_implicit(chosen, rejected) == ([U("a"), A("b"), U("c")], [A("good")], [A("bad")])
    # Anthropic HH text dialogues become messages
    hh_c = "\n\nHuman: hi there\n\nAssistant: hello!\n\nHuman: joke?\n\nAssistant: A pun."
    hh_r = "\n\nHuman: hi there\n\nAssistant: hello!\n\nHuman: joke?\n\nAssistant: A rude one."
    prompt, c, r = split_implicit(hh_c, hh_r)
    assert prompt == [U("hi there"), A("hello!"), U("joke?")] and c == [A("A pun.")] and r == [A("A rude one.")]
    # other text: split after the last assistant marker of the shared part, else at a word boundary
    assert split_implicit("Q: 2+2? Assistant: 4", "Q: 2+2? Assistant: 5") == ("Q: 2+2? Assistant:", " 4", " 5")
    assert split_implicit("Q: name? Alice", "Q: name? Alfred") == ("Q: name?", " Alice", " Alfred")


def test_validation_drops_are_counted(tmp_path):
    rows = easy_pairs(5) + [
        {"prompt": "x", "chosen": "same", "rejected": "same"},  # identical
        {"chosen": [U("a"), A("b")], "rejected": [U("z"), A("c")]},  # no shared prompt
        {"prompt": [U("q")], "chosen": [U("other"), A("b")], "rejected": [U("q"), A("c")]},  # prompt not a prefix
        {"chosen": "same words", "rejected": "same words"},  # implicit and identical
        {"prompt": "q", "chosen": "", "rejected": "b"},  # empty answer
        {"prompt": "q", "chosen": [A(" ")], "rejected": [A("b")]},  # empty answer
    ]
    stats = Counter()
    pairs = read_pairs(str(write_jsonl(tmp_path / "p.jsonl", rows)), stats=stats)
    assert len(pairs) == 5
    assert stats == Counter(kept=5, identical=2, no_shared_prompt=1, prompt_not_prefix=1, empty_answer=2)


def test_score_fields_drop_ties_and_give_margins(tmp_path):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b", "metadata": {"sc": 9.0, "sr": 7.5}},
            {"prompt": "q", "chosen": "c", "rejected": "d", "metadata": {"sc": 8.0, "sr": 8.0}}]
    cfg = PreferenceDataConfig(chosen_score="metadata.sc", rejected_score="metadata.sr")
    stats = Counter()
    pairs = read_pairs(str(write_jsonl(tmp_path / "p.jsonl", rows)), cfg, stats)
    assert [p.margin for p in pairs] == [1.5] and stats == Counter(kept=1, tie=1)


@pytest.mark.parametrize("score", [float("nan"), float("inf"), -float("inf"), 10 ** 400])
def test_non_finite_scores_are_one_error_naming_file_line_and_field(tmp_path, score):
    """JSON's NaN and Infinity (and an integer past float range) are numbers to Python, not scores: a NaN margin
    would train the reward model on NaN."""
    rows = [{**easy_pairs(1)[0], "score_chosen": 2.0, "score_rejected": 1.0},
            {"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": score, "score_rejected": 1}]
    cfg = PreferenceDataConfig(chosen_score="score_chosen", rejected_score="score_rejected")
    with pytest.raises(DataError, match=re.escape("s.jsonl:2: field 'score_chosen' must be a finite number")):
        read_pairs(str(write_jsonl(tmp_path / "s.jsonl", rows)), cfg)


@pytest.mark.parametrize("row,field", [
    ({"prompt": "q", "chosen": "a"}, "'rejected' missing"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "'chosen' must be a string or a list of messages"),
    ({"prompt": "q", "chosen": [{"role": "robot", "content": "x"}], "rejected": "b"}, "'chosen'[0]: bad role"),
])
def test_malformed_rows_are_one_error_naming_file_line_and_field(tmp_path, row, field):
    path = write_jsonl(tmp_path / "bad.jsonl", easy_pairs(2) + [row])
    with pytest.raises(DataError, match=re.escape(f"bad.jsonl:3: field {field}")):
        read_pairs(str(path))


def test_unpaired_rows_and_unpairing(tmp_path):
    rows = [{"prompt": "q", "completion": "good", "label": True}, {"prompt": "q", "completion": "bad", "label": 0},
            {"prompt": "r", "chosen": "c", "rejected": "d"}]
    got = read_unpaired(str(write_jsonl(tmp_path / "u.jsonl", rows)))
    assert [(c, label) for _, c, label, _ in got] == [("good", True), ("bad", False), ("c", True), ("d", False)]
    with pytest.raises(DataError, match=r"u2.jsonl:1: field 'label' must be true or false"):
        read_unpaired(str(write_jsonl(tmp_path / "u2.jsonl", [{"prompt": "q", "completion": "x", "label": "y"}])))
    examples = tokenize_unpaired(got, micro_tokenizer(), PreferenceDataConfig(), seed=0)
    for i, e in enumerate(examples):  # each KL row pairs the prompt with another row's completion
        assert e.kl_completion_ids in [x.completion_ids for j, x in enumerate(examples) if j != i]


def test_tokenize_truncate_and_split(tmp_path):
    tok = micro_tokenizer()
    cfg = PreferenceDataConfig(max_length=24, max_prompt_length=20)
    pairs = read_pairs(str(write_jsonl(tmp_path / "p.jsonl", easy_pairs(10))))
    stats = Counter()
    tp = tokenize_pairs(pairs, tok, cfg, stats)
    t = tp[0]
    assert tok.decode(t.prompt_ids).endswith("<|im_start|>assistant\n")
    assert len(t.prompt_ids) + max(len(t.chosen_ids), len(t.rejected_ids)) <= 24
    assert stats["truncated"] > 0
    full = tokenize_pairs(pairs[:1], tok, PreferenceDataConfig())[0]
    assert tok.decode(full.chosen_ids).endswith("<|im_end|>") and "The answer is" in tok.decode(full.chosen_ids)
    train, held, info = load_preference_data(PreferenceDataConfig(source=str(tmp_path / "p.jsonl"),
                                                                  eval_fraction=0.2), tok)
    assert (len(train), len(held), info["train_pairs"], info["eval_pairs"]) == (8, 2, 8, 2)


def test_collate_puts_chosen_then_rejected_with_aligned_labels():
    pairs = [TokenPair([1, 2], [3, 4, 5], [6], ref_chosen=-1.0, ref_rejected=-2.0),
             TokenPair([7], [8], [9, 10], ref_chosen=-3.0, ref_rejected=-4.0)]
    b = collate_pairs(pairs, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 0, 0, 0], [1, 2, 6, 0, 0], [7, 9, 10, 0, 0]]
    assert b["labels"].tolist() == [[-100, 3, 4, 5, -100], [8, -100, -100, -100, -100],
                                    [-100, 6, -100, -100, -100], [9, 10, -100, -100, -100]]
    assert b["ref_logps"].tolist() == [-1.0, -3.0, -2.0, -4.0]
    left = collate_pairs(pairs, pad_id=0, side="left")
    assert left["input_ids"][1].tolist() == [0, 0, 0, 7, 8] and left["labels"][1].tolist() == [-100] * 3 + [8, -100]


def test_batches_resume_exactly_and_ranks_are_disjoint():
    items = list(range(50))
    a = Batches(items, 4, list, seed=3, length=lambda x: x % 7)
    seq = [next(a) for _ in range(30)]  # crosses an epoch boundary (12 batches per epoch)
    b = Batches(items, 4, list, seed=3, length=lambda x: x % 7)
    for _ in range(17):
        next(b)
    c = Batches(items, 4, list, seed=3, length=lambda x: x % 7)
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    assert [next(c) for _ in range(13)] == seq[17:]
    r0 = Batches(items, 4, list, seed=1, rank=0, world_size=2)
    r1 = Batches(items, 4, list, seed=1, rank=1, world_size=2)
    seen0 = {x for _ in range(6) for x in next(r0)}
    seen1 = {x for _ in range(6) for x in next(r1)}
    assert not seen0 & seen1 and len(seen0 | seen1) == 48


def test_parquet_and_tinyworld_sources(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(easy_pairs(4)), tmp_path / "p.parquet")
    assert len(read_pairs(str(tmp_path / "p.parquet"))) == 4
    stats = Counter()
    pairs = read_pairs("builtin:tinyworld/preference", stats=stats)
    assert len(pairs) > 100 and stats["kept"] == len(pairs)
    assert pairs[0].prompt[0]["role"] == "user" and pairs[0].chosen != pairs[0].rejected


def test_soft_labels_reach_the_batch_and_become_cdpo_smoothing():
    row = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5", "label_confidence": 0.8}
    pair = pair_from_row(row, "x.jsonl:1")
    assert pair.confidence == 0.8 and pair_from_row({**row, "label_confidence": 1}, "x").confidence == 1.0
    with pytest.raises(DataError, match=r"x.jsonl:3: field 'label_confidence'"):
        pair_from_row({**row, "label_confidence": 0.3}, "x.jsonl:3")
    tok = micro_tokenizer()
    batch = collate_pairs(tokenize_pairs([pair], tok, PreferenceDataConfig(max_length=64, max_prompt_length=32)),
                          tok.pad_id)
    assert torch.allclose(batch["confidence"], torch.tensor([0.8]))
    # cDPO with eps = 1 - confidence: -(0.8 log σ(βh) + 0.2 log σ(-βh)) at βh = 0.1 * 2
    c, r, z = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([0.0])
    loss, _ = dpo_loss(c, r, z, z, beta=0.1, loss_type="cdpo", label_smoothing=1 - batch["confidence"])
    expected = -(0.8 * torch.nn.functional.logsigmoid(torch.tensor(0.2)) +
                 0.2 * torch.nn.functional.logsigmoid(torch.tensor(-0.2)))
    assert torch.isclose(loss, expected)
