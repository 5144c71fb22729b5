"""End to end: `lmforge pretrain` on a micro config, then resume, sample, and open the result in transformers."""

import json

import pytest
import torch
from lmforge_cli import lmforge

from lmforge.modelio import load_model_dir
from lmforge.tokenizer import Tokenizer

MICRO = ["seq_len=32", "vocab_size=320", "model.hidden_size=32", "model.intermediate_size=64",
         "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.num_key_value_heads=1",
         "train.max_steps=60", "train.batch_size=8", "train.micro_batch_size=8", "train.warmup_steps=5",
         "train.eval_every=30", "train.eval_batches=2", "train.save_every=30", "train.log_every=5",
         "train.lr=1e-2", "sample_tokens=10"]




@pytest.mark.slow
def test_pretrain_cli_beats_unigram_and_writes_an_hf_checkpoint(tmp_path):
    out = tmp_path / "pre"
    proc = lmforge("pretrain", f"out_dir={out}", "data.filters.max_chars=2000", *MICRO)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_loss"] < summary["unigram_baseline"], summary
    assert summary["steps"] == 60 and summary["sample"].startswith("ROMEO:")
    assert "validation loss" in proc.stdout
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (out / "model" / name).exists(), name
    assert (out / "config.yaml").exists() and (out / "metrics.jsonl").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in rows) and any("loss" in r for r in rows)

    transformers = pytest.importorskip("transformers")

    stock = transformers.AutoModelForCausalLM.from_pretrained(out / "model")
    tok = transformers.AutoTokenizer.from_pretrained(out / "model")
    ids = torch.tensor([tok("ROMEO: my lord")["input_ids"]])
    ours = load_model_dir(out / "model").eval()
    with torch.no_grad():
        assert (ours(ids) - stock(ids).logits).abs().max() < 1e-4

    proc = lmforge("sample", f"model={out / 'model'}", "prompt=JULIET:", "max_new_tokens=8", "seed=1")
    assert "JULIET:" in proc.stdout


def test_bad_override_is_one_clear_error(tmp_path):
    proc = lmforge("pretrain", f"out_dir={tmp_path}", "train.max_stepz=3", check=False)
    assert proc.returncode == 2
    assert "unknown key train.'max_stepz'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_tokenizer_cli_trains_saves_and_reports(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(f'{{"text": "line {i} of a small corpus about tokens"}}\n' for i in range(50)))
    proc = lmforge("tokenizer", f"data={corpus}", "vocab_size=300", f"out_dir={tmp_path / 'tok'}")
    assert "characters/token" in proc.stdout

    tok = Tokenizer.load(tmp_path / "tok")
    assert 260 < tok.vocab_size <= 300 and tok.decode(tok.encode("line 7 of")) == "line 7 of"
    bad = lmforge("tokenizer", f"data={tmp_path / 'missing.jsonl'}", f"out_dir={tmp_path / 'x'}", check=False)
    assert bad.returncode == 2 and "missing.jsonl: no such file" in bad.stderr
