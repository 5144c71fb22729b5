"""``lmforge pipeline``: the whole recipe, stage after stage, each starting from the previous stage's model.

    tokenizer+pretrain -> midtrain -> SFT -> reward model -> DPO -> GRPO -> PPO -> online DPO
        -> (studies: beta sweep, reward hacking, reward-model over-optimisation) -> report

Every stage reads its own section of the recipe (the built-in ``tiny`` by default) and writes
``<run_dir>/<stage>/`` (model/, summary.json, metrics.jsonl, config.yaml). After each stage the pipeline evaluates
its model on held-out problems of the recipe's task (``<stage>/eval/eval.json``: accuracy, format rate, length,
KL to the SFT model for the tuned stages, reward-model preference accuracy) and at the end writes report.md and
report.html into run_dir.

Rerunning is cheap and safe: a stage whose resolved config matches the one recorded when it finished is skipped,
and a stage killed half-way resumes from its last checkpoint. Overrides go to one stage with its name as prefix
(``sft.train.max_steps=50``), to every path with ``run_dir=runs/exp`` (any top-level value of the recipe, written
``${name}`` in it, is set this way: the reasoning recipe's ``world=think_hasty``), or to the pipeline itself
(``stages=[pretrain,sft]``, ``eval.limit=200``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lmforge.apps.report import write_report
from lmforge.apps.verbs import VERBS
from lmforge.atomic import write_atomic
from lmforge.config import describe, load_config, read_yaml, recipe_path, top_level_values
from lmforge.data.mix import source_overrides_mix
from lmforge.data.tinyworld import eval_rows
from lmforge.evaluation import encode_prompt, generate_all
from lmforge.generation import SamplingParams
from lmforge.modelio import load_model_and_tokenizer
from lmforge.stages.eval import EvalConfig, run_eval
from lmforge.stages.think import ThinkConfig, run_think
from lmforge.train.runs import config_hash, is_finished, mark_finished
from lmforge.train.tracking import check_report_to, log_report

# pipeline stage (its section of the recipe) -> the verb that runs it (apps/verbs.py: module, config, run function);
# the order is the pipeline's
STAGES: dict[str, str] = {
    "pretrain": "pretrain", "midtrain": "midtrain", "sft": "sft", "reward": "reward", "dpo": "dpo", "kto": "kto",
    "online_dpo": "online-dpo", "grpo": "grpo", "ppo": "ppo",
    # studies rather than models: their plots go into the report
    "dpo_sweep": "dpo",  # KL drift vs margin for several betas
    "reward_hacking": "grpo",  # a length-paying reward, with/without KL
    "overoptimisation": "think",  # best-of-N and PPO against the reward model, judged by the verifier
    # the reasoning recipe (recipes/reasoning.yaml): thinking SFT, reward models of steps and outcomes, RL, sweeps
    "prm": "prm",  # process reward model
    "orm": "prm",  # outcome reward model (target: outcome)
    "grpo_outcome": "grpo",  # verifier reward
    "grpo_process": "grpo",  # the PRM's step rewards
    "ppo_outcome": "ppo",  # verifier reward at the last token, a critic for the values
    "ppo_process": "ppo",  # the PRM's step rewards at each step's last token
    "grpo_length": "grpo",  # verifier + group-relative length
    "budget_sweep": "think",  # accuracy vs thinking tokens per level
    "compute_sweep": "think",  # majority vs PRM best-of-N vs beam
}
DEFAULT_STAGES = ("pretrain", "midtrain", "sft", "reward", "dpo", "grpo", "ppo")  # a recipe's pipeline.stages picks
BASE_STAGES = ("pretrain", "midtrain")  # probed with raw text; the rest through the chat template
TUNED_STAGES = ("dpo", "kto", "online_dpo", "grpo", "ppo", "grpo_outcome", "grpo_process", "ppo_outcome", "ppo_process",
                "grpo_length")
SCORER_STAGES = ("reward", "prm", "orm")  # models that score answers rather than write them: no task accuracy


@dataclass
class PipelineEvalConfig:
    task: str = "tinyworld"  # see `lmforge eval --help`; empty: no per-stage evaluation
    data: str = ""
    limit: int = 64  # held-out problems per stage
    max_new_tokens: int = 64
    prefs: str = ""  # held-out preference pairs for the reward model's accuracy
    batch_size: int = 256  # rows answering at once: the scheduler refills finished rows, so width costs no padding
    # extra prompts every stage answers in the report; the report's demo problems are chosen from the held-out
    # answers by rule (apps/demos.py), so none are needed
    samples: list[str] = field(default_factory=list)
    sample_tokens: int = 64
    think_samples: int = 8  # after SFT: accuracy vs samples per problem (self-consistency), N = 1..this; 0 = off
    think_limit: int = 32  # problems in that sweep
    harness: str = ""  # lm-evaluation-harness tasks for every stage's model (see `lmforge eval --help`)
    harness_include: str = ""  # a directory of local task YAMLs


@dataclass
class PipelineConfig:
    run_dir: str = "runs/tiny"  # write it as ${run_dir} in the recipe so one override moves every stage
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    eval: PipelineEvalConfig = field(default_factory=PipelineEvalConfig)
    report: bool = True
    # trackers for every stage (each stage's train.report_to) and for the report's files: e.g. [jsonl,wandb]
    report_to: list[str] = field(default_factory=list)
    tracking_project: str = "lmforge"

    def validate(self) -> None:
        if self.report_to:
            check_report_to(self.report_to)
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage {unknown[0]!r} (stages: {', '.join(STAGES)})")


def split_overrides(overrides: list[str], variables=("run_dir",)) -> tuple[list[str], dict[str, list[str]],
                                                                        list[str]]:
    """(pipeline overrides, {stage: its overrides without the prefix}, overrides of the recipe's top-level
    ``variables`` (``${name}`` in any section), which go to every section)."""
    own, per_stage, shared = [], {s: [] for s in STAGES}, []
    for text in overrides:
        key = text.split("=", 1)[0]
        head, _, rest = key.partition(".")
        if head in STAGES and rest:
            per_stage[head].append(text[len(head) + 1:])
        elif key in variables:
            shared.append(text)
            own.append(text)
        else:
            own.append(text)
    return own, per_stage, shared


def stage_entry(stage: str, name: str):
    """The stage's config class (name="config") or run function (name="run"), from its verb's module."""
    verb = VERBS[STAGES[stage]]
    return getattr(importlib.import_module(verb.module), getattr(verb, name))


def stage_config(stage: str, recipe: str, overrides: list[str]):
    if stage in ("pretrain", "midtrain"):  # pretrain.data.source=... on the command line is the data
        overrides = source_overrides_mix(overrides)
    return load_config(stage_entry(stage, "config"), recipe, overrides, section=stage)


def run_stage(stage: str, cfg, upstream_changed: bool = False) -> tuple[dict, bool]:
    """Run one stage unless its output is complete for this exact config and its inputs did not change;
    returns (summary, ran). A finished stage that must run again starts fresh; an unfinished one resumes."""
    out_dir = Path(cfg.out_dir)
    marker, digest = out_dir / "pipeline_stage.json", config_hash(cfg)
    if not upstream_changed and is_finished(marker, digest) and (out_dir / "summary.json").exists():
        return json.loads((out_dir / "summary.json").read_text()), False
    if marker.exists():  # finished before with another config or input: its checkpoints must not be resumed
        print(f"{stage}: config or input changed since it finished; training it again from the start")
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
        marker.unlink()
    summary = stage_entry(stage, "run")(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / "summary.json").exists():  # a study (the beta sweep) returns its summary without writing it
        write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    mark_finished(marker, digest, stage=stage)
    return summary, True


def evaluate_stage(stage: str, model_dir: Path, pcfg: PipelineConfig, sft_dir: Path | None,
                   reward_dir: Path | None) -> dict:
    """Held-out task accuracy (and KL / preference accuracy where they mean something) of one stage's model."""
    e = pcfg.eval
    is_reward = stage == "reward"
    if stage in SCORER_STAGES and not is_reward:
        return {}
    cfg = EvalConfig(
        model=str(model_dir), task="" if is_reward else e.task, data=e.data, limit=e.limit,
        chat=stage not in BASE_STAGES, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
        reference=str(sft_dir) if stage in TUNED_STAGES and sft_dir is not None else "",
        reward_model=str(model_dir) if is_reward else "", prefs=e.prefs if is_reward else "",
        harness="" if is_reward else e.harness, harness_include="" if is_reward else e.harness_include,
        out_dir=str(model_dir.parent / "eval"), n_boot=200)
    out = Path(cfg.out_dir)
    digest = config_hash(cfg) + _model_stamp(model_dir) + hashlib.sha256(repr((e.samples, e.sample_tokens, e.think_samples, e.think_limit)).encode()).hexdigest()[:8]
    if is_finished(out / "pipeline_eval.json", digest) and (out / "eval.json").exists():
        return json.loads((out / "eval.json").read_text())
    summary = run_eval(cfg) if cfg.task or cfg.prefs or cfg.harness else {}
    if e.samples and not is_reward:  # the same questions to every stage, side by side in the report
        summary["samples"] = demo_answers(model_dir, e.samples, chat=cfg.chat, max_new_tokens=e.sample_tokens)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    if stage == "sft" and e.task == "tinyworld" and e.think_samples > 0:
        think_sweep(model_dir, out, e)
    mark_finished(out / "pipeline_eval.json", digest)
    return summary


