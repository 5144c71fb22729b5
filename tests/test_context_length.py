"""A run whose rows are longer than the model's context is one config error naming the key (exit 2), instead of
training on positions the model does not have while its saved config still claims the shorter context."""

import json
import re

import pytest
import torch
from lmforge_cli import lmforge
from preference_helpers import easy_pairs, micro_tokenizer, write_jsonl

from lmforge.model import ModelConfig, Transformer
from lmforge.modelio import save_model_dir


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    """A model with a 16-position context, preference pairs, chat rows and text that all run longer."""
    d = tmp_path_factory.mktemp("context")
    tok = micro_tokenizer()
    torch.manual_seed(0)
    save_model_dir(d / "model", Transformer(ModelConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16)), tok)
    pairs = write_jsonl(d / "pairs.jsonl", easy_pairs(16))
    chats = write_jsonl(d / "chat.jsonl", [{"messages": [{"role": "user", "content": p["prompt"]},
                                                         {"role": "assistant", "content": p["chosen"]}]}
                                           for p in easy_pairs(16)])
    (d / "text.txt").write_text("\n\n".join(json.dumps(p) for p in easy_pairs(64)))
    return d, pairs, chats


@pytest.mark.slow
@pytest.mark.parametrize("verb, key, says", [
    ("pretrain", "seq_len=64", "is longer than"),
    ("sft", "seq_len=256", r"lets rows reach \d+ tokens, more than"),
    ("reward", "data.max_length=192", r"lets rows reach \d+ tokens, more than"),
    ("dpo", "data.max_length=192", r"lets rows reach \d+ tokens, more than"),
    ("kto", "data.max_length=192", r"lets rows reach \d+ tokens, more than"),
])
def test_rows_longer_than_the_context_are_one_config_error(short, tmp_path, verb, key, says):
    d, pairs, chats = short
    model, out = d / "model", f"out_dir={tmp_path / verb}"
    args = {"pretrain": [f"init_from={model}", f"tokenizer={model}", f"data.source={d / 'text.txt'}", "data.mix=[]",
                         key],
            "sft": [f"model={model}", f"data={chats}", key, "val_fraction=0"],
            "reward": [f"model={model}", f"data.source={pairs}", key],
            "dpo": [f"model={model}", f"data.source={pairs}", key],
            "kto": [f"model={model}", f"data.source={pairs}", key]}[verb]
    proc = lmforge(verb, *args, out, "train.max_steps=1", "train.warmup_steps=0", check=False, threads=1)
    name, value = key.split("=")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert re.search(rf"config error: {re.escape(key)} {says} the model's context \(max_position_embeddings=16\): "
                     rf"set {re.escape(name)}=16 or less", proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr
