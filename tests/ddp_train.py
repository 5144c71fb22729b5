"""A toy LM and data stream for test_loop.py, and a script it runs with and without torchrun.

    python tests/ddp_train.py OUT_DIR                              # 1 process, 2 micro-batches of 2 rows
    torchrun --standalone --nproc_per_node=2 tests/ddp_train.py OUT_DIR   # 2 processes, 2 rows each

Both take the same 6 optimizer steps on the same 4-row global batches, so their losses must agree.
"""

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_model
from torch import nn

from lmforge.train.dist import all_reduce_mean, cleanup, init_distributed
from lmforge.train.loop import TrainConfig, train


@dataclass
class TinyConfig:
    vocab_size: int = 32
    dim: int = 16
    dropout: float = 0.0
    tie: bool = False


class TinyLM(nn.Module):
    """Embedding -> linear -> LayerNorm -> dropout -> head: matrices, biases, a norm and (optionally) a tie."""

    def __init__(self, config: TinyConfig | None = None):
        super().__init__()
        self.config = c = config or TinyConfig()
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        self.mix = nn.Linear(c.dim, c.dim)
        self.norm = nn.LayerNorm(c.dim)
        self.drop = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.dim, c.vocab_size, bias=False)
        if c.tie:
            self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(self.drop(self.norm(torch.relu(self.mix(self.embed(x))))))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        return 6.0 * (self.mix.weight.numel() + self.head.weight.numel())


def lm_loss(model, batch):
    x, y = batch
    logits = model(x)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    return loss, {"accuracy": (logits.argmax(-1) == y).float().mean()}


class Stream:
    """Token rows where every odd position is the previous token + 1 (learnable by a bigram model).

    Row j of the global stream depends only on (seed, j); call i of rank r returns global rows
    [(i * world + r) * rows, ... + rows), so any split into processes x micro-batches sees the same global
    batches. The state is the number of calls made.
    """

    def __init__(self, rows=4, seq=16, vocab=32, seed=0, rank=0, world=1):
        self.rows, self.seq, self.vocab, self.seed, self.rank, self.world = rows, seq, vocab, seed, rank, world
        self.index = 0

    def row(self, j: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + j)
        x = torch.randint(0, self.vocab, (self.seq + 1,), generator=g)
        x[1::2] = (x[0::2][: x[1::2].numel()] + 1) % self.vocab
        return x

    def __iter__(self):
        return self

    def __next__(self):
        first = (self.index * self.world + self.rank) * self.rows
        self.index += 1
        x = torch.stack([self.row(first + k) for k in range(self.rows)])
        return x[:, :-1], x[:, 1:]

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = state["index"]


def weights_saver(model):
    """A save_model callback: model.safetensors + a config.json, like a real model directory."""
    def save(path: Path):
        save_model(model, str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps(asdict(model.config)))
    return save


def main(out: Path) -> None:
    dist = init_distributed("cpu")
    torch.manual_seed(0)
    model = TinyLM()
    cfg = TrainConfig(lr=1e-2, warmup_steps=2, max_steps=6, batch_size=4, micro_batch_size=2, log_every=1,
                      eval_every=3, save_every=3, grad_clip=1.0, seed=0, num_threads=1)

    def eval_fn(m):
        x, y = next(Stream(rows=4 // dist.world_size, seed=1, rank=dist.rank, world=dist.world_size))
        return {"val_loss": all_reduce_mean(F.cross_entropy(m(x).flatten(0, 1), y.flatten()).item())}

    train(model, lm_loss, Stream(rows=2, rank=dist.rank, world=dist.world_size), cfg, out, dist=dist,
          save_model=weights_saver(model), eval_fn=eval_fn)
    cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
