"""``lmforge dpo``: direct preference optimisation and its family on preference pairs; ``lmforge dpo sweep``: beta.

    loss_type  sigmoid (DPO) | ipo | hinge (SLiC) | cdpo / robust (label_smoothing = flip rate)   need pi_ref
               simpo (length-normalised, margin gamma) | orpo (odds ratio + SFT NLL)             reference-free

How a step runs: chosen and rejected rows go through ONE forward (2B rows, right-padded to the longest row of a
length-grouped batch, so the fast causal kernel runs and padding is minimal); per-token log-probs are taken only
at completion positions, from the hidden states and the lm_head a chunk at a time (never the full logits).
The reference log-probs are PRECOMPUTED in one pass before training (the initial policy is the reference, so
only one model is ever in memory); ``reference=live`` keeps a frozen copy instead. ``sync_ref_model=true``
keeps a live copy that follows the policy every ``ref_model_sync_steps`` steps, theta_ref <- alpha * theta +
(1 - alpha) * theta_ref with alpha = ``ref_model_mixup_alpha`` (TR-DPO, Gorbatovski et al. 2024; TRL's names;
train/reference.py). Metrics have TRL's names:
rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen, logps/rejected (eval_*
on held-out pairs). The result is a Hugging Face directory with the tokenizer and its chat template.

    lmforge dpo model=runs/tiny/sft/model data.source=pairs.jsonl loss_type=ipo beta=0.5
    lmforge dpo sweep betas=[0.05,0.1,0.5,1.0]      KL drift from the reference vs margin, a PNG and a table
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lmforge.config import parse_cli
from lmforge.data.preference import (
    Batches,
    PreferenceDataConfig,
    collate_pairs,
    collate_sequences,
    in_batches,
    load_preference_data,
    pair_length,
)
from lmforge.errors import DataError
from lmforge.figures import save_figure
from lmforge.modelio import check_context, load_model_and_tokenizer, save_model_dir, write_model_files
from lmforge.scoring import (
    evaluate_pairs,
    precompute_reference,
    store_pair_logps,
    to_device,
    token_kl,
)
from lmforge.train.checkpointing import latest_checkpoint
from lmforge.train.loop import TrainConfig, autocast_context, train
from lmforge.train.preference import REFERENCE_FREE, check_loss_options, dpo_loss_fn
from lmforge.train.reference import ReferenceSync, check_sync_options
from lmforge.train.runs import finish_run, round_metrics, start_run, write_config


@dataclass
class DPOConfig:
    model: str = "runs/tiny/sft/model"  # the SFT policy to start from
    ref_model: str = ""  # the reference; empty: the starting policy itself
    out_dir: str = "runs/tiny/dpo"
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    loss_type: str = "sigmoid"
    beta: float = 0.1  # KL strength (DPO/IPO/hinge); SimPO's reward scale; ORPO's lambda
    label_smoothing: float = 0.0  # cdpo / robust: the assumed label-flip rate
    simpo_gamma: float = 0.5  # SimPO's target margin
    rpo_alpha: float = 0.0  # > 0: + alpha * NLL of the chosen answer per token (RPO, Pang et al. 2024; TRL's
    #                         rpo_alpha): keeps DPO from pushing the chosen answer's likelihood down with the rejected
    reference: str = "precompute"  # precompute (one pass, then only the policy in memory) | live
    sync_ref_model: bool = False  # TR-DPO: a live reference that follows the policy (implies reference=live): every
    ref_model_sync_steps: int = 64  # this many optimizer steps,
    ref_model_mixup_alpha: float = 0.6  # theta_ref <- alpha * theta + (1 - alpha) * theta_ref (1 = a hard copy)
    betas: list[float] = field(default_factory=list)  # non-empty: run a beta sweep (same as `lmforge dpo sweep`)
    logprob_chunk_size: int = 1024  # completion tokens per lm_head chunk
    group_by_length: bool = True  # batch pairs of similar length: minimal padding
    gradient_checkpointing: bool = False
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-7, warmup_steps=10, max_steps=200,
                                                                   batch_size=16, micro_batch_size=8,
                                                                   weight_decay=0.0, eval_every=50))

    def validate(self) -> None:
        check_loss_options(self)
        if self.reference not in ("precompute", "live"):
            raise ValueError(f"reference must be precompute or live, got {self.reference!r}")
        if any(b <= 0 for b in self.betas):
            raise ValueError(f"every value in betas must be positive, got {self.betas}")
        check_sync_options(self)
        if self.sync_ref_model and self.loss_type in REFERENCE_FREE:
            raise ValueError(f"sync_ref_model: loss_type={self.loss_type} has no reference to follow the policy")


# ----------------------------------------------------------------------------------------------------- the stage

def prepare(cfg: DPOConfig, dist):
    """(policy, tokenizer, train pairs, eval pairs, data stats), reference log-probs precomputed when needed."""
    model, tokenizer = load_model_and_tokenizer(cfg.model, dist.device)
    train_pairs, eval_pairs, stats = load_preference_data(cfg.data, tokenizer, cfg.train.seed)
    check_context(model, max(map(pair_length, train_pairs + eval_pairs), default=0), "data.max_length",
                  cfg.data.max_length)
    if cfg.loss_type not in REFERENCE_FREE and cfg.reference == "precompute" and not cfg.sync_ref_model:
        ref = model if not cfg.ref_model else load_model_and_tokenizer(cfg.ref_model, dist.device)[0]
        t0 = time.time()
        collate, autocast = (lambda b: collate_pairs(b, tokenizer.pad_id)), autocast_context(cfg.train, dist.device)
        precompute_reference(ref, train_pairs, collate, store_pair_logps, pair_length, cfg.train.micro_batch_size * 2,
                             dist.device, cfg.logprob_chunk_size, autocast)
        precompute_reference(ref, eval_pairs, collate, store_pair_logps, None, cfg.train.micro_batch_size,
                             dist.device, cfg.logprob_chunk_size, autocast, "reference log-probs (eval)")
        stats["reference_seconds"] = round(time.time() - t0, 2)
        del ref
    return model, tokenizer, train_pairs, eval_pairs, stats


def live_reference(cfg: DPOConfig, model, device):
    """A frozen reference model for reference=live or sync_ref_model (None when not needed)."""
    if cfg.loss_type in REFERENCE_FREE or (cfg.reference != "live" and not cfg.sync_ref_model):
        return None
    ref = load_model_and_tokenizer(cfg.ref_model)[0] if cfg.ref_model else copy.deepcopy(model)
    return ref.to(device).eval().requires_grad_(False)


def train_policy(cfg: DPOConfig, model, tokenizer, train_pairs, eval_pairs, dist, out_dir: Path,
                 beta: float | None = None) -> dict:
    """The one loop on pairs into out_dir; returns the summary (initial and final eval metrics, throughput) on the
    main rank, {} elsewhere. Saving the model is the caller's."""
    if hasattr(model, "gradient_checkpointing"):
        model.gradient_checkpointing = cfg.gradient_checkpointing
    pad = tokenizer.pad_id

    def collate(items):
        return collate_pairs(items, pad)

    ref_model = live_reference(cfg, model, dist.device)
    loss_fn = dpo_loss_fn(cfg, beta, ref_model)
    batches = Batches(train_pairs, cfg.train.micro_batch_size, collate, cfg.train.seed, dist.rank,
                      dist.world_size, length=pair_length, group_by_length=cfg.group_by_length)
    data = batches
    if cfg.sync_ref_model:
        data = ReferenceSync(batches, ref_model, model, every=cfg.ref_model_sync_steps,
                             alpha=cfg.ref_model_mixup_alpha, accumulation=cfg.train.accumulation(dist.world_size),
                             resume_dir=lambda: latest_checkpoint(out_dir / "checkpoints"))

    def save_model(path: Path):
        write_model_files(path, model, tokenizer)
        if data is not batches:
            data.save(path)

    def eval_fn(m):
        return evaluate_pairs(m, loss_fn, eval_pairs, collate, cfg.train.micro_batch_size, dist.device,
                              cfg.train.eval_batches) if eval_pairs else {}

    model.eval()
    with torch.no_grad(), autocast_context(cfg.train, dist.device):
        initial = eval_fn(model)
    model.train()
    run_cfg = replace(cfg, beta=beta if beta is not None else cfg.beta)
    t0 = time.time()
    result = train(model, loss_fn, data, cfg.train, out_dir, dist=dist, eval_fn=eval_fn,
                   save_model=save_model, run_config=run_cfg,
                   tokens_per_batch_fn=lambda b: int(b["attention_mask"].sum()), description=f"dpo ({cfg.loss_type})")
    seconds = time.time() - t0
    if not dist.is_main:
        return {}
    return {"loss_type": cfg.loss_type, "beta": run_cfg.beta, "steps": result.step,
            "initial": round_metrics(initial), **round_metrics(result.eval_metrics),
            "train": round_metrics(result.metrics),
            "pairs_per_second": round(result.step * cfg.train.batch_size / max(seconds, 1e-9), 2)}


