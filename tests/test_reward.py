"""Reward model: last-token reading under any padding, the scorer agrees, HF parity, and the CLI end to end."""

import json
import math

import pytest
import torch
from lmforge_cli import lmforge
from preference_helpers import easy_pairs, micro_model_dir, write_jsonl

from lmforge.data.preference import PreferenceDataConfig, TokenPair, collate_pairs, pad_rows
from lmforge.inference_scaling import reward_model_scorer
from lmforge.model import ModelConfig, Transformer
from lmforge.modelio import load_model_dir, save_model_dir
from lmforge.scoring import last_token_index, sequence_rewards
from lmforge.stages.reward import RewardConfig, reward_loss_fn

ROWS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def rm(seed=0):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, num_labels=1)).eval()
    torch.nn.init.normal_(model.score.weight)
    return model


def test_last_token_index_any_padding():
    assert last_token_index(torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]])).tolist() \
        == [2, 0, 3, 3]


def test_padding_side_does_not_change_rewards():
    model = rm()
    with torch.no_grad():
        alone = [sequence_rewards(model, torch.tensor([r])).item() for r in ROWS]
        right = sequence_rewards(model, *pad_rows(ROWS, pad_id=0, side="right"))
        left = sequence_rewards(model, *pad_rows(ROWS, pad_id=0, side="left"))
    assert torch.allclose(right, torch.tensor(alone), atol=1e-5)
    assert torch.allclose(left, torch.tensor(alone), atol=1e-5)


def test_best_of_n_scorer_reads_the_same_token():
    model = rm(1)
    scorer = reward_model_scorer(model, pad_id=0)
    pairs = [(r[:1], r[1:]) for r in ROWS]
    with torch.no_grad():
        ours = sequence_rewards(model, *pad_rows(ROWS, pad_id=0)).tolist()
    assert scorer.score_batch(pairs) == pytest.approx(ours, abs=1e-5)


def test_bradley_terry_through_the_stage_loss():
    model = rm(2)
    pairs = [TokenPair([5], [6, 7], [8]), TokenPair([9, 10], [11], [12, 13, 14])]
    batch = collate_pairs(pairs, pad_id=0)
    batch["margin"] = torch.tensor([0.5, 1.0])
    with torch.no_grad():
        r = sequence_rewards(model, batch["input_ids"], batch["attention_mask"])
        diff = r[:2] - r[2:]
        loss, m = reward_loss_fn(RewardConfig())(model, batch)
        loss_m, _ = reward_loss_fn(RewardConfig(use_margin=True, data=_scored()))(model, batch)
    expected = sum(math.log(1 + math.exp(-d)) for d in diff.tolist()) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert m["accuracy"].item() == (diff > 0).float().mean().item() and m["margin"].item() == pytest.approx(
        diff.mean().item(), abs=1e-6)
    expected_m = sum(math.log(1 + math.exp(-(d - mg))) for d, mg in zip(diff.tolist(), [0.5, 1.0])) / 2
    assert loss_m.item() == pytest.approx(expected_m, rel=1e-5)


def _scored():
    return PreferenceDataConfig(chosen_score="s", rejected_score="t")


def test_saved_reward_model_opens_in_transformers_with_the_same_scores(tmp_path):
    transformers = pytest.importorskip("transformers")

    model = rm(3)
    save_model_dir(tmp_path, model)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["num_labels"] == 1
    assert load_model_dir(tmp_path).score is not None  # reopens with its head, no num_labels needed
    stock = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    stock.config.pad_token_id = 0
    ids, mask = pad_rows(ROWS, pad_id=0)
    with torch.no_grad():
        ours = sequence_rewards(model, ids, mask)
        theirs = stock(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert torch.allclose(ours, theirs, atol=1e-4)




MICRO = ["train.max_steps=16", "train.batch_size=8", "train.micro_batch_size=8", "train.warmup_steps=2",
         "train.lr=1e-3", "train.eval_every=0", "train.log_every=4", "train.save_every=0", "train.num_threads=1",
         "data.eval_fraction=0.25"]


@pytest.mark.slow
def test_reward_cli_learns_an_easy_preference_and_scores(tmp_path):
    model = micro_model_dir(tmp_path / "sft")
    data = write_jsonl(tmp_path / "pairs.jsonl", easy_pairs(96))
    out = tmp_path / "rm"
    lmforge("reward", f"model={model}", f"data.source={data}", f"out_dir={out}", *MICRO)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_accuracy"] > 0.9 and summary["eval_margin"] > 0, summary
    assert summary["data"]["eval_pairs"] == 24
    assert (out / "metrics.jsonl").exists() and (out / "config.yaml").exists()
    proc = lmforge("reward", "score", f"model={out / 'model'}", f"data={data}", "limit=8")
    assert "accuracy" in proc.stdout
    proc = lmforge("reward", "score", f"model={out / 'model'}", "prompt=What is 2 + 2?", "response=The answer is 4.")
    assert "score" in proc.stdout
    bad = write_jsonl(tmp_path / "bad.jsonl", easy_pairs(3) + [{"prompt": "q", "chosen": "a"}])
    proc = lmforge("reward", f"model={model}", f"data.source={bad}", f"out_dir={tmp_path / 'x'}", check=False)
    assert proc.returncode == 2 and "bad.jsonl:4: field 'rejected' missing" in proc.stderr
    assert "Traceback" not in proc.stderr
