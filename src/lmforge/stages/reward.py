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
import time
from dataclasses import dataclass, field

from lmforge.data.preference import PreferenceDataConfig
from lmforge.train.loop import TrainConfig


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


def last_token_index(attention_mask):
    """Index of the last real (mask = 1) token of each row: right, left or no padding."""
    import torch

    T = attention_mask.shape[1]
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return (positions * attention_mask.bool()).amax(dim=1)


def is_right_padded(attention_mask) -> bool:
    """True when every row's padding sits at its end, so plain causal attention already ignores it."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def forward_hidden(model, input_ids, attention_mask=None):
    """Final hidden states; with left (or inner) padding the mask and shifted positions are passed, with right
    padding neither is needed (causal attention never looks right) and the fast causal kernel runs."""
    if attention_mask is None or is_right_padded(attention_mask):
        return model(input_ids, return_hidden=True)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids, attention_mask=attention_mask, position_ids=positions, return_hidden=True)


def sequence_rewards(model, input_ids, attention_mask=None):
    """(N,) fp32 rewards: the ``score`` head on the hidden state of each row's last non-pad token."""
    import torch

    from lmforge.train.dist import unwrap

    hidden = forward_hidden(model, input_ids, attention_mask)
    if attention_mask is None:
        last = hidden[:, -1]
    else:
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
    return unwrap(model).score(last)[:, 0].float()


def reward_loss_fn(cfg: RewardConfig):
    from lmforge.objectives import bradley_terry_loss

    def loss_fn(model, batch):
        rewards = sequence_rewards(model, batch["input_ids"], batch["attention_mask"])
        chosen, rejected = rewards.chunk(2)
        margin = batch["margin"] * cfg.margin_scale if cfg.use_margin else None
        loss, metrics = bradley_terry_loss(chosen, rejected, margin)
        if cfg.center_rewards_coefficient:
            loss = loss + cfg.center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
        return loss, metrics
    return loss_fn


def evaluate_pairs(model, loss_fn, pairs, collate, batch_size: int, device, limit_batches: int = 0) -> dict:
    """Pair-weighted means of loss_fn's loss and metrics over held-out pairs, named eval_*."""
    from lmforge.data.preference import in_batches
    from lmforge.train.loop import to_device

    sums: dict[str, float] = {}
    n = 0
    for i, chunk in enumerate(in_batches(pairs, batch_size)):
        if limit_batches and i >= limit_batches:
            break
        loss, metrics = loss_fn(model, to_device(collate(chunk), device))
        for k, v in {"loss": loss, **metrics}.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(chunk)
        n += len(chunk)
    return {f"eval_{k}": v / max(n, 1) for k, v in sums.items()}


def load_policy(path: str, num_labels: int | None = None):
    """(model, tokenizer) from a model directory; the tokenizer must be there too (it carries the template)."""
    from lmforge.data.sources import DataError
    from lmforge.modelio import load_model_dir, load_tokenizer

    try:
        model = load_model_dir(path, num_labels=num_labels)
        tokenizer = load_tokenizer(path)
    except FileNotFoundError as e:
        raise DataError(f"model={path}: {e} (train one with `lmforge sft`, or import one)") from None
    return model, tokenizer


def run_reward(cfg: RewardConfig) -> dict:
    """Train the reward model; returns the summary (eval accuracy and margin, data counts, model dir)."""
    import torch

    from lmforge.data.preference import Batches, collate_pairs, load_preference_data, pair_length
    from lmforge.modelio import check_context, save_model_dir, write_model_files
    from lmforge.train.dist import refuse_fsdp, start_run
    from lmforge.train.loop import train

    refuse_fsdp(cfg.train, "reward")
    dist, out_dir = start_run(cfg)
    t0 = time.time()
    torch.manual_seed(cfg.train.seed)
    model, tokenizer = load_policy(cfg.model, num_labels=1)
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

    result = train(model, loss_fn, batches, cfg.train, out_dir, dist=dist, eval_fn=eval_fn,
                   save_model=lambda path: write_model_files(path, model, tokenizer), run_config=cfg,
                   tokens_per_batch_fn=lambda b: int(b["attention_mask"].sum()), description="reward")
    summary = {}
    if dist.is_main:
        save_model_dir(out_dir / "model", model, tokenizer)
        summary = {**{k: round(v, 4) for k, v in result.eval_metrics.items()},
                   "train_accuracy": result.metrics.get("accuracy"), "steps": result.step,
                   "data": stats, "seconds": round(time.time() - t0, 1), "model_dir": str(out_dir / "model")}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


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


@dataclass
class ScoreRow:
    where: str
    prompt_ids: list
    answers: list  # token ids of one or two answers


def score_texts(model, tokenizer, prompt, responses: list, batch_size: int = 16) -> list[float]:
    """Rewards of ``responses`` (strings or assistant messages) to one ``prompt``, tokenized as in training."""
    from lmforge.data.chat import tokenize_prompt_completion

    rows = [sum(tokenize_prompt_completion(tokenizer, prompt, r), []) for r in responses]
    return score_token_rows(model, rows, tokenizer.pad_id, batch_size)


def score_token_rows(model, rows: list[list[int]], pad_id: int, batch_size: int = 16) -> list[float]:
    import torch

    from lmforge.data.preference import in_batches, pad_rows

    device = model.score.weight.device
    out = []
    with torch.inference_mode():
        for chunk in in_batches(rows, batch_size):
            ids, mask = pad_rows(chunk, pad_id)
            out += sequence_rewards(model, ids.to(device), mask.to(device)).tolist()
    return out


def run_score(cfg: ScoreConfig) -> dict:
    from lmforge.data.chat import tokenize_prompt_completion
    from lmforge.data.preference import _rows, pair_from_row
    from lmforge.data.sources import DataError

    model, tokenizer = load_policy(cfg.model)
    if model.score is None:
        raise DataError(f"model={cfg.model}: no score head, so this is not a reward model (train one with "
                        "`lmforge reward`)")
    model.eval()
    if not cfg.data:
        score = score_texts(model, tokenizer, cfg.prompt, [cfg.response])[0]
        return {"rows": [{"prompt": cfg.prompt, "response": cfg.response, "score": score}]}
    records, rows, skipped = [], [], 0
    for row, where in _rows(cfg.data):
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
            rows += [p + c, p + r]
        elif "prompt" in row and ("completion" in row or "response" in row):
            p, c = tokenize_prompt_completion(tokenizer, row["prompt"], row.get("completion", row.get("response")))
            records.append({"where": where, "kind": "single"})
            rows.append(p + c)
        else:
            raise DataError(f"{where}: a row to score needs 'chosen'/'rejected', or 'prompt' and 'completion' "
                            f"(fields: {', '.join(row)})")
    scores = iter(score_token_rows(model, rows, tokenizer.pad_id, cfg.batch_size))
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
    from rich.console import Console
    from rich.table import Table

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
    from rich.console import Console
    from rich.table import Table

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
    from lmforge.config import parse_cli

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