def run_dpo(cfg: DPOConfig) -> dict:
    """Train with the configured loss (or run the beta sweep when ``betas`` is set); returns the summary."""
    if cfg.betas:
        return run_sweep(cfg)
    run = start_run(cfg)
    model, tokenizer, train_pairs, eval_pairs, stats = prepare(cfg, run.dist)
    summary = train_policy(cfg, model, tokenizer, train_pairs, eval_pairs, run.dist, run.out_dir)
    return finish_run(run, {**summary, "data": stats}, model, tokenizer)


# ------------------------------------------------------------------------------------------------ the beta sweep

def kl_drift(policy, reference, pairs: list, pad_id: int, batch_size: int, device) -> dict:
    """Mean per-token and per-sequence KL(pi || pi_ref) on the chosen answers of held-out pairs."""
    total, tokens, seqs = 0.0, 0.0, 0
    policy.eval()
    with torch.inference_mode():
        for chunk in in_batches(pairs, batch_size):
            batch = to_device(collate_sequences([p.prompt_ids for p in chunk], [p.chosen_ids for p in chunk],
                                                pad_id), device)
            kl, n = token_kl(policy, reference, batch)
            total, tokens, seqs = total + float(kl.sum()), tokens + float(n.sum()), seqs + len(chunk)
    return {"kl_per_token": total / max(tokens, 1), "kl_per_sequence": total / max(seqs, 1)}


