"""``lmforge reward``: train a reward model on preference pairs; ``lmforge reward score``: score answers with one.

    reward model  r(x, y) = w . h_last(x, y)        the SFT trunk + a scalar ``score`` head, read at the LAST
                                                    non-pad token (left or right padding alike)
    loss          -log sigma(r(x, y_w) - r(x, y_l) - m)   Bradley-Terry, optional per-pair margin m (Llama 2)

Chosen and rejected rows go through ONE forward (2B rows). Metrics use TRL's names: accuracy (share of pairs
with r_w > r_l), margin (mean r_w - r_l), and eval_* on held-out pairs. The result is a Hugging Face directory
that ``transformers`` opens as ``LlamaForSequenceClassification`` (and lmforge with ``load_model_dir``).

    lmforge reward model=runs/tiny/sft/model data.source=pairs.jsonl
    lmforge reward score model=runs/tiny/reward/model data=pairs.jsonl        (or prompt=... response=...)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.table import Table

from lmforge.config import parse_cli
from lmforge.data.chat import tokenize_prompt_completion
from lmforge.data.preference import (
    Batches,
    PreferenceDataConfig,
    collate_pairs,
    load_preference_data,
    pair_from_row,
    pair_length,
)
from lmforge.data.rows import read_rows
from lmforge.errors import DataError
from lmforge.modelio import check_context, load_model_and_tokenizer, write_model_files
from lmforge.objectives import bradley_terry_loss
from lmforge.scoring import evaluate_pairs, reward_scores, sequence_rewards
from lmforge.train.loop import TrainConfig, train
from lmforge.train.runs import finish_run, round_metrics, start_run


@dataclass
class RewardConfig:
    model: str = "runs/tiny/sft/model"  # the SFT model the reward model starts from
    out_dir: str = "runs/tiny/reward"
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    use_margin: bool = False  # subtract (chosen_score - rejected_score) * margin_scale inside the sigmoid
    margin_scale: float = 1.0
    center_rewards_coefficient: float = 0.0  # + c * mean((r_w + r_l)^2): keeps rewards centred on 0 (TRL)
    group_by_length: bool = True
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-5, warmup_steps=10, max_steps=200,
                                                                   batch_size=16, micro_batch_size=8,
                                                                   weight_decay=0.0, eval_every=50))

    def validate(self) -> None:
        if self.use_margin and not self.data.chosen_score:
            raise ValueError("use_margin needs data.chosen_score and data.rejected_score (the fields with scores)")


def reward_loss_fn(cfg: RewardConfig):
    def loss_fn(model, batch):
        rewards = sequence_rewards(model, batch["input_ids"], batch["attention_mask"])
        chosen, rejected = rewards.chunk(2)
        margin = batch["margin"] * cfg.margin_scale if cfg.use_margin else None
        loss, metrics = bradley_terry_loss(chosen, rejected, margin)
        if cfg.center_rewards_coefficient:
            loss = loss + cfg.center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
        return loss, metrics
    return loss_fn


def run_reward(cfg: RewardConfig) -> dict:
    """Train the reward model; returns the summary (eval accuracy and margin, data counts, model dir)."""
    run = start_run(cfg)
    dist = run.dist
    model, tokenizer = load_model_and_tokenizer(cfg.model, "cpu", num_labels=1)  # the head's init: CPU RNG
    if model.score.weight.abs().sum() == 0:  # a fresh head: small random init (TRL: std 1/sqrt(d + 1))
        torch.nn.init.normal_(model.score.weight, std=1 / (model.config.hidden_size + 1) ** 0.5)
    train_pairs, eval_pairs, stats = load_preference_data(cfg.data, tokenizer, cfg.train.seed)
    check_context(model, max(map(pair_length, train_pairs + eval_pairs), default=0), "data.max_length",
                  cfg.data.max_length)
    pad = tokenizer.pad_id

    def collate(items):
        return collate_pairs(items, pad)

    batches = Batches(train_pairs, cfg.train.micro_batch_size, collate, cfg.train.seed, dist.rank,
                      dist.world_size, length=pair_length, group_by_length=cfg.group_by_length)
    loss_fn = reward_loss_fn(cfg)

    def eval_fn(m):
        return evaluate_pairs(m, loss_fn, eval_pairs, collate, cfg.train.micro_batch_size, dist.device,
                              cfg.train.eval_batches) if eval_pairs else {}

    result = train(model, loss_fn, batches, cfg.train, run.out_dir, dist=dist, eval_fn=eval_fn,
                   save_model=lambda path: write_model_files(path, model, tokenizer), run_config=cfg,
                   tokens_per_batch_fn=lambda b: int(b["attention_mask"].sum()), description="reward")
    summary = {**round_metrics(result.eval_metrics), "train_accuracy": result.metrics.get("accuracy"),
               "steps": result.step, "data": stats}
    return finish_run(run, summary, model, tokenizer)


# --------------------------------------------------------------------------------------------------- scoring

@dataclass
class ScoreConfig:
    model: str = ""  # a reward model directory
    data: str = ""  # preference pairs (scores chosen and rejected) or {"prompt","completion"} rows
    prompt: str = ""  # ... or one prompt
    response: str = ""  # ... and one response
    batch_size: int = 16
    limit: int = 0
    output: str = ""  # optional jsonl of per-row scores

    def validate(self) -> None:
        if not self.model:
            raise ValueError("model=DIR (a reward model directory) is required")
        if bool(self.data) == bool(self.prompt or self.response):
            raise ValueError("give data=FILE, or prompt=... and response=...")


def run_score(cfg: ScoreConfig) -> dict:
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    if model.score is None:
        raise DataError(f"model={cfg.model}: no score head, so this is not a reward model (train one with "
                        "`lmforge reward`)")
    if not cfg.data:
        score = reward_scores(model, [tokenize_prompt_completion(tokenizer, cfg.prompt, cfg.response)],
                              tokenizer.pad_id)[0]
        return {"rows": [{"prompt": cfg.prompt, "response": cfg.response, "score": score}]}
    records, rows, skipped = [], [], 0
    for row, where in read_rows(cfg.data):
        if cfg.limit and len(records) >= cfg.limit:
            break
        if "chosen" in row or "rejected" in row:
            pair = pair_from_row(row, where)
            if isinstance(pair, str):
                skipped += 1
                continue
            p, c = tokenize_prompt_completion(tokenizer, pair.prompt, pair.chosen)
            _, r = tokenize_prompt_completion(tokenizer, pair.prompt, pair.rejected)
            records.append({"where": where, "kind": "pair"})
            rows += [(p, c), (p, r)]
        elif "prompt" in row and ("completion" in row or "response" in row):
            p, c = tokenize_prompt_completion(tokenizer, row["prompt"], row.get("completion", row.get("response")))
            records.append({"where": where, "kind": "single"})
            rows.append((p, c))
        else:
            raise DataError(f"{where}: a row to score needs 'chosen'/'rejected', or 'prompt' and 'completion' "
                            f"(fields: {', '.join(row)})")
    scores = iter(reward_scores(model, rows, tokenizer.pad_id, cfg.batch_size))
    for rec in records:
        if rec.pop("kind") == "pair":
            rec["chosen"], rec["rejected"] = next(scores), next(scores)
            rec["correct"] = rec["chosen"] > rec["rejected"]
        else:
            rec["score"] = next(scores)
    summary = {"rows": records, "skipped": skipped}
    pairs = [r for r in records if "correct" in r]
    if pairs:
        summary["accuracy"] = sum(r["correct"] for r in pairs) / len(pairs)
        summary["margin"] = sum(r["chosen"] - r["rejected"] for r in pairs) / len(pairs)
    if cfg.output:
        with open(cfg.output, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return summary


def print_score(summary: dict, limit: int = 20) -> None:
    rows = summary["rows"]
    table = Table(title=f"reward scores ({len(rows)} rows)")
    pairs = "chosen" in rows[0]
    for col in (["row", "chosen", "rejected", "chosen > rejected"] if pairs else ["row", "score"]):
        table.add_column(col, justify="left" if col == "row" else "right")
    for r in rows[:limit]:
        where = r.get("where", r.get("response", ""))[-40:]
        if "chosen" in r:
            table.add_row(where, f"{r['chosen']:.4f}", f"{r['rejected']:.4f}", "yes" if r["correct"] else "no")
        else:
            table.add_row(where, f"{r['score']:.4f}")
    console = Console()
    console.print(table)
    if "accuracy" in summary:
        console.print(f"accuracy {summary['accuracy']:.3f}  margin {summary['margin']:.4f}  "
                      f"({summary['skipped']} rows skipped as unusable pairs)")


def print_summary(summary: dict) -> None:
    table = Table(title="reward model", show_header=False)
    if "eval_accuracy" in summary:
        table.add_row("eval accuracy", f"{summary['eval_accuracy']:.3f} (chance 0.5)")
        table.add_row("eval margin", f"{summary['eval_margin']:.4f}")
    if summary.get("train_accuracy") is not None:
        table.add_row("train accuracy (last log)", f"{summary['train_accuracy']:.3f}")
    table.add_row("data", ", ".join(f"{k} {v}" for k, v in summary["data"].items()))
    table.add_row("steps", f"{summary['steps']} in {summary['seconds']} s")
    table.add_row("model", summary["model_dir"])
    Console().print(table)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "score":
        cfg = parse_cli(argv[1:], ScoreConfig, prog="lmforge reward score",
                        description="Score preference pairs or one prompt/response with a reward model.")
        print_score(run_score(cfg))
        return 0
    cfg = parse_cli(argv, RewardConfig, prog="lmforge reward", description=__doc__, default_recipe="tiny",
                    section="reward")
    summary = run_reward(cfg)
    if summary:
        print_summary(summary)
    return 0