def think_sweep(model_dir: Path, out: Path, e: PipelineEvalConfig) -> dict:
    """Inference-time scaling on held-out problems: accuracy vs samples per problem -> out/sweep.json + PNG."""
    out.mkdir(parents=True, exist_ok=True)
    problems = out / "think_problems.jsonl"
    rows = [{"messages": [{"role": "user", "content": r["question"]}], "answer": r["answer"]}
            for r in eval_rows(e.think_limit)]
    problems.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_think(ThinkConfig(model=str(model_dir), input=str(problems), out_dir=str(out), method="sweep",
                                 n=e.think_samples, max_new_tokens=e.max_new_tokens))


def demo_answers(model_dir: Path, prompts: list[str], chat: bool, max_new_tokens: int) -> list[dict]:
    """Greedy answers (chat) or continuations (base models) to the demo prompts."""
    model, tok = load_model_and_tokenizer(str(model_dir))
    ids = [encode_prompt(tok, p, chat) for p in prompts]
    outs = generate_all(model, ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0), tok)
    return [{"prompt": p, "response": o[0].text} for p, o in zip(prompts, outs)]


def _model_stamp(model_dir: Path) -> str:
    weights = model_dir / "model.safetensors"
    return f"-{weights.stat().st_mtime_ns}" if weights.exists() else ""


