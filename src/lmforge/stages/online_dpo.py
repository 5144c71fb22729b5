"""``lmforge online-dpo``: online / iterative DPO. Each round samples answers from the current policy, labels them
with a verifier or a reward model, and runs DPO on the pairs that makes; ``rounds`` times.

    round k:  prompts_per_round prompts --num_generations samples each, current policy--> completions
              --rewards (math / format / length / model, weighted: rewards.py)--> scores
              --best vs worst answer of each prompt--> pairs --reference log-probs--> DPO (the one loop)
              --greedy answers to held-out prompts--> eval/accuracy

A prompt whose samples all score the same gives no pair; such prompts are counted (no_pair_prompts: with a
verifier, the prompts the policy always or never solves). ``max_pairs_per_prompt`` > 1 also pairs the 2nd best
with the 2nd worst, and so on, while the chosen answer still scores strictly higher (identical samples count
once). The reference is the round's starting policy (``reference: round``: iterative DPO, Xu et al. 2023 "Some
things are more CRINGE than others", Yuan et al. 2024 "Self-rewarding language models") or the model round 1
started from (``reference: initial``) or their TR-DPO mix (``reference: ema``: round k's reference is
ref_model_mixup_alpha x round k's starting policy + (1 - alpha) x round k-1's reference, round 1's the start
model, each kept in round_k/reference/; alpha 1 is ``round``); its log-probs are precomputed, so only the policy
is in memory while training. The loss is any of `lmforge dpo`'s (loss_type, beta, rpo_alpha, label_smoothing), computed on exactly
the token ids that were sampled.

    out_dir/round_k/pairs.jsonl   the round's pairs in TRL's format, with score_chosen / score_rejected
                                  (`lmforge dpo data.source=...` trains on them as they are)
    out_dir/round_k/rollout.json  the same pairs as token ids + the sampling stats: the round's resumable state
    out_dir/round_k/model/        the policy after round k; round_k/metrics.jsonl its optimizer steps
    out_dir/round_k/round.json    the round's numbers (round_0: the starting model's); written last, it marks
                                  the round finished
    out_dir/metrics.jsonl         one row per round (step = optimizer steps so far)
    out_dir/model/, summary.json  the last round's policy and every round's numbers

A killed run restarts in the round it was in, from that round's pairs and last checkpoint; finished rounds are
never redone, rerunning a finished run does nothing, and a larger ``rounds`` continues a finished run. When the
config (anything but ``rounds``) or the starting model changed, or with train.resume=false, it starts over.

    lmforge online-dpo model=runs/tiny/sft/model rounds=3 rewards='[{kind: math}]'
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from lmforge.atomic import write_atomic
from lmforge.config import parse_cli, to_dict
from lmforge.data.preference import Batches, TokenPair, collate_pairs, pair_length
from lmforge.evaluation import rate
from lmforge.generation import SamplingParams
from lmforge.modelio import load_model_and_tokenizer, save_model_dir, write_model_files
from lmforge.rewards import RewardSpec, build_reward
from lmforge.rollout import (
    RLDataConfig,
    check_answers,
    hash_seed,
    load_rl_data,
    make_eval_fn,
    prompt_indices,
    sample_and_score,
    sample_as_trained,
)
from lmforge.scoring import evaluate_pairs, precompute_reference, store_pair_logps
from lmforge.train.loop import TrainConfig, autocast_context, train
from lmforge.train.metrics import MetricsLogger
from lmforge.train.preference import REFERENCE_FREE, check_loss_options, dpo_loss_fn
from lmforge.train.reference import mix_into
from lmforge.train.runs import finish_run, log, start_run

ROUND_FILE, ROLLOUT_FILE, PAIRS_FILE = "round.json", "rollout.json", "pairs.jsonl"


@dataclass
class OnlineDPOConfig:
    model: str = "runs/tiny/sft/model"  # the policy round 1 starts from
    out_dir: str = "runs/tiny/online_dpo"
    data: RLDataConfig = field(default_factory=RLDataConfig)  # prompts (+ gold answers), held-out eval prompts
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec(kind="math")])  # as grpo's
    rounds: int = 3
    prompts_per_round: int = 64  # a seeded walk through the prompts: each round sees new ones
    num_generations: int = 8  # samples per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0
    max_pairs_per_prompt: int = 1  # 1: best vs worst; k: also 2nd best vs 2nd worst, ... (strictly better only)
    reference: Literal["round", "initial", "ema"] = "round"  # round: the round's starting policy; initial: `model`;
    #                                                          ema: the TR-DPO mix of the two below
    ref_model_mixup_alpha: float = 0.6  # reference=ema: ref_k = alpha * policy_k + (1 - alpha) * ref_{k-1}
    loss_type: str = "sigmoid"  # any of `lmforge dpo`'s
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    rpo_alpha: float = 0.0  # + alpha * NLL of the chosen answer (RPO): keeps chosen log-probs from sinking
    epochs: float = 0.0  # > 0: each round trains this many passes over its pairs (replaces train.max_steps)
    generation_batch_size: int = 64  # prompts per generate call
    logprob_chunk_size: int = 1024
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-5, schedule="constant", warmup_steps=0,
                                                                   max_steps=20, batch_size=16, micro_batch_size=8,
                                                                   weight_decay=0.0, eval_every=0, save_every=0,
                                                                   log_every=1))  # per round

    def validate(self) -> None:
        checks = [(self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}"),
                  (self.prompts_per_round >= 1, f"prompts_per_round must be >= 1, got {self.prompts_per_round}"),
                  (self.num_generations >= 2, "num_generations must be >= 2 (a pair needs two samples)"),
                  (self.max_new_tokens >= 1 and self.temperature > 0, "max_new_tokens must be >= 1, temperature > 0"),
                  (self.max_pairs_per_prompt >= 1, "max_pairs_per_prompt must be >= 1"),
                  (self.reference in ("round", "initial", "ema"), f"reference must be round, initial or ema, "
                                                                  f"got {self.reference!r}"),
                  (0 < self.ref_model_mixup_alpha <= 1, "ref_model_mixup_alpha must be in (0, 1]"),
                  (self.epochs >= 0 and self.generation_batch_size >= 1,
                   "epochs must be >= 0 and generation_batch_size >= 1")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        check_loss_options(self)


# ---------------------------------------------------------------------------------------------------- pairs

def select_pairs(rewards: list[list[float]], completions: list[list[list[int]]],
                 max_pairs: int = 1) -> list[tuple[int, int, int]]:
    """(prompt, chosen sample, rejected sample) index triples: per prompt the best sample against the worst, then
    the 2nd best against the 2nd worst, ... up to ``max_pairs``, while chosen scores strictly higher. Identical
    completions count once; ties keep sample order (samples are random, so that is a random pick)."""
    out = []
    for p, (scores, samples) in enumerate(zip(rewards, completions)):
        first: dict[tuple, int] = {}
        for j, ids in enumerate(samples):
            first.setdefault(tuple(ids), j)
        order = sorted(first.values(), key=lambda j: -scores[j])
        for i in range(min(max_pairs, len(order) // 2)):
            chosen, rejected = order[i], order[-1 - i]
            if not scores[chosen] > scores[rejected]:
                break
            out.append((p, chosen, rejected))
    return out


def pair_row(prompt, system_prompt: str, chosen: str, rejected: str, score_chosen: float,
             score_rejected: float) -> dict:
    """A TRL preference row: standard (strings) for a string prompt, conversational otherwise."""
    if system_prompt:
        prompt = [{"role": "system", "content": system_prompt}] + (
            [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt))
    if isinstance(prompt, str):
        answers = chosen, rejected
    else:
        answers = [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]
    return {"prompt": prompt, "chosen": answers[0], "rejected": answers[1],
            "score_chosen": score_chosen, "score_rejected": score_rejected}


def sample_round(cfg: OnlineDPOConfig, k: int, policy, tokenizer, rows, prompt_ids, reward):
    """Round k's samples: (Samples of all prompts, a prompt's num_generations contiguous), with a progress bar."""
    idx = prompt_indices(len(rows), k - 1, cfg.prompts_per_round, cfg.train.seed)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, n=cfg.num_generations,
                            seed=hash_seed(cfg.train.seed, "online_dpo", k))
    merged = None
    with Progress(transient=True) as bar:
        task = bar.add_task(f"round {k}: sampling {cfg.num_generations} answers per prompt", total=len(idx))
        for s in range(0, len(idx), cfg.generation_batch_size):
            chunk = idx[s:s + cfg.generation_batch_size]
            samples = sample_and_score(policy, tokenizer, [rows[i] for i in chunk], [prompt_ids[i] for i in chunk],
                                       params, reward)
            merged = samples if merged is None else merge_samples(merged, samples)
            bar.advance(task, len(chunk))
    return merged


def merge_samples(a, b):
    for name in ("rows", "prompt_ids", "completion_ids", "texts", "finish_reasons"):
        getattr(a, name).extend(getattr(b, name))
    a.rewards = torch.cat([a.rewards, b.rewards])
    a.parts = {k: torch.cat([v, b.parts[k]]) for k, v in a.parts.items()}
    return a


def make_pairs(cfg: OnlineDPOConfig, samples) -> tuple[list[dict], list[list], dict]:
    """(TRL rows for pairs.jsonl, [prompt_ids, chosen_ids, rejected_ids, margin] per pair, round stats)."""
    G = cfg.num_generations
    n_prompts = len(samples.completion_ids) // G
    scores = samples.rewards.reshape(n_prompts, G).tolist()
    groups = [samples.completion_ids[p * G:(p + 1) * G] for p in range(n_prompts)]
    triples = select_pairs(scores, groups, cfg.max_pairs_per_prompt)
    rows, tokens = [], []
    for p, c, r in triples:
        i, j = p * G + c, p * G + r
        rows.append(pair_row(samples.rows[i]["prompt"], cfg.data.system_prompt, samples.texts[i], samples.texts[j],
                             scores[p][c], scores[p][r]))
        tokens.append([samples.prompt_ids[i], samples.completion_ids[i], samples.completion_ids[j],
                       scores[p][c] - scores[p][r]])
    stats = {**samples.stats(G), "prompts": n_prompts, "pairs": len(triples),
             "no_pair_prompts": n_prompts - len({p for p, _, _ in triples})}
    return rows, tokens, stats


def write_round_pairs(round_dir: Path, rows: list[dict], tokens: list[list], stats: dict) -> None:
    """pairs.jsonl, then rollout.json (atomically, last: its presence means the round's pairs are complete)."""
    round_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(round_dir / PAIRS_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_atomic(round_dir / ROLLOUT_FILE, json.dumps({"stats": stats, "pairs": tokens}) + "\n")


def read_round_pairs(round_dir: Path) -> tuple[list, dict] | None:
    """(TokenPairs, stats) of a round whose pairs were made, else None."""
    path = round_dir / ROLLOUT_FILE
    if not path.exists():
        return None
    state = json.loads(path.read_text())
    return [TokenPair(p, c, r, margin) for p, c, r, margin in state["pairs"]], state["stats"]


# ---------------------------------------------------------------------------------------------------- a round

def train_round(cfg: OnlineDPOConfig, k: int, policy, tokenizer, pairs: list, eval_fn, dist, round_dir: Path):
    """Precompute the reference log-probs, then DPO on the round's pairs through the one loop (resuming from
    round_dir/checkpoints); returns (TrainResult, the reference's directory or None)."""
    micro = cfg.train.micro_batch_size

    def collate(items):
        return collate_pairs(items, tokenizer.pad_id)

    ref_dir = None
    if cfg.loss_type not in REFERENCE_FREE:
        ref, ref_dir = round_reference(cfg, k, policy, dist)
        precompute_reference(ref, pairs, collate, store_pair_logps, pair_length, micro * 2, dist.device,
                             cfg.logprob_chunk_size, autocast_context(cfg.train, dist.device),
                             f"round {k}: reference log-probs")
        del ref
    steps = max(1, math.ceil(cfg.epochs * len(pairs) / cfg.train.batch_size)) if cfg.epochs > 0 \
        else cfg.train.max_steps
    tcfg = replace(cfg.train, max_steps=steps, warmup_steps=min(cfg.train.warmup_steps, steps),
                   seed=cfg.train.seed + k, **round_tracking(cfg, k))
    loss_fn = dpo_loss_fn(cfg)  # the loss options are `lmforge dpo`'s
    batches = Batches(pairs, micro, collate, tcfg.seed, dist.rank, dist.world_size, length=pair_length)

    def round_eval(model) -> dict:  # DPO's metrics on the round's own pairs, then held-out accuracy
        on_pairs = evaluate_pairs(model, loss_fn, pairs, collate, micro, dist.device, cfg.train.eval_batches)
        return {**on_pairs, **eval_fn(model)}

    result = train(policy, loss_fn, batches, tcfg, round_dir, save_model=lambda p: write_model_files(p, policy,
                                                                                                    tokenizer),
                   eval_fn=round_eval, dist=dist, run_config=cfg, description=f"online dpo round {k}/{cfg.rounds}",
                   tokens_per_batch_fn=lambda b: int(b["attention_mask"].sum()))
    return result, ref_dir


def round_reference(cfg: OnlineDPOConfig, k: int, policy, dist) -> tuple[torch.nn.Module, str]:
    """Round k's reference model and the directory it is (or is saved to). Called before train() loads a
    checkpoint, so ``policy`` is the round's starting policy. reference=ema mixes it into the previous reference
    (the newest round_j/reference/, else the start model) and saves the mix into round_k/reference/ first, so a
    killed round reruns with the same one."""
    if cfg.reference == "round":
        return policy, start_dir(cfg, k)
    if cfg.reference == "initial":
        return load_model_and_tokenizer(cfg.model, dist.device)[0], cfg.model
    mine = Path(cfg.out_dir) / f"round_{k}" / "reference"
    if (mine / "model.safetensors").exists():
        return load_model_and_tokenizer(str(mine), dist.device)[0], str(mine)
    previous = next((d for j in range(k - 1, 0, -1)
                     if ((d := Path(cfg.out_dir) / f"round_{j}" / "reference") / "model.safetensors").exists()),
                    cfg.model)
    ref, tokenizer = load_model_and_tokenizer(str(previous), dist.device)
    mix_into(ref, policy, cfg.ref_model_mixup_alpha)
    if dist.is_main:
        save_model_dir(mine, ref, tokenizer)
    return ref, str(mine)


def start_dir(cfg: OnlineDPOConfig, k: int) -> str:
    """The model directory round k starts from."""
    return cfg.model if k == 1 else str(Path(cfg.out_dir) / f"round_{k - 1}" / "model")


def accuracy_eval(policy, tokenizer, eval_rows, eval_ids, reward, max_new_tokens: int):
    """grpo's greedy held-out evaluation (eval/accuracy, eval/reward, eval/mean_length) + a bootstrap CI."""
    base = make_eval_fn(policy, tokenizer, eval_rows, eval_ids, reward, max_new_tokens)

    def eval_fn(_model=None) -> dict:
        out = base()
        if "eval/accuracy" in out:
            n = len(eval_rows)
            right = round(out["eval/accuracy"] * n)
            low, high = rate([1.0] * right + [0.0] * (n - right))["ci"]
            out.update({"eval/accuracy_low": low, "eval/accuracy_high": high})
        return out
    return eval_fn


# ---------------------------------------------------------------------------------------------------- state

def fingerprint(cfg: OnlineDPOConfig) -> str:
    """What the finished rounds depend on: the config but `rounds` (and run-time knobs), and the start model."""
    d = to_dict(cfg)
    d.pop("rounds")
    for key in ("resume", "device", "num_threads", "compile"):
        d["train"].pop(key)
    weights = Path(cfg.model) / "model.safetensors"
    stamp = f"{weights.stat().st_size}-{weights.stat().st_mtime_ns}" if weights.exists() else ""
    return hashlib.sha256((json.dumps(d, sort_keys=True, default=str) + stamp).encode()).hexdigest()[:16]


def finished_rounds(out_dir: Path, digest: str) -> list[dict] | None:
    """round.json of rounds 0, 1, ... finished with this fingerprint, in order; None when a finished round was
    made under another one (the run must start over)."""
    done = []
    while (path := out_dir / f"round_{len(done)}" / ROUND_FILE).exists():
        row = json.loads(path.read_text())
        if row.get("fingerprint") != digest:
            return None
        if len(done) and not (out_dir / f"round_{len(done)}" / "model").exists():
            break
        done.append(row)
    return done


def start_over(out_dir: Path) -> None:
    for path in sorted(out_dir.glob("round_*")) + [out_dir / n for n in ("model", "tb")]:
        shutil.rmtree(path, ignore_errors=True)
    for name in ("metrics.jsonl", "summary.json"):
        (out_dir / name).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------- the stage

def run_online_dpo(cfg: OnlineDPOConfig) -> dict:
    """Run (or resume, or extend) the rounds; returns the summary with every round's numbers."""
    run = start_run(cfg)  # config.yaml (a start-over keeps it), the seed
    dist, out_dir, t0 = run.dist, run.out_dir, run.t0
    digest = fingerprint(cfg)
    done = finished_rounds(out_dir, digest) if cfg.train.resume else None
    if done is None and any(out_dir.glob("round_*")):
        log(f"online-dpo: {'train.resume=false' if not cfg.train.resume else 'the config or the start model changed'}"
            f": starting over in {out_dir}")
        if dist.is_main:
            start_over(out_dir)
    done = done or []
    if len(done) > cfg.rounds and (out_dir / "model").exists():
        log(f"online-dpo: all {cfg.rounds} rounds are finished in {out_dir}: nothing to do")
        return online_summary(cfg, out_dir, done) if dist.is_main else {}

    last = max(len(done) - 1, 0)
    policy, tokenizer = load_model_and_tokenizer(start_dir(cfg, last + 1), dist.device)
    sample_as_trained(policy, cfg.train, dist.device)
    rows, prompt_ids, eval_rows, eval_ids = load_rl_data(cfg.data, tokenizer)
    check_answers(rows + eval_rows, cfg.rewards)
    reward = build_reward(cfg.rewards, pad_id=tokenizer.pad_id, device=dist.device)
    eval_fn = accuracy_eval(policy, tokenizer, eval_rows, eval_ids, reward, cfg.max_new_tokens) if eval_rows \
        else (lambda _model=None: {})
    metrics = MetricsLogger(out_dir, enabled=dist.is_main, start_step=done[-1]["step"] + 1 if done else 0,
                            tensorboard=False, report_to=cfg.train.report_to,  # the rounds' own runs have TB
                            run_name=cfg.train.run_name, project=cfg.train.tracking_project,
                            group=cfg.train.tracking_group, config=asdict(cfg))
    if not done:  # round 0: where the curve starts
        row = {"round": 0, "step": 0, **eval_fn(), "seconds": round(time.time() - t0, 1), "fingerprint": digest}
        finish_round(out_dir / "round_0", row, metrics, dist)
        done.append(row)
    for k in range(len(done), cfg.rounds + 1):
        row = run_round(cfg, k, policy, tokenizer, rows, prompt_ids, reward, eval_fn, dist, done[-1]["step"])
        row["fingerprint"] = digest
        finish_round(out_dir / f"round_{k}", row, metrics, dist)
        done.append(row)
    metrics.close()
    return finish_run(run, online_summary(cfg, out_dir, done) if dist.is_main else {}, policy, tokenizer)


def run_round(cfg: OnlineDPOConfig, k: int, policy, tokenizer, rows, prompt_ids, reward, eval_fn, dist,
              steps_before: int) -> dict:
    """Round k: pairs from the current policy (or the ones a killed run already made), DPO, evaluation."""
    t0 = time.time()
    round_dir = Path(cfg.out_dir) / f"round_{k}"
    made = read_round_pairs(round_dir)
    if made is None:
        samples = sample_round(cfg, k, policy, tokenizer, rows, prompt_ids, reward)
        pair_rows, tokens, stats = make_pairs(cfg, samples)
        if dist.is_main:
            write_round_pairs(round_dir, pair_rows, tokens, stats)
        made = read_round_pairs(round_dir) if dist.is_main else None
        if made is None:  # another rank: the same seeded samples give the same pairs

            made = [TokenPair(p, c, r, m) for p, c, r, m in tokens], stats
    pairs, stats = made
    log(f"round {k}/{cfg.rounds}: {stats['pairs']} pairs from {stats['prompts']} prompts "
        f"({stats['no_pair_prompts']} with all samples scored alike), mean reward {stats['reward']:.3f}")
    row = {"round": k, **{key: stats[key] for key in ("pairs", "no_pair_prompts", "prompts")},
           "reward": stats["reward"], "reward_std": stats["reward_std"],
           "completions/mean_length": stats["completions/mean_length"],
           **{key: v for key, v in stats.items() if key.startswith("rewards/")}}
    if len(pairs) < cfg.train.micro_batch_size * dist.world_size:
        log(f"WARNING round {k}: {len(pairs)} pairs are fewer than one micro-batch "
            f"({cfg.train.micro_batch_size} x {dist.world_size}): the policy is not trained this round. Raise "
            "prompts_per_round, num_generations or temperature")
        if dist.is_main:
            save_model_dir(round_dir / "model", policy, tokenizer)
        return {**row, "step": steps_before, "steps": 0, "trained": False, **eval_fn(),
                "seconds": round(time.time() - t0, 1)}
    result, ref_dir = train_round(cfg, k, policy, tokenizer, pairs, eval_fn, dist, round_dir)
    if dist.is_main:
        save_model_dir(round_dir / "model", policy, tokenizer)
    ev = result.eval_metrics
    on_pairs = {key.removeprefix("eval_"): v for key, v in ev.items() if key.startswith("eval_")}
    return {**row, "step": steps_before + result.step, "steps": result.step, "trained": True,
            "reference": ref_dir, "loss": result.metrics.get("loss"), **on_pairs,
            **{key: v for key, v in ev.items() if key.startswith("eval/")}, "seconds": round(time.time() - t0, 1)}


def round_tracking(cfg: OnlineDPOConfig, k: int) -> dict:
    """A round's tracker run: named "<stage run>/round_k" in the group of the stage's run (e.g. "tiny"), so the
    rounds sit with the stage's own run (its round-by-round rows) and the pipeline's other stages."""
    out = Path(cfg.out_dir).resolve()
    name = cfg.train.run_name or f"{out.parent.name}/{out.name}"
    return {"run_name": f"{name}/round_{k}", "tracking_group": cfg.train.tracking_group or out.parent.name}


def finish_round(round_dir: Path, row: dict, metrics, dist) -> None:
    """Log the round, then write round.json (which marks it finished) and drop its now-redundant checkpoints."""
    if not dist.is_main:
        return
    metrics.log(row["step"], {key: v for key, v in row.items() if key not in ("fingerprint", "reference")
                              and not isinstance(v, bool)})
    round_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(round_dir / ROUND_FILE, json.dumps(row, indent=2) + "\n")
    shutil.rmtree(round_dir / "checkpoints", ignore_errors=True)


def online_summary(cfg: OnlineDPOConfig, out_dir: Path, done: list[dict]) -> dict:
    """What summary.json holds: every round's row, and the first/last keys the pipeline report reads."""
    rounds = [{k: v for k, v in r.items() if k != "fingerprint"} for r in done]
    summary = {"loss_type": cfg.loss_type, "beta": cfg.beta, "reference": cfg.reference, "rounds": rounds,
               "steps": rounds[-1]["step"], "seconds": round(sum(r.get("seconds", 0.0) for r in rounds), 1),
               "model_dir": str(out_dir / "model")}
    for key in ("eval/accuracy", "eval/reward", "eval/mean_length", "reward"):
        values = [r[key] for r in rounds if r.get(key) is not None]
        if values:
            summary[f"{key} first"], summary[f"{key} last"] = values[0], values[-1]
    return summary


def print_summary(summary: dict) -> None:
    def fmt(v, spec):
        return "" if v is None else spec.format(v)

    table = Table(title=f"online dpo ({summary['loss_type']}, beta {summary['beta']:g}, "
                        f"reference {summary['reference']})")
    for col in ("round", "pairs", "tied", "reward", "pref.", "margin", "acc.", "95% CI", "time"):
        table.add_column(col, justify="right")
    for r in summary["rounds"]:
        ci = f"{r['eval/accuracy_low']:.2f}-{r['eval/accuracy_high']:.2f}" if "eval/accuracy_low" in r else ""
        table.add_row(str(r["round"]), fmt(r.get("pairs"), "{}"), fmt(r.get("no_pair_prompts"), "{}"),
                      fmt(r.get("reward"), "{:.3f}"), fmt(r.get("rewards/accuracies"), "{:.3f}"),
                      fmt(r.get("rewards/margins"), "{:.3f}"), fmt(r.get("eval/accuracy"), "{:.3f}"), ci,
                      fmt(r.get("seconds"), "{:.0f} s"))
    console = Console()
    console.print(table)
    console.print("tied: prompts whose samples all scored alike (no pair); reward: mean over the round's samples; "
                  "pref. / margin: rewards/accuracies and rewards/margins on the round's pairs after training; "
                  "acc.: greedy, held out")
    console.print(f"{summary['steps']} steps in {summary['seconds']} s -> {summary['model_dir']}")


def main(argv: list[str]) -> int:
    cfg = parse_cli(argv, OnlineDPOConfig, prog="lmforge online-dpo", description=__doc__, default_recipe="tiny",
                    section="online_dpo")
    summary = run_online_dpo(cfg)
    if summary:  # {} on the other ranks under torchrun
        print_summary(summary)
    return 0
