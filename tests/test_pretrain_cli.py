"""End to end: `lmforge pretrain` on a micro config, then resume, sample, and open the result in transformers."""

import json

import pytest
import torch
import yaml
from lmforge_cli import lmforge

from lmforge.apps.pipeline import stage_config
from lmforge.config import load_config
from lmforge.data.mix import source_overrides_mix
from lmforge.modelio import load_model_dir
from lmforge.stages.midtrain import MidtrainConfig
from lmforge.stages.pretrain import PretrainConfig
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


def test_a_source_on_the_command_line_is_the_data_not_the_recipes_mix(tmp_path):
    """README's own example, shrunk: `lmforge pretrain data.source=my_corpus/ ...` under the built-in recipe (whose
    data.mix used to win silently, the source only training the tokenizer) trains on my_corpus/ alone."""
    corpus = tmp_path / "my_corpus"
    corpus.mkdir()
    (corpus / "notes.txt").write_text("\n\n".join(f"Note {i}: the heron waits by the reed bed at dawn." for i in range(200)))
    out = tmp_path / "pre"
    lmforge("pretrain", f"data.source={corpus}/", f"out_dir={out}", "seq_len=32", "vocab_size=300",
            "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
            "model.num_attention_heads=2", "model.num_key_value_heads=1", "train.max_steps=2", "train.batch_size=4",
            "train.micro_batch_size=4", "train.warmup_steps=0", "train.eval_every=0", "train.save_every=0",
            "sample_tokens=4", threads=1)
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert meta["source"] == f"{corpus}/"
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["data"]["mix"] == [] and cfg["data"]["source"] == f"{corpus}/"


def test_an_explicit_mix_still_wins_and_midtrain_and_pipeline_follow_the_same_rule():
    both = ["data.source=a.jsonl", "data.mix=[{source: b.jsonl, weight: 1}]"]
    assert [m.source for m in load_config(PretrainConfig, "tiny", source_overrides_mix(both),
                                          section="pretrain").data.mix] == ["b.jsonl"]
    assert load_config(MidtrainConfig, "tiny", source_overrides_mix(["data.source=a.jsonl"]),
                       section="midtrain").data.mix == []
    assert stage_config("pretrain", "tiny", ["data.source=a.jsonl"]).data.mix == []
    assert len(stage_config("pretrain", "tiny", []).data.mix) == 2  # the recipe's mix when no source is given
    assert source_overrides_mix(["--config", "tiny", "seq_len=8"]) == ["--config", "tiny", "seq_len=8"]


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
