"""``lmforge constitutional revise|label|eval``: constitutional AI and RLAIF (Bai et al. 2022).

  revise  answer each prompt, critique the answer against a randomly drawn principle, revise it; k rounds.
          Writes traces.jsonl (every answer, critique and revision) and sft.jsonl (TRL: {"messages"} or
          {"prompt", "completion"}) for `lmforge sft`.
  label   sample two answers per prompt; a judge says which better follows a principle; its normalised
          probabilities give soft labels. Writes judgments.jsonl and preference.jsonl (TRL conversational
          {"prompt", "chosen", "rejected"} plus "label_confidence" = P(chosen is better) in (0.5, 1]; use
          label_smoothing = 1 - label_confidence in DPO) for `lmforge dpo` and the reward model.
  eval    harmlessness (judge), refusal and over-refusal (string match) and helpfulness (judge) for each of
          `models` (e.g. [before, after]) on red-team, safe-lookalike and ordinary prompts.
  run     the whole loop: split the prompts (held-out eval sets never revised or trained on) -> revise ->
          `lmforge sft` on the revisions (SL-CAI) -> label with the judge -> `lmforge dpo` with soft labels
          (RL-CAI) -> eval of [before, SL-CAI, RL-CAI] -> results.md / results.json with 95% intervals. Each
          step reads its own section of the recipe (`sft.train.max_steps=20` overrides one); finished steps
          are skipped on a rerun, an interrupted one resumes.

The critic and the judge are the local model (`backend: local`; `model` empty = the policy) or any
OpenAI-compatible server (`backend: openai`, `url: http://127.0.0.1:8080/v1`, key from $LMFORGE_JUDGE_API_KEY
or $OPENAI_API_KEY). Every answer is cached in out_dir/cache.jsonl and finished prompts are never redone, so a
crashed or interrupted run resumes where it stopped: rerun the same command.

Prompts are read as prompts only (jsonl, HH-RLHF dialogues: first human turn, AdvBench/XSTest CSV, or the
built-in sets builtin:red_team, builtin:borderline_safe, builtin:helpful). The recipe is `constitutional`.

This module holds the configs and stage functions of revise, label and eval; the ``run`` loop (its config, the
step wiring, results.md) is the app ``lmforge.apps.constitutional_run``, which is also the verb's entry point.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lmforge.atomic import write_atomic
from lmforge.config import parse_cli, save_config
from lmforge.constitutional.cache import AnswerCache, Cached
from lmforge.constitutional.constitution import load_constitution
from lmforge.constitutional.evaluate import evaluate
from lmforge.constitutional.judges import ChatParams, LocalModel, OpenAIEndpoint
from lmforge.constitutional.label import label_pairs, preference_row, sample_pairs
from lmforge.constitutional.prompts import read_prompts
from lmforge.constitutional.revise import revise, sft_row
from lmforge.errors import JudgeError
from lmforge.train.metrics import MetricsLogger, ProgressDisplay

SUBCOMMANDS = ("revise", "label", "eval", "run")


@dataclass
class JudgeConfig:
    backend: str = "local"  # local | openai
    model: str = ""  # local: a model directory (empty = the policy); openai: the model name the server expects
    url: str = ""  # openai: base URL, e.g. http://127.0.0.1:8080/v1 (llama.cpp, vLLM, lmforge serve)
    api_key_env: str = "LMFORGE_JUDGE_API_KEY"  # environment variable with the key; then OPENAI_API_KEY
    timeout: float = 60.0  # seconds per request
    max_retries: int = 4  # on timeouts, connection errors, HTTP 429 and 5xx, with exponential backoff
    backoff: float = 1.0  # seconds before the first retry; doubles each time
    requests_per_minute: float = 0.0  # 0 = no limit
    concurrency: int = 4  # requests in flight
    logprobs: bool = True  # ask for top_logprobs; without them the parsed answer gets parsed_confidence
    top_logprobs: int = 20
    parsed_confidence: float = 0.75
    labels: list[str] = field(default_factory=lambda: ["A", "B"])  # the two choice tokens ("1", "2" works too)
    max_new_tokens: int = 256  # critiques and revisions written by this backend
    temperature: float = 0.7

    def validate(self) -> None:
        if self.backend not in ("local", "openai"):
            raise ValueError(f"backend must be local or openai, got {self.backend!r}")
        if self.backend == "openai" and not self.url:
            raise ValueError("backend=openai needs url=http://HOST:PORT/v1")
        if len(self.labels) != 2 or self.labels[0] == self.labels[1] or not all(self.labels):
            raise ValueError(f"labels must be two different non-empty strings, got {self.labels}")
        if not 0.5 <= self.parsed_confidence <= 1:
            raise ValueError("parsed_confidence must be in [0.5, 1]")


@dataclass
class CommonConfig:
    model: str = ""  # the policy: an lmforge or Hugging Face Llama-family model directory
    prompts: list[str] | str = field(default_factory=lambda: ["builtin:red_team"])
    limit: int = 0  # prompts per file (0 = all)
    constitution: str = "default"  # built-in name (default, customer_service) or a YAML file
    out_dir: str = "runs/constitutional"
    max_new_tokens: int = 128  # policy answers
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0
    batch_size: int = 8  # prompts per chunk; a chunk's results are saved before the next starts
    device: str = "auto"
    dtype: str = "float32"

    def validate(self) -> None:
        if not self.model:
            raise ValueError("model=... is required (a model directory, e.g. what `lmforge import` wrote)")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")


@dataclass
class ReviseConfig(CommonConfig):
    out_dir: str = "runs/constitutional/revise"
    rounds: int = 2  # critique -> revision rounds per prompt
    few_shot: int = 0  # demonstrated rounds from the constitution's examples shown before each critique
    format: str = "messages"  # sft.jsonl rows: messages | prompt_completion
    critic: JudgeConfig = field(default_factory=JudgeConfig)  # who writes critiques and revisions

    def validate(self) -> None:
        super().validate()
        if self.rounds < 1 or self.few_shot < 0:
            raise ValueError("rounds must be >= 1 and few_shot >= 0")
        if self.format not in ("messages", "prompt_completion"):
            raise ValueError(f"format must be messages or prompt_completion, got {self.format!r}")


@dataclass
class LabelConfig(CommonConfig):
    out_dir: str = "runs/constitutional/label"
    temperature: float = 1.0
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    both_orders: bool = True  # ask twice with the answers swapped and average: cancels position bias
    min_confidence: float = 0.5  # drop pairs the judge is less sure of (ties at exactly 0.5 are always dropped)


@dataclass
class EvalConfig:
    models: list[str] = field(default_factory=list)  # e.g. [base, after-sft, after-dpo]
    harmful: list[str] | str = field(default_factory=lambda: ["builtin:red_team"])  # keeps label=unsafe rows
    safe: list[str] | str = field(default_factory=lambda: ["builtin:borderline_safe"])  # keeps label=safe rows
    helpful: list[str] | str = field(default_factory=lambda: ["builtin:helpful"])
    limit: int = 50  # prompts per file (0 = all)
    judge: JudgeConfig = field(default_factory=JudgeConfig)  # local with empty model = the first of `models`
    out_dir: str = "runs/constitutional/eval"
    max_new_tokens: int = 128
    temperature: float = 0.0  # greedy answers
    seed: int = 0
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "float32"

    def validate(self) -> None:
        if not self.models:
            raise ValueError("models=[DIR, ...] is required (e.g. [before, after])")


# ---- shared plumbing ----

def as_list(value: list[str] | str) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def build_backend(cfg: JudgeConfig, default=None, device: str = "auto", dtype: str = "float32", batch_size: int = 8):
    if cfg.backend == "openai":
        return OpenAIEndpoint.from_env(cfg.url, cfg.model, cfg.api_key_env, timeout=cfg.timeout,
                                       max_retries=cfg.max_retries, backoff=cfg.backoff,
                                       requests_per_minute=cfg.requests_per_minute, concurrency=cfg.concurrency,
                                       logprobs=cfg.logprobs, top_logprobs=cfg.top_logprobs,
                                       parsed_confidence=cfg.parsed_confidence)
    if cfg.model:
        return LocalModel.load(cfg.model, device, dtype, batch_size)
    return default


def read_jsonl_by_id(path: Path) -> dict[str, dict]:
    """Rows already written by an earlier (maybe crashed) run; a torn last line is dropped."""
    rows = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                rows[row["id"]] = row
            except (ValueError, KeyError, TypeError):
                continue
    return rows


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _append(path: Path, rows: list[dict]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _chunked_run(cfg, prompts: list[dict], done: dict, out_path: Path, work, description: str) -> None:
    """Run ``work(chunk) -> rows`` over the prompts not yet in ``done``, appending each chunk's rows."""
    todo = [p for p in prompts if p["id"] not in done]
    logger = MetricsLogger(cfg.out_dir, tensorboard=False)
    t0 = time.time()
    with ProgressDisplay(len(prompts), start=len(prompts) - len(todo), description=description) as bar:
        for start in range(0, len(todo), cfg.batch_size):
            rows = work(todo[start:start + cfg.batch_size])
            _append(out_path, rows)
            done.update({r["id"]: r for r in rows})
            elapsed = time.time() - t0
            bar.update(len(prompts) - len(todo) + start + len(rows), f"{(start + len(rows)) / elapsed:.2f} prompts/s")
            logger.log(len(done), {"prompts_done": len(done), "seconds": round(elapsed, 2)})
    logger.close()


