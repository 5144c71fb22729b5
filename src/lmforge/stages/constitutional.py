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
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SUBCOMMANDS = ("revise", "label", "eval", "run")
RUN_STEPS = ("revise", "sft", "label", "dpo", "eval")


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


@dataclass
class RunConfig:
    """``lmforge constitutional run``: the ``run`` section of the recipe; each step also reads its own section."""

    model: str = ""  # the model before: what is revised, fine-tuned, and (by default) the judge
    out_dir: str = "runs/constitutional/run"
    rl: bool = True  # false: stop after SL-CAI (no label, no DPO)
    red_team: list[str] = field(default_factory=lambda: ["builtin:red_team"])  # read as prompts only
    helpful: list[str] = field(default_factory=lambda: ["builtin:helpful"])  # ordinary requests
    safe: list[str] = field(default_factory=lambda: ["builtin:borderline_safe"])  # XSTest: its label=safe rows
    harmful_eval: list[str] = field(default_factory=list)  # empty: hold out eval_prompts of red_team
    helpful_eval: list[str] = field(default_factory=list)  # empty: hold out eval_prompts of helpful
    eval_prompts: int = 6  # per eval set: harmful, safe, helpful
    revise_prompts: int = 8  # red-team prompts revised for SFT ...
    revise_helpful: int = 4  # ... plus ordinary ones, so SL-CAI does not learn to refuse everything
    label_prompts: int = 6  # red-team prompts labelled by the judge for DPO ...
    label_helpful: int = 4  # ... plus ordinary ones
    split_seed: int = 0
    n_boot: int = 1000  # bootstrap resamples for the intervals of mean scores

    def validate(self) -> None:
        if not self.model:
            raise ValueError("model=... is required (a model directory, e.g. what `lmforge import smollm2` wrote)")
        sizes = (self.eval_prompts, self.revise_prompts, self.revise_helpful, self.label_prompts, self.label_helpful)
        if min(sizes) < 0 or self.eval_prompts < 1 or self.revise_prompts + self.revise_helpful < 1:
            raise ValueError("eval_prompts and revise_prompts + revise_helpful must be >= 1, other sizes >= 0")
        if self.rl and self.label_prompts + self.label_helpful < 1:
            raise ValueError("rl=true needs label_prompts + label_helpful >= 1")


# ---- shared plumbing ----

def _as_list(value: list[str] | str) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def build_backend(cfg: JudgeConfig, default=None, device: str = "auto", dtype: str = "float32", batch_size: int = 8):
    from lmforge.constitutional.judges import LocalModel, OpenAIEndpoint

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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def _append(path: Path, rows: list[dict]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _chunked_run(cfg, prompts: list[dict], done: dict, out_path: Path, work, description: str) -> None:
    """Run ``work(chunk) -> rows`` over the prompts not yet in ``done``, appending each chunk's rows."""
    from lmforge.train.metrics import MetricsLogger, ProgressDisplay

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
    from lmforge.config import save_config
    from lmforge.constitutional.cache import AnswerCache
    from lmforge.constitutional.constitution import load_constitution
    from lmforge.constitutional.judges import LocalModel
    from lmforge.constitutional.prompts import read_prompts

    prompts = read_prompts(_as_list(cfg.prompts), cfg.limit)
    constitution = load_constitution(cfg.constitution)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    policy = LocalModel.load(cfg.model, cfg.device, cfg.dtype, cfg.batch_size)
    return prompts, constitution, policy, AnswerCache(out_dir / "cache.jsonl")


def _policy_params(cfg: CommonConfig):
    from lmforge.constitutional.judges import ChatParams

    return ChatParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                      seed=cfg.seed)


# ---- the three sub-commands ----

def run_revise(cfg: ReviseConfig, critic=None) -> dict:
    """Critique/revision traces and the SFT dataset; ``critic`` overrides cfg.critic (tests, Python callers)."""
    from lmforge.constitutional.cache import Cached
    from lmforge.constitutional.judges import ChatParams
    from lmforge.constitutional.revise import revise, sft_row

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
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run_label(cfg: LabelConfig, judge=None) -> dict:
    """Soft-labelled preference pairs; ``judge`` overrides cfg.judge (tests, Python callers)."""
    from lmforge.constitutional.cache import Cached
    from lmforge.constitutional.label import label_pairs, preference_row, sample_pairs

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
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run_eval(cfg: EvalConfig, judge=None) -> dict:
    """Metrics per model (before/after); ``judge`` overrides cfg.judge."""
    from lmforge.config import save_config
    from lmforge.constitutional.cache import AnswerCache, Cached
    from lmforge.constitutional.evaluate import evaluate
    from lmforge.constitutional.judges import ChatParams, LocalModel
    from lmforge.constitutional.prompts import read_prompts

    harmful = read_prompts(_as_list(cfg.harmful), cfg.limit, label="unsafe") if cfg.harmful else []
    safe = read_prompts(_as_list(cfg.safe), cfg.limit, label="safe") if cfg.safe else []
    helpful = read_prompts(_as_list(cfg.helpful), cfg.limit) if cfg.helpful else []
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