def run_pipeline(pcfg: PipelineConfig, recipe: str, stage_overrides: dict[str, list[str]],
                 shared: list[str]) -> dict:
    console = Console()
    run_dir = Path(pcfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    configs = {s: stage_config(s, recipe, shared + stage_overrides[s]) for s in pcfg.stages}  # all errors first
    for cfg in configs.values():
        if pcfg.report_to and hasattr(cfg, "train"):
            cfg.train.report_to, cfg.train.tracking_project = list(pcfg.report_to), pcfg.tracking_project
    t0, results, changed = time.time(), {}, False
    for i, stage in enumerate(pcfg.stages):
        done = int(30 * i / len(pcfg.stages))
        console.rule(f"[bold]pipeline {i + 1}/{len(pcfg.stages)}: {stage}[/bold]  "
                     f"{'━' * done}{'╌' * (30 - done)}  {time.time() - t0:.0f} s")
        cfg = configs[stage]
        summary, ran = run_stage(stage, cfg, upstream_changed=changed)
        changed |= ran  # every later stage starts from this stage's (new) model
        model_dir = Path(cfg.out_dir) / "model"
        evaluation = {}
        if pcfg.eval.task and model_dir.exists():
            sft = Path(configs["sft"].out_dir) / "model" if "sft" in configs else None
            reward = Path(configs["reward"].out_dir) / "model" if "reward" in configs else None
            evaluation = evaluate_stage(stage, model_dir, pcfg, sft, reward)
        results[stage] = {"out_dir": cfg.out_dir, "summary": _scalars(summary), "eval": _scalars(evaluation)}
    record = {"run_dir": str(run_dir), "stages": results, "seconds": round(time.time() - t0, 1)}
    (run_dir / "pipeline.json").write_text(json.dumps(record, indent=2) + "\n")
    if pcfg.report:
        written = write_report(run_dir)
        record["report"] = [written["markdown"], written["html"]]
        if pcfg.report_to:
            log_report(pcfg.report_to, run_dir, [Path(f) for f in written["files"]], pcfg.tracking_project)
    console.rule(f"[bold]pipeline done in {record['seconds']:.0f} s[/bold]")
    return record


def _scalars(d: dict) -> dict:
    """The numbers of a summary (rates as their value), for pipeline.json and the closing table."""
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict) and "value" in v:
            if isinstance(v.get("ci"), list) and len(v["ci"]) == 2:  # keep a rate's interval beside it
                out[f"{k}_low"], out[f"{k}_high"] = v["ci"]
            v = v["value"]
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = v
    return out