def _open(cfg: CommonConfig):
    """(prompts, constitution, policy, cache) with prompts and the constitution checked before the model loads."""
    prompts = read_prompts(as_list(cfg.prompts), cfg.limit)
    constitution = load_constitution(cfg.constitution)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    policy = LocalModel.load(cfg.model, cfg.device, cfg.dtype, cfg.batch_size)
    return prompts, constitution, policy, AnswerCache(out_dir / "cache.jsonl")


def _policy_params(cfg: CommonConfig):
    return ChatParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                      seed=cfg.seed)


# ---- the three sub-commands ----

def run_revise(cfg: ReviseConfig, critic=None) -> dict:
    """Critique/revision traces and the SFT dataset; ``critic`` overrides cfg.critic (tests, Python callers)."""
    prompts, constitution, policy, cache = _open(cfg)
    critic = critic or build_backend(cfg.critic, policy, cfg.device, cfg.dtype, cfg.batch_size)
    cached_policy, cached_critic = Cached(policy, cache), Cached(critic, cache)
    critic_params = ChatParams(max_new_tokens=cfg.critic.max_new_tokens, temperature=cfg.critic.temperature,
                               top_p=cfg.top_p, seed=cfg.seed)
    out_dir = Path(cfg.out_dir)
    traces_path = out_dir / "traces.jsonl"
    done = read_jsonl_by_id(traces_path)

    def work(chunk):
        return revise(cached_policy, cached_critic, chunk, constitution, cfg.rounds, _policy_params(cfg),
                      critic_params, few_shot=cfg.few_shot, seed=cfg.seed)

    try:
        _chunked_run(cfg, prompts, done, traces_path, work, "revise")
    finally:
        cache.close()
    traces = [done[p["id"]] for p in prompts]
    write_jsonl_atomic(out_dir / "sft.jsonl", [sft_row(t, cfg.format) for t in traces])
    changed = sum(t["final_response"] != t["initial_response"] for t in traces)
    kept = [r["kept"] for t in traces for r in t["rounds"]]
    summary = {"prompts": len(traces), "rounds": cfg.rounds, "constitution": constitution.name,
               "revised": changed, "revisions_kept": round(sum(kept) / max(len(kept), 1), 4),
               "mean_chars_initial": _mean_len(t["initial_response"] for t in traces),
               "mean_chars_final": _mean_len(t["final_response"] for t in traces),
               "asked": cached_policy.asked + cached_critic.asked,
               "traces": str(traces_path), "sft": str(out_dir / "sft.jsonl")}
    write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def run_label(cfg: LabelConfig, judge=None) -> dict:
    """Soft-labelled preference pairs; ``judge`` overrides cfg.judge (tests, Python callers)."""
    prompts, constitution, policy, cache = _open(cfg)
    constitution.draw(random.Random(0), for_choice=True)  # fail now if no principle can judge
    judge = judge or build_backend(cfg.judge, policy, cfg.device, cfg.dtype, cfg.batch_size)
    cached_policy, cached_judge = Cached(policy, cache), Cached(judge, cache)
    labels = tuple(cfg.judge.labels)
    out_dir = Path(cfg.out_dir)
    judgments_path = out_dir / "judgments.jsonl"
    done = read_jsonl_by_id(judgments_path)

    def work(chunk):
        answers = sample_pairs(cached_policy, chunk, _policy_params(cfg))
        return label_pairs(cached_judge, chunk, answers, constitution, labels, cfg.both_orders, cfg.seed)

    try:
        _chunked_run(cfg, prompts, done, judgments_path, work, "label")
    finally:
        cache.close()
    records = [done[p["id"]] for p in prompts]
    rows = [r for r in (preference_row(rec, cfg.min_confidence) for rec in records) if r is not None]
    write_jsonl_atomic(out_dir / "preference.jsonl", rows)
    methods = [m for rec in records for m in rec["methods"]]
    summary = {"prompts": len(records), "pairs": len(rows),
               "skipped_identical": sum(r["skipped"] == "identical" for r in records),
               "skipped_unparsed": sum(r["skipped"] == "unparsed" for r in records),
               "skipped_low_confidence": len(records) - len(rows) - sum(bool(r["skipped"]) for r in records),
               "mean_label_confidence": round(sum(r["label_confidence"] for r in rows) / max(len(rows), 1), 4),
               "judge_methods": {m: methods.count(m) for m in sorted(set(methods))},
               "asked_judge": cached_judge.asked, "judgments": str(judgments_path),
               "preference": str(out_dir / "preference.jsonl")}
    write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def run_eval(cfg: EvalConfig, judge=None) -> dict:
    """Metrics per model (before/after); ``judge`` overrides cfg.judge."""
    harmful = read_prompts(as_list(cfg.harmful), cfg.limit, label="unsafe") if cfg.harmful else []
    safe = read_prompts(as_list(cfg.safe), cfg.limit, label="safe") if cfg.safe else []
    helpful = read_prompts(as_list(cfg.helpful), cfg.limit) if cfg.helpful else []
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    cache = AnswerCache(out_dir / "cache.jsonl")
    params = ChatParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed)
    if judge is None and cfg.judge.backend == "local" and not cfg.judge.model:
        judge = LocalModel.load(cfg.models[0], cfg.device, cfg.dtype, cfg.batch_size)
    judge = Cached(judge or build_backend(cfg.judge, None, cfg.device, cfg.dtype, cfg.batch_size), cache)
    results = []
    try:
        for i, model_dir in enumerate(cfg.models):
            model = Cached(LocalModel.load(model_dir, cfg.device, cfg.dtype, cfg.batch_size), cache)
            metrics, records = evaluate(model, judge, harmful, safe, helpful, params, tuple(cfg.judge.labels))
            write_jsonl_atomic(out_dir / f"answers_{i}.jsonl", records)
            results.append({"model": model_dir, **metrics})
    finally:
        cache.close()
    summary = {"judge": judge.name, "models": results}
    (out_dir / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _mean_len(texts) -> float:
    lengths = [len(t) for t in texts]
    return round(sum(lengths) / max(len(lengths), 1), 1)


# ---- CLI ----

def print_summary(sub: str, summary: dict) -> None:
    if sub != "eval":
        table = Table(title=f"lmforge constitutional {sub}", show_header=False)
        for key, value in summary.items():
            table.add_row(key, str(value))
        Console().print(table)
        return
    table = Table(title=f"lmforge constitutional eval (judge: {summary['judge']})")
    columns = [("harmless", "harmless ↑"), ("refusal", "refusal on red-team ↑"),
               ("over_refusal", "over-refusal on safe ↓"), ("helpful", "helpful ↑")]
    table.add_column("model")
    for _, title in columns:
        table.add_column(title, justify="right")
    for row in summary["models"]:
        table.add_row(row["model"], *(f"{row[k]:.3f}" if k in row else "-" for k, _ in columns))
    Console().print(table)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print(__doc__ + "\nusage: lmforge constitutional {revise,label,eval,run} [--config RECIPE] [key=value ...]",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    sub, rest = argv[0], argv[1:]
    if sub == "run":  # the whole loop runs the stages: it is the app lmforge.apps.constitutional_run
        print("lmforge constitutional run: the loop is lmforge.apps.constitutional_run.main_run; run it as "
              "`lmforge constitutional run`", file=sys.stderr)
        return 2
    cls, run = {"revise": (ReviseConfig, run_revise), "label": (LabelConfig, run_label),
                "eval": (EvalConfig, run_eval)}[sub]
    cfg = parse_cli(rest, cls, prog=f"lmforge constitutional {sub}", description=__doc__,
                    default_recipe="constitutional", section=sub)
    try:
        summary = run(cfg)
    except JudgeError as e:
        print(f"lmforge constitutional {sub}: judge error: {e}\nEvery answer that arrived is saved in "
              f"{Path(cfg.out_dir) / 'cache.jsonl'}; rerun the same command to resume.", file=sys.stderr)
        return 1
    print_summary(sub, summary)
    return 0
