"""Shared by the preference tests: a micro model directory (ChatML tokenizer + random model) and easy pair files."""

import json
import random
from pathlib import Path

import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.modelio import save_model_dir
from lmforge.tokenizer import train_tokenizer

WORDS = "the answer is sure here you go I do not know sorry maybe ask someone else what".split()


def easy_pairs(n: int, seed: int = 0) -> list[dict]:
    """An easy preference: chosen gives the sum, rejected refuses. Separable from the answer's first tokens."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(10, 99), rng.randrange(10, 99)
        rows.append({"prompt": f"What is {a} + {b}?", "chosen": f"The answer is {a + b}.",
                     "rejected": rng.choice(["I do not know, sorry.", "Maybe ask someone else.", "Sorry, no."])})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def micro_tokenizer():
    texts = [" ".join(WORDS)] * 3 + [f"What is {a} + {b}? The answer is {a + b}." for a in range(10, 99, 7)
                                     for b in range(10, 99, 9)]
    return train_tokenizer(texts + ["I do not know, sorry. Maybe ask someone else. Sorry, no."] * 3, vocab_size=320)


def micro_model_dir(path: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A saved random micro model with a ChatML tokenizer: what `lmforge sft` would hand to reward / dpo."""
    tok = micro_tokenizer()
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                                    num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                    max_position_embeddings=128))
    save_model_dir(path, model, tok)
    return path
