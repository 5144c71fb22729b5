"""Next-token training on the one loop: the pre-training run, and the loss SFT trains with.

    pretrain(cfg, dist)   raw text -> tokenizer -> token shards -> the loop on packed fixed-length rows ->
                          (summary, model, tokenizer); `lmforge midtrain` calls it inside its own run
    run_pretraining(cfg)  the whole run around it (train/runs.py: config.yaml, model dir, summary.json):
                          `lmforge pretrain` and every run of `lmforge scaling sweep`
    sft_loss              mean next-token loss over assistant tokens of packed chat rows (`lmforge sft`)

Each step of pretrain is skipped when its output is already complete, so a rerun resumes: the tokenizer is
reused when trained with the same settings on unchanged data, the shards when their meta.json matches, and
training continues from the last checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from lmforge.data.mix import MixSource, mix_documents, mix_name
from lmforge.data.shards import PackedBatches, TokenDataset, build_shards, iter_eval, unigram_baseline_loss
from lmforge.data.sources import FilterConfig, filter_documents, read_documents
from lmforge.generation import SamplingParams, generate
from lmforge.model import ModelConfig, Transformer
from lmforge.modelio import check_context, check_model_dir, load_model_dir, load_tokenizer, write_model_files
from lmforge.tokenizer import Tokenizer, train_corpus_tokenizer
from lmforge.train.dist import DistInfo, all_reduce_mean, barrier
from lmforge.train.loop import TrainConfig, train
from lmforge.train.runs import finish_run, start_run


@dataclass
class DataConfig:
    source: str = "builtin:tinyshakespeare"  # file, dir, glob, builtin:NAME or hf:NAME[:CONFIG][@SPLIT]
    text_field: str = "text"
    val_fraction: float = 0.05
    filters: FilterConfig = field(default_factory=FilterConfig)
    # Weighted sources (weights = shares of tokens; see data/mix.py). When set, the training documents come from
    # the mix; `source` still trains the tokenizer when none is given.
    mix: list[MixSource] = field(default_factory=list)
    mix_tokens: int = 0  # the mixture's size; 0 = as large as it gets without repeating any source


@dataclass
class PretrainConfig:
    out_dir: str = "runs/tiny/pretrain"
    tokenizer: str = ""  # an existing tokenizer/model dir; empty: train one into out_dir/tokenizer
    vocab_size: int = 2048  # for a tokenizer trained here
    think_tokens: bool = False  # ... with <think> and </think> as single tokens and the thinking chat template
    init_from: str = ""  # continue from a model directory instead of a random init
    seq_len: int = 256
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample_prompt: str = "ROMEO:"
    sample_tokens: int = 80

    def validate(self) -> None:
        if self.seq_len < 2:
            raise ValueError("seq_len must be at least 2")


def prepare_tokenizer(cfg: PretrainConfig, out_dir: Path, dist: DistInfo) -> Tokenizer:
    """The run's tokenizer: the configured one, or train one on this corpus (main rank; the others wait)."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    tok_dir = out_dir / "tokenizer"
    if dist.is_main:  # reused when trained with the same settings on unchanged data; retrained otherwise
        train_corpus_tokenizer(cfg.data.source, tok_dir, cfg.vocab_size, text_field=cfg.data.text_field,
                               think_tokens=cfg.think_tokens)
    barrier()
    return Tokenizer.load(tok_dir)


def prepare_shards(cfg: PretrainConfig, tokenizer, data_dir: Path, dist: DistInfo) -> dict:
    """Token shards for the corpus, built once (a complete meta.json with the same fingerprint = done)."""
    if dist.is_main:
        if cfg.data.mix:
            kept, stats, _ = mix_documents(cfg.data.mix, tokenizer, cfg.data.filters, cfg.train.seed,
                                           cfg.data.mix_tokens)
        else:
            kept, stats = filter_documents(read_documents(cfg.data.source, text_field=cfg.data.text_field),
                                           cfg.data.filters)
        build_shards(kept, tokenizer, data_dir, val_fraction=cfg.data.val_fraction, seed=cfg.train.seed,
                     filter_stats=stats, source=mix_name(cfg.data.mix) if cfg.data.mix else cfg.data.source)
    barrier()
    return json.loads((data_dir / "meta.json").read_text())


