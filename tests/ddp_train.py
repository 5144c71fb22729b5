"""Run by test_loop.py with and without torchrun: the same 6 optimizer steps on the same global batches."""

import json
import sys
from pathlib import Path

import numpy as np
import torch

from lmforge.data.shards import PackedBatches, TokenDataset
from lmforge.model import ModelConfig, Transformer
from lmforge.modelio import write_model_files
from lmforge.train.dist import cleanup, init_distributed
from lmforge.train.loop import TrainConfig, train


def main(out: Path) -> None:
    dist = init_distributed("cpu")
    data_dir = out / f"data_rank{dist.rank}"
    data_dir.mkdir(parents=True, exist_ok=True)
    tokens = np.random.default_rng(0).integers(0, 64, 4000).astype(np.uint16)
    tokens[1::2] = (tokens[0::2] + 1) % 64
    tokens.tofile(data_dir / "train_000.bin")
    (data_dir / "meta.json").write_text(json.dumps({"vocab_size": 64, "dtype": "uint16",
                                                    "train_shards": ["train_000.bin"]}))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))
    cfg = TrainConfig(lr=1e-2, warmup_steps=2, max_steps=6, batch_size=4, micro_batch_size=2, log_every=1,
                      eval_every=0, save_every=0, grad_clip=1.0)
    batches = PackedBatches(TokenDataset(data_dir, "train"), batch_size=2 * dist.world_size, seq_len=16,
                            rank=dist.rank, world_size=dist.world_size)
    train(model, lambda m, b: (m(b[0], labels=b[1]), {}), batches, cfg, out, dist=dist,
          save_model=lambda d: write_model_files(d, model))
    cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