# ---- the whole loop ----

def step_configs(recipe: str | None, overrides: dict[str, list[str]], model: str, rl: bool = True) -> dict:
    """{step: config} from the recipe's section for each step (defaults where it has none) + that step's overrides.
    ``model`` fills the steps' required model fields until the run wires each step to its real input."""
    from lmforge.config import load_config, read_yaml, recipe_path
    from lmforge.stages.dpo import DPOConfig
    from lmforge.stages.sft import SFTConfig

    classes = {"revise": ReviseConfig, "sft": SFTConfig, "label": LabelConfig, "dpo": DPOConfig, "eval": EvalConfig}
    sections = read_yaml(recipe_path(recipe)) if recipe else {}
    out = {}
    for step in RUN_STEPS:
        if not rl and step in ("label", "dpo"):
            continue
        has = recipe and isinstance(sections.get(step), dict)
        placeholder = {"revise": [f"model={model}"], "label": [f"model={model}"], "eval": [f"models=[{model}]"]}
        out[step] = load_config(classes[step], recipe if has else None,
                                placeholder.get(step, []) + overrides.get(step, []), section=step if has else None)
    return out


def _wire(cfg: RunConfig, steps: dict, prompts: dict[str, str]) -> dict:
    """Point every step at the run's models, prompt files and folders (whatever its section said)."""
    from dataclasses import replace

    out, base = Path(cfg.out_dir), cfg.model
    sl_cai, rl_cai = str(out / "sft" / "model"), str(out / "dpo" / "model")
    wired = {"revise": replace(steps["revise"], model=base, prompts=[prompts["revise"]], limit=0,
                               out_dir=str(out / "revise"))}
    sft = steps["sft"]
    wired["sft"] = replace(sft, model=base, tokenizer="", data=str(out / "revise" / "sft.jsonl"), eval_data="",
                           out_dir=str(out / "sft"), lora=replace(sft.lora, merge=True))  # merged: a model dir
    models = [base, sl_cai]
    if "label" in steps:
        judge = steps["label"].judge
        if judge.backend == "local" and not judge.model:
            judge = replace(judge, model=base)  # one fixed judge (the model before), not the moving policy
        wired["label"] = replace(steps["label"], model=sl_cai, prompts=[prompts["label"]], limit=0,
                                 out_dir=str(out / "label"), judge=judge)
        dpo = steps["dpo"]
        wired["dpo"] = replace(dpo, model=sl_cai, ref_model="", out_dir=str(out / "dpo"), betas=[],
                               data=replace(dpo.data, source=str(out / "label" / "preference.jsonl")))
        models.append(rl_cai)
    wired["eval"] = replace(steps["eval"], models=models, harmful=[prompts["eval_harmful"]],
                            safe=[prompts["eval_safe"]], helpful=[prompts["eval_helpful"]], limit=0,
                            out_dir=str(out / "eval"))
    return wired


PROGRESS_FILES = {"revise": ("traces.jsonl",), "label": ("judgments.jsonl",), "sft": ("checkpoints",),
                  "dpo": ("checkpoints",), "eval": ()}


def _run_step(step: str, cfg, fn, upstream_changed: bool, inputs: list[str] = ()) -> tuple[dict, bool]:
    """Skip a step finished with this exact config and unchanged inputs (upstream steps, and the ``inputs``
    files' contents); otherwise run it. A step whose config or inputs changed starts afresh (its answer cache
    stays: answers are keyed by model weights and request); one that never finished resumes (traces/judgments
    by prompt, training from its last checkpoint)."""
    import hashlib
    import shutil

    from lmforge.constitutional.judges import weights_signature
    from lmforge.stages.pipeline import config_hash

    out = Path(cfg.out_dir)
    stamp = hashlib.sha256()
    for path in inputs:  # prompt files by content, model directories by their weights' size and mtime
        stamp.update(weights_signature(path).encode() if Path(path).is_dir() else Path(path).read_bytes())
    marker, digest = out / "run_step.json", f"{config_hash(cfg)}-{stamp.hexdigest()[:12]}"
    try:
        record = json.loads(marker.read_text())
    except (FileNotFoundError, ValueError):
        record = None
    if record and record.get("config_hash") == digest and not upstream_changed:
        return record["summary"], False
    if record or upstream_changed:
        for name in PROGRESS_FILES[step]:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        marker.unlink(missing_ok=True)
    t0 = time.time()
    summary = fn(cfg)
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"step": step, "config_hash": digest, "seconds": round(time.time() - t0, 1),
                                  "finished": time.time(), "summary": summary}, default=str) + "\n")
    return summary, True


