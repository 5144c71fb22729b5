"""End to end: `lmforge pretrain` on a weighted mix, then `lmforge midtrain` from it on a mix upweighting the quiz."""

import json

import pytest
import yaml
from lmforge_cli import lmforge

MODEL = ["seq_len=32", "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
         "model.num_attention_heads=2", "model.num_key_value_heads=1"]
TRAIN = ["train.batch_size=8", "train.micro_batch_size=8", "train.warmup_steps=2", "train.eval_batches=2",
         "train.log_every=5", "train.num_threads=1", "sample_tokens=8", "data.filters.max_chars=2000"]
PRE_MIX = "data.mix=[{source: builtin:tinyshakespeare, weight: 0.9}, {source: builtin:tinyworld/quiz, weight: 0.1}]"
MID_MIX = "data.mix=[{source: builtin:tinyshakespeare, weight: 0.2}, {source: builtin:tinyworld/quiz, weight: 0.8}]"




@pytest.mark.slow
def test_midtrain_cli_moves_loss_towards_the_upweighted_source(tmp_path):
    pre, mid = tmp_path / "pre", tmp_path / "mid"
    lmforge("pretrain", f"out_dir={pre}", "vocab_size=320", PRE_MIX, *MODEL, *TRAIN, "train.max_steps=30",
            "train.lr=1e-2", "train.eval_every=30", "train.save_every=30")
    meta = json.loads((pre / "data" / "meta.json").read_text())
    assert meta["source"] == "builtin:tinyshakespeare=0.9+builtin:tinyworld/quiz=0.1"

    proc = lmforge("midtrain", f"model={pre / 'model'}", f"out_dir={mid}", MID_MIX, "seq_len=32", *TRAIN,
                   "train.max_steps=20", "train.lr=5e-3", "train.eval_every=10", "train.save_every=20")
    summary = json.loads((mid / "summary.json").read_text())
    losses = summary["val_loss_by_source"]
    assert set(losses) == {"builtin:tinyshakespeare", "builtin:tinyworld/quiz"}
    quiz = losses["builtin:tinyworld/quiz"]
    assert quiz["after"] < quiz["before"], losses  # 80% quiz pages for 20 steps: the quiz gets easier
    assert summary["steps"] == 20 and summary["base_model"] == str(pre / "model")
    assert "builtin:tinyworld/quiz" in proc.stdout and "before" in proc.stdout

    config = yaml.safe_load((mid / "config.yaml").read_text())  # the midtrain config, resolved
    assert config["model"] == str(pre / "model") and config["data"]["mix"][1]["weight"] == 0.8
    assert config["train"]["min_lr_ratio"] == 0.0
    rows = [json.loads(line) for line in (mid / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert lrs[-1] < 0.2 * max(lrs)  # the linear schedule runs down to zero (the last logged step is 20 of 20)
    assert (mid / "model" / "model.safetensors").exists() and (mid / "model" / "tokenizer.json").exists()


def test_midtrain_without_a_base_model_is_one_clear_error(tmp_path):
    proc = lmforge("midtrain", f"model={tmp_path / 'nope'}", f"out_dir={tmp_path / 'mid'}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "nope: no such model directory" in proc.stderr and "lmforge pretrain" in proc.stderr


def test_bad_mix_weight_is_a_config_error(tmp_path):
    proc = lmforge("midtrain", f"model={tmp_path}", "data.mix=[{source: builtin:tinyshakespeare, weight: 0}]",
                   check=False)
    assert proc.returncode == 2 and "weight must be positive" in proc.stderr
