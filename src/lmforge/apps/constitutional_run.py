"""``lmforge constitutional run``: the whole constitutional AI loop, one command.

Split the prompts (held-out eval sets never revised or trained on) -> revise -> ``lmforge sft`` on the revisions
(SL-CAI) -> label with the judge -> ``lmforge dpo`` with soft labels (RL-CAI) -> eval of [before, SL-CAI, RL-CAI]
-> results.md / results.json with 95% intervals. Each step is a stage function (run_revise, run_label and run_eval
from stages/constitutional.py, run_sft, run_dpo) reading its own section of the recipe; finished steps are skipped
on a rerun, an interrupted one resumes.

This module holds RunConfig, the step configs and their wiring, the skip/resume bookkeeping, the results report
and the ``lmforge constitutional`` verb: ``run`` is main_run here, revise / label / eval go to the stage's main
(stages/constitutional.py, whose docstring is the help of both).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lmforge.config import describe, load_config, read_yaml, recipe_path, save_config
from lmforge.constitutional.judges import weights_signature
from lmforge.constitutional.prompts import read_prompts
from lmforge.constitutional.run import (
    COLUMNS,
    cell,
    check_disjoint,
    judge_check,
    markdown_table,
    model_metrics,
    split_prompts,
    write_splits,
)
from lmforge.errors import DataError, JudgeError
from lmforge.stages import constitutional
from lmforge.stages.constitutional import (
    EvalConfig,
    LabelConfig,
    ReviseConfig,
    as_list,
    run_eval,
    run_label,
    run_revise,
)
from lmforge.stages.dpo import DPOConfig, run_dpo
from lmforge.stages.sft import SFTConfig, run_sft
from lmforge.train.runs import config_hash, is_finished, mark_finished

RUN_STEPS = ("revise", "sft", "label", "dpo", "eval")


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


# ---- the whole loop ----

def step_configs(recipe: str | None, overrides: dict[str, list[str]], model: str, rl: bool = True) -> dict:
    """{step: config} from the recipe's section for each step (defaults where it has none) + that step's overrides.
    ``model`` fills the steps' required model fields until the run wires each step to its real input."""
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
    out = Path(cfg.out_dir)
    stamp = hashlib.sha256()
    for path in inputs:  # prompt files by content, model directories by their weights' size and mtime
        stamp.update(weights_signature(path).encode() if Path(path).is_dir() else Path(path).read_bytes())
    marker, digest = out / "run_step.json", f"{config_hash(cfg)}-{stamp.hexdigest()[:12]}"
    record = is_finished(marker, digest)
    if record and not upstream_changed:
        return record["summary"], False
    if marker.exists() or upstream_changed:
        for name in PROGRESS_FILES[step]:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        marker.unlink(missing_ok=True)
    t0 = time.time()
    summary = fn(cfg)
    mark_finished(marker, digest, step=step, seconds=round(time.time() - t0, 1), summary=summary)
    return summary, True


def prepare_prompts(cfg: RunConfig) -> tuple[dict[str, str], dict[str, int]]:
    """The held-out/train split written as prompt files under out_dir/prompts; (paths, sizes)."""
    def read(specs, label=None):
        return read_prompts(as_list(specs), 0, label=label) if specs else []

    sizes = {"eval": cfg.eval_prompts, "revise": cfg.revise_prompts, "revise_helpful": cfg.revise_helpful,
             "label": cfg.label_prompts if cfg.rl else 0, "label_helpful": cfg.label_helpful if cfg.rl else 0}
    splits = split_prompts(read(cfg.red_team, "unsafe"), read(cfg.helpful), read(cfg.safe, "safe"), sizes,
                           harmful_eval=read(cfg.harmful_eval, "unsafe") if cfg.harmful_eval else None,
                           helpful_eval=read(cfg.helpful_eval) if cfg.helpful_eval else None, seed=cfg.split_seed)
    check_disjoint(splits)
    empty = [name for name in ("eval_harmful", "eval_safe", "eval_helpful", "revise") if not splits[name]]
    if empty:
        raise DataError(f"the prompt split left {empty[0]} empty: give more prompts (red_team, helpful, safe) or "
                        "ask for fewer")
    return write_splits(splits, Path(cfg.out_dir) / "prompts"), {k: len(v) for k, v in splits.items()}


def run_constitutional(cfg: RunConfig, steps: dict | None = None, critic=None, judge=None) -> dict:
    """The whole loop; ``steps`` maps step name -> its config (default: every step's defaults); ``critic`` and
    ``judge`` override the configured backends (tests). Returns results.json's content."""
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


# ---- CLI ----

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


def main(argv: list[str]) -> int:
    """``lmforge constitutional``: ``run`` is the whole loop (here); revise, label and eval are the stage's."""
    if argv and argv[0] == "run":
        return main_run(argv[1:])
    return constitutional.main(argv)


def main_run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmforge constitutional run", description=constitutional.__doc__,
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
    table = Table(title=f"constitutional AI before/after (judge: {result['judge']})")
    table.add_column("model")
    for _, title in COLUMNS:
        table.add_column(title, justify="right")
    for row in result["models"]:
        table.add_row(row["name"], *(cell(row["metrics"].get(k)) for k, _ in COLUMNS))
    console = Console()
    console.print(table)
    console.print(f"{out_dir / 'results.md'}  {out_dir / 'results.json'}  ({result['seconds']:.0f} s)")