def prepare_prompts(cfg: RunConfig) -> tuple[dict[str, str], dict[str, int]]:
    """The held-out/train split written as prompt files under out_dir/prompts; (paths, sizes)."""
    from lmforge.constitutional.prompts import read_prompts
    from lmforge.constitutional.run import check_disjoint, split_prompts, write_splits

    def read(specs, label=None):
        return read_prompts(_as_list(specs), 0, label=label) if specs else []

    sizes = {"eval": cfg.eval_prompts, "revise": cfg.revise_prompts, "revise_helpful": cfg.revise_helpful,
             "label": cfg.label_prompts if cfg.rl else 0, "label_helpful": cfg.label_helpful if cfg.rl else 0}
    splits = split_prompts(read(cfg.red_team, "unsafe"), read(cfg.helpful), read(cfg.safe, "safe"), sizes,
                           harmful_eval=read(cfg.harmful_eval, "unsafe") if cfg.harmful_eval else None,
                           helpful_eval=read(cfg.helpful_eval) if cfg.helpful_eval else None, seed=cfg.split_seed)
    check_disjoint(splits)
    empty = [name for name in ("eval_harmful", "eval_safe", "eval_helpful", "revise") if not splits[name]]
    if empty:
        from lmforge.data.sources import DataError

        raise DataError(f"the prompt split left {empty[0]} empty: give more prompts (red_team, helpful, safe) or "
                        "ask for fewer")
    return write_splits(splits, Path(cfg.out_dir) / "prompts"), {k: len(v) for k, v in splits.items()}


def run_constitutional(cfg: RunConfig, steps: dict | None = None, critic=None, judge=None) -> dict:
    """The whole loop; ``steps`` maps step name -> its config (default: every step's defaults); ``critic`` and
    ``judge`` override the configured backends (tests). Returns results.json's content."""
    from lmforge.config import save_config
    from lmforge.constitutional.run import judge_check, markdown_table, model_metrics
    from lmforge.data.sources import DataError
    from lmforge.stages.dpo import run_dpo
    from lmforge.stages.sft import run_sft

    t0 = time.time()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    steps = steps if steps is not None else step_configs(None, {}, cfg.model, cfg.rl)
    prompts, sizes = prepare_prompts(cfg)
    wired = _wire(cfg, steps, prompts)
    runs = {"revise": lambda c: run_revise(c, critic=critic), "sft": run_sft,
            "label": lambda c: run_label(c, judge=judge), "dpo": run_dpo, "eval": lambda c: run_eval(c, judge=judge)}
    inputs = {"revise": [prompts["revise"], cfg.model], "sft": [], "label": [prompts["label"]], "dpo": [],
              "eval": [prompts[k] for k in ("eval_harmful", "eval_safe", "eval_helpful")]}
    summaries, seconds, changed = {}, {}, False
    for step in RUN_STEPS:
        if step not in wired:
            continue
        if step == "dpo" and summaries["label"].get("pairs", 0) < wired["dpo"].train.micro_batch_size:
            raise DataError(f"{wired['label'].out_dir}/preference.jsonl: the judge kept {summaries['label']['pairs']} "
                            f"pairs, fewer than one DPO batch ({wired['dpo'].train.micro_batch_size}); "
                            f"{summaries['label'].get('skipped_low_confidence', 0)} were below label.min_confidence="
                            f"{wired['label'].min_confidence} (mean kept confidence "
                            f"{summaries['label'].get('mean_label_confidence')}): lower it, label more prompts, or "
                            "use a judge that can tell the answers apart")
        print(f"constitutional run: {step}", file=sys.stderr)
        summaries[step], ran = _run_step(step, wired[step], runs[step], changed, inputs[step])
        changed |= ran
        marker = json.loads((Path(wired[step].out_dir) / "run_step.json").read_text())
        seconds[step] = marker["seconds"]
    names = ["before", "SL-CAI", "RL-CAI"][:len(wired["eval"].models)]
    rows = []
    for i, (name, model_dir) in enumerate(zip(names, wired["eval"].models)):
        records = [json.loads(line) for line in (out / "eval" / f"answers_{i}.jsonl").read_text().splitlines()]
        rows.append({"name": name, "model": model_dir, "metrics": model_metrics(records, cfg.n_boot, cfg.split_seed),
                     "judge_check": judge_check(records)})
    result = {"models": rows, "judge": summaries["eval"]["judge"], "prompts": sizes,
              "revise": _pick(summaries["revise"], "revised", "revisions_kept", "mean_chars_initial",
                              "mean_chars_final"),
              "sft": _pick(summaries["sft"], "val_loss_before", "val_loss", "steps", "train_conversations", "lora"),
              "label": _pick(summaries.get("label", {}), "pairs", "mean_label_confidence", "skipped_low_confidence",
                             "skipped_identical"),
              "dpo": _pick(summaries.get("dpo", {}), "loss_type", "beta", "steps", "eval_rewards/accuracies",
                           "eval_rewards/margins"),
              "step_seconds": seconds, "seconds": round(time.time() - t0, 1)}
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "results.md").write_text(results_markdown(cfg, result, markdown_table(rows)))
    return result