def run_sweep(cfg: DPOConfig) -> dict:
    """One DPO run per beta from the same start (reference log-probs computed once); then KL drift of each
    policy from the reference on held-out chosen answers against its held-out margin: sweep.json + PNG."""
    betas = cfg.betas or [0.05, 0.1, 0.5, 1.0]
    run = start_run(cfg)
    dist, out_dir = run.dist, run.out_dir
    start, tokenizer, train_pairs, eval_pairs, stats = prepare(cfg, dist)
    if not eval_pairs:
        raise DataError("the beta sweep measures KL and margins on held-out pairs: set data.eval_fraction > 0 "
                        "or data.eval_source")
    initial = {k: v.detach().clone() for k, v in start.state_dict().items()}
    reference = load_model_and_tokenizer(cfg.ref_model, dist.device)[0] if cfg.ref_model else copy.deepcopy(start)
    reference = reference.to(dist.device).eval()
    rows = []
    for beta in betas:
        start.load_state_dict(initial)
        beta_dir = out_dir / f"beta_{beta:g}"
        write_config(replace(cfg, beta=beta), beta_dir, dist)  # each beta's run is a run of its own
        summary = train_policy(cfg, start, tokenizer, train_pairs, eval_pairs, dist, beta_dir, beta=beta)
        if not dist.is_main:
            continue
        summary["model_dir"] = str(save_model_dir(beta_dir / "model", start, tokenizer))
        drift = kl_drift(start, reference, eval_pairs, tokenizer.pad_id, cfg.train.micro_batch_size, dist.device)
        margin = summary.get("eval_rewards/margins", float("nan"))
        rows.append({"beta": beta, **{k: round(v, 5) for k, v in drift.items()},
                     "eval_rewards/margins": margin, "logratio_margin": round(margin / beta, 4),
                     "eval_rewards/accuracies": summary.get("eval_rewards/accuracies"),
                     "model_dir": summary["model_dir"]})
    result = {"loss_type": cfg.loss_type, "betas": betas, "table": rows, "data": stats}
    if dist.is_main:
        (out_dir / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
        result["plot"] = str(plot_sweep(rows, out_dir / "kl_vs_margin.png", cfg.loss_type))
    return result


def plot_sweep(rows: list[dict], path: Path, loss_type: str = "sigmoid") -> Path:
    """KL drift from the reference (x) against the held-out chosen-rejected margin (y), one point per beta."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_reward, ax_ratio) = plt.subplots(1, 2, figsize=(10, 4))
    kl = [r["kl_per_token"] for r in rows]
    for ax, key, label in ((ax_reward, "eval_rewards/margins", "implicit reward margin beta*h (rewards/margins)"),
                           (ax_ratio, "logratio_margin", "log-ratio margin h = margin / beta")):
        ax.plot(kl, [r[key] for r in rows], marker="o")
        for r in rows:
            ax.annotate(f"beta={r['beta']:g}", (r["kl_per_token"], r[key]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        ax.set_xlabel("KL(pi || pi_ref) per token, held-out chosen answers")
        ax.set_ylabel(label)
    fig.suptitle(f"{loss_type}: drift from the reference vs preference margin")
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------------------- output

METRIC_ROWS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
               "logps/chosen", "logps/rejected")


def print_summary(summary: dict) -> None:
    console = Console()
    if "table" in summary:
        table = Table(title=f"beta sweep ({summary['loss_type']})")
        for col in ("beta", "KL/token", "KL/sequence", "rewards/margins", "log-ratio margin", "accuracy"):
            table.add_column(col, justify="right")
        for r in summary["table"]:
            acc = r.get("eval_rewards/accuracies")
            table.add_row(f"{r['beta']:g}", f"{r['kl_per_token']:.4f}", f"{r['kl_per_sequence']:.3f}",
                          f"{r['eval_rewards/margins']:.4f}", f"{r['logratio_margin']:.3f}",
                          "" if acc is None else f"{acc:.3f}")
        console.print(table)
        console.print(summary.get("plot", ""))
        return
    table = Table(title=f"dpo ({summary['loss_type']}, beta {summary['beta']:g}): held-out pairs")
    for col in ("metric", "before", "after"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for name in METRIC_ROWS:
        key = f"eval_{name}"
        if key in summary:
            before = summary["initial"].get(key)
            table.add_row(name, "" if before is None else f"{before:.4f}", f"{summary[key]:.4f}")
    console.print(table)
    console.print(f"{summary['steps']} steps, {summary['pairs_per_second']} pairs/s, data: "
                  + ", ".join(f"{k} {v}" for k, v in summary.get("data", {}).items()))
    console.print(summary["model_dir"])


def main(argv: list[str]) -> int:
    sweep = bool(argv) and argv[0] == "sweep"
    cfg = parse_cli(argv[1:] if sweep else argv, DPOConfig, prog="lmforge dpo" + (" sweep" if sweep else ""),
                    description=__doc__, default_recipe="tiny", section="dpo")
    if sweep and not cfg.betas:
        cfg = replace(cfg, betas=[0.05, 0.1, 0.5, 1.0])
    summary = run_dpo(cfg)
    if summary:
        print_summary(summary)
    return 0
