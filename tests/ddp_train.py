"""A toy LM and data stream for test_loop.py, and a script it runs with and without torchrun.

    python tests/ddp_train.py OUT_DIR                              # 1 process, 2 micro-batches of 2 rows
    torchrun --standalone --nproc_per_node=2 tests/ddp_train.py OUT_DIR   # 2 processes, 2 rows each
    torchrun --standalone --nproc_per_node=2 tests/ddp_train.py OUT_DIR fsdp   # the same runs under FSDP2

All take the same 6 optimizer steps on the same 4-row global batches, so their losses must agree. ``fsdp`` runs,
in one process group: the toy model (OUT_DIR/toy), a tiny lmforge Transformer sharded per block
(OUT_DIR/transformer), that Transformer interrupted after its step-3 checkpoint, then resumed (OUT_DIR/cut), and
one whose loss is NaN on rank 1 at step 2 under nan_policy=skip (OUT_DIR/nan).
"""

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file, save_model
from torch import nn

from lmforge.model import ModelConfig, Transformer
from lmforge.modelio import write_model_files
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


TRANSFORMER = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)


def transformer_loss(model, batch):
    x, y = batch
    return model(x, labels=y), {}


class Interrupted(Stream):
    """Dies drawing its ``stop_at``-th micro-batch, on every rank alike (8: step 5's first of 2, after the step-3
    checkpoint, for 2 processes x 1 row x 2 micro-batches)."""

    stop_at = 8

    def __next__(self):
        if self.index == self.stop_at:
            raise KeyboardInterrupt
        return super().__next__()


def nan_on_rank1(call: int):
    """transformer_loss, except that rank 1's ``call``-th micro-batch gives NaN: every rank must skip that step."""
    calls = [0]

    def loss_fn(model, batch):
        calls[0] += 1
        loss, metrics = transformer_loss(model, batch)
        bad = calls[0] == call and torch.distributed.is_initialized() and torch.distributed.get_rank() == 1
        return (loss * float("nan") if bad else loss), metrics
    return loss_fn


def run_transformer(out: Path, parallel: str = "ddp", data: Stream | None = None, dist=None,
                    loss_fn=transformer_loss, **kw):
    """A tiny lmforge Transformer (2 blocks, tied embeddings) on the same stream; saves HF model directories."""
    dist = dist or init_distributed("cpu")
    torch.manual_seed(0)
    model = Transformer(TRANSFORMER)
    cfg = TrainConfig(**{**dict(lr=1e-2, warmup_steps=2, max_steps=6, batch_size=4, micro_batch_size=1, log_every=1,
                                eval_every=0, save_every=3, grad_clip=1.0, seed=0, num_threads=1, parallel=parallel),
                         **kw})
    data = data or Stream(rows=1, rank=dist.rank, world=dist.world_size)
    train(model, loss_fn, data, cfg, out, dist=dist, save_model=lambda path: write_model_files(path, model))
    return model


def main(out: Path, parallel: str = "ddp") -> None:
    dist = init_distributed("cpu")
    toy_out = out / "toy" if parallel == "fsdp" else out
    torch.manual_seed(0)
    model = TinyLM()
    cfg = TrainConfig(lr=1e-2, warmup_steps=2, max_steps=6, batch_size=4, micro_batch_size=2, log_every=1,
                      eval_every=3, save_every=3, grad_clip=1.0, seed=0, num_threads=1, parallel=parallel)

    def eval_fn(m):
        x, y = next(Stream(rows=4 // dist.world_size, seed=1, rank=dist.rank, world=dist.world_size))
        if dist.rank == 0:  # one more forward on one rank (a short last eval batch): must not hang under fsdp
            m(x)
        return {"val_loss": all_reduce_mean(F.cross_entropy(m(x).flatten(0, 1), y.flatten()).item())}

    train(model, lm_loss, Stream(rows=2, rank=dist.rank, world=dist.world_size), cfg, toy_out, dist=dist,
          save_model=weights_saver(model), eval_fn=eval_fn)
    if parallel == "fsdp":
        trained = run_transformer(out / "transformer", parallel, dist=dist)
        save_file({k: v.clone() for k, v in trained.state_dict().items()}, str(out / f"returned{dist.rank}.safetensors"))
        try:
            run_transformer(out / "cut", parallel, Interrupted(rows=1, rank=dist.rank, world=dist.world_size), dist)
            raise AssertionError("the interrupted run went on")
        except KeyboardInterrupt:
            pass
        run_transformer(out / "cut", parallel, dist=dist)
        run_transformer(out / "nan", parallel, dist=dist, loss_fn=nan_on_rank1(3), nan_policy="skip")
    cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