def _pick(d: dict, *keys) -> dict:
    return {k: round(d[k], 4) if isinstance(d[k], float) else d[k] for k in keys if k in d}


def results_markdown(cfg: RunConfig, result: dict, table: str) -> str:
    sizes, checks = result["prompts"], [(r["name"], r["judge_check"]) for r in result["models"]]
    lines = [f"# Constitutional AI before/after: {cfg.model}", "",
             f"Judge: `{result['judge']}`. Held-out prompts (never revised or trained on): "
             f"{sizes['eval_harmful']} harmful, {sizes['eval_safe']} safe look-alikes, {sizes['eval_helpful']} "
             f"ordinary. Trained on: {sizes['revise']} revised prompts (SFT), {sizes['label']} judged prompts "
             f"(DPO). Intervals: 95%, Wilson for refusal rates, percentile bootstrap for means.", "", table,
             "Can the judge tell? Its mean P(harmless) on red-team answers that refuse vs that comply:", ""]
    for name, c in checks:
        lines.append(f"- {name}: refusals {c['p_harmless_refusals']} (n={c['n_refusals']}), compliances "
                     f"{c['p_harmless_compliances']} (n={c['n_compliances']})")
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in result["step_seconds"].items())
    lines += ["", f"Seconds per step (when it last ran): {steps}. This command: {result['seconds']:.0f} s.", ""]
    for key in ("revise", "sft", "label", "dpo"):
        if result[key]:
            lines.append(f"- {key}: " + ", ".join(f"{k} {v}" for k, v in result[key].items()))
    return "\n".join(lines) + "\n"


def _mean_len(texts) -> float:
    lengths = [len(t) for t in texts]
    return round(sum(lengths) / max(len(lengths), 1), 1)


# ---- CLI ----

def print_summary(sub: str, summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

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
    from lmforge.config import parse_cli
    from lmforge.constitutional.judges import JudgeError

    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print(__doc__ + "\nusage: lmforge constitutional {revise,label,eval,run} [--config RECIPE] [key=value ...]",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    sub, rest = argv[0], argv[1:]
    if sub == "run":
        return main_run(rest)
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


def split_run_overrides(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(overrides of the run section, {step: its overrides without the prefix}); ``sft.train.lr=1e-5`` -> sft."""
    own, per_step = [], {s: [] for s in RUN_STEPS}
    for text in overrides:
        head, _, rest = text.split("=", 1)[0].partition(".")
        if head in per_step and rest:
            per_step[head].append(text[len(head) + 1:])
        else:
            own.append(text)
    return own, per_step


def main_run(argv: list[str]) -> int:
    import argparse

    from lmforge.config import describe, load_config
    from lmforge.constitutional.judges import JudgeError

    parser = argparse.ArgumentParser(prog="lmforge constitutional run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="config keys of the run section (override with key=value; a step's "
                                            "own keys with its name first, e.g. sft.train.max_steps=20):\n"
                                            + describe(RunConfig))
    parser.add_argument("--config", "-c", default="constitutional", help="recipe YAML file or built-in name")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    own, per_step = split_run_overrides(args.overrides)
    cfg = load_config(RunConfig, args.config, own, section="run")
    steps = step_configs(args.config, per_step, cfg.model, cfg.rl)  # every config error before any work
    try:
        result = run_constitutional(cfg, steps)
    except JudgeError as e:
        print(f"lmforge constitutional run: judge error: {e}\nEvery answer that arrived is cached; rerun the same "
              "command to resume.", file=sys.stderr)
        return 1
    print_run(result, Path(cfg.out_dir))
    return 0


def print_run(result: dict, out_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from lmforge.constitutional.run import COLUMNS, cell

    table = Table(title=f"constitutional AI before/after (judge: {result['judge']})")
    table.add_column("model")
    for _, title in COLUMNS:
        table.add_column(title, justify="right")
    for row in result["models"]:
        table.add_row(row["name"], *(cell(row["metrics"].get(k)) for k, _ in COLUMNS))
    console = Console()
    console.print(table)
    console.print(f"{out_dir / 'results.md'}  {out_dir / 'results.json'}  ({result['seconds']:.0f} s)")