def print_table(record: dict) -> None:
    table = Table(title=f"lmforge pipeline: {record['run_dir']}")
    for col in ("stage", "loss", "accuracy", "vs SFT (paired, 95%)", "format", "pref. acc.", "KL", "length", "time"):
        table.add_column(col, justify="left" if col == "stage" else "right")

    def fmt(value, spec):
        return "—" if value is None else spec.format(value)

    for stage, r in record["stages"].items():
        s, e = r["summary"], r["eval"]
        loss = next((s[k] for k in ("val_loss", "eval_loss", "eval/loss") if k in s), None)
        table.add_row(stage, fmt(loss, "{:.3f}"), fmt(e.get("accuracy"), "{:.1%}"), gain_cell(e),
                      fmt(e.get("format_rate"), "{:.1%}"),
                      fmt(e.get("preference_accuracy", s.get("eval_accuracy")), "{:.1%}"), fmt(e.get("kl"), "{:.4f}"),
                      fmt(e.get("mean_response_tokens"), "{:.1f}"), fmt(s.get("seconds"), "{:.0f} s"))
    Console(width=max(130, Console().width)).print(table)  # 9 columns: not squeezed into a pipe's 80
    for path in record.get("report", []):
        print(f"report: {path}")


def gain_cell(e: dict) -> str:
    """Accuracy minus the SFT model's on the same held-out problems, in points, with its bootstrap interval."""
    if "accuracy_gain" not in e:
        return "—"
    cell = f"{100 * e['accuracy_gain']:+.1f}"
    if "accuracy_gain_low" in e:
        cell += f" [{100 * e['accuracy_gain_low']:+.1f}, {100 * e['accuracy_gain_high']:+.1f}]"
    return cell


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmforge pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="config keys (override with key=value):\n" + describe(PipelineConfig))
    parser.add_argument("--config", "-c", default="tiny", help="recipe YAML file or built-in recipe name")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    variables = {"run_dir", *top_level_values(read_yaml(recipe_path(args.config)))}
    own, per_stage, shared = split_overrides(args.overrides, variables)
    pcfg = load_config(PipelineConfig, args.config, own, section="pipeline")
    record = run_pipeline(pcfg, args.config, per_stage, shared)
    print_table(record)
    return 0