def build_model(cfg: PretrainConfig, tokenizer) -> Transformer:
    """A random init sized by cfg.model (vocabulary from the tokenizer), or the ``init_from`` directory's model."""
    if cfg.init_from:
        model = load_model_dir(cfg.init_from)
        check_context(model, cfg.seq_len, "seq_len", cfg.seq_len)  # windows are always full
        if model.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"init_from {cfg.init_from}: vocab {model.config.vocab_size} is smaller than the "
                             f"tokenizer's {tokenizer.vocab_size}")
        return model
    model_cfg = replace(cfg.model, vocab_size=tokenizer.vocab_size,
                        max_position_embeddings=max(cfg.model.max_position_embeddings, cfg.seq_len))
    return Transformer(model_cfg)


def pretrain(cfg: PretrainConfig, dist: DistInfo) -> tuple[dict, Transformer, Tokenizer]:
    """Train (or resume) into cfg.out_dir; returns (summary, model, tokenizer), the summary on the main rank only:
    val_loss, unigram_baseline, n_params, tokens, flops, steps, sample. Saving the model and the summary is the
    caller's (runs.finish_run)."""
    out_dir = Path(cfg.out_dir)
    if cfg.init_from:
        check_model_dir(cfg.init_from)  # a broken model is one error now, not after the shards are built
    tokenizer = prepare_tokenizer(cfg, out_dir, dist)
    meta = prepare_shards(cfg, tokenizer, out_dir / "data", dist)
    train_ds, val_ds = TokenDataset(out_dir / "data", "train"), TokenDataset(out_dir / "data", "val")

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, tokenizer).to(dist.device)
    micro_rows = cfg.train.micro_batch_size * dist.world_size
    batches = PackedBatches(train_ds, batch_size=micro_rows, seq_len=cfg.seq_len, seed=cfg.train.seed,
                            rank=dist.rank, world_size=dist.world_size)

    def eval_fn(model):
        losses = [model(x.to(dist.device), labels=y.to(dist.device)).item()
                  for x, y in iter_eval(val_ds, micro_rows, cfg.seq_len, cfg.train.eval_batches,
                                        dist.rank, dist.world_size)]
        return {"val_loss": all_reduce_mean(sum(losses) / max(len(losses), 1))}

    result = train(model, lm_loss, batches, cfg.train, out_dir, eval_fn=eval_fn, dist=dist, run_config=cfg,
                   save_model=lambda path: write_model_files(path, model, tokenizer),
                   tokens_per_batch_fn=lambda batch: batch[0].numel())
    if not dist.is_main:
        return {}, model, tokenizer
    summary = {
        "val_loss": result.eval_metrics.get("val_loss", float("nan")),
        "unigram_baseline": unigram_baseline_loss(train_ds, val_ds, tokenizer.vocab_size),
        "n_params": model.num_params(),
        "n_params_non_embedding": model.num_params(non_embedding=True),
        "tokens": result.tokens,
        "flops": 6 * model.num_params(non_embedding=True) * result.tokens,
        "flops_with_attention": model.flops_per_token(cfg.seq_len) * result.tokens,
        "steps": result.step,
        "train_tokens_in_corpus": meta.get("train_tokens"),
        "sample": sample_text(model, tokenizer, cfg.sample_prompt, cfg.sample_tokens, cfg.train.seed),
    }
    return summary, model, tokenizer


def run_pretraining(cfg: PretrainConfig) -> dict:
    """A whole pre-training run: runs.start_run (config.yaml, seed), pretrain, runs.finish_run (out_dir/model,
    summary.json); returns the summary (`lmforge pretrain`, and each run of a scaling sweep)."""
    run = start_run(cfg)
    summary, model, tokenizer = pretrain(cfg, run.dist)
    return finish_run(run, summary, model, tokenizer)


def lm_loss(model, batch):
    """Next-token cross-entropy of a packed (inputs, targets) batch (the loop has moved it to the device)."""
    x, y = batch
    return model(x, labels=y), {}


def sft_loss(model, batch: dict):
    """Mean next-token cross-entropy over assistant tokens (labels -100 elsewhere); an all-masked batch is 0."""
    loss = model(batch["input_ids"], labels=batch["labels"], document_ids=batch.get("document_ids"))
    return loss, {"num_target_tokens": (batch["labels"] != -100).sum().float()}


def sample_text(model, tokenizer, prompt: str, max_new_tokens: int, seed: int) -> str:
    """``prompt`` and a sampled continuation (temperature 0.8, top-k 50, seeded): what a base model writes."""
    if max_new_tokens <= 0:
        return ""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, seed=seed)
    ids = tokenizer.encode(prompt, add_bos=True)
    completion = generate(model.eval(), [ids], params, tokenizer=tokenizer)[0][0]
    return prompt + tokenizer.decode(completion.token_ids, skip_special_tokens=True)
