"""``lmforge prm``: train a process reward model (the trunk + a scalar head read at every step separator).

    stepwise data ({"prompt", "completions": [step, ...], "labels": [bool, ...]}, TRL's format)  -- data=FILE
    or traces the policy samples on problems with answers, labelled                              -- default
        labels=checker   by the thinking world's step checker (each line right given the ones before)
        labels=mc        by Monte-Carlo rollouts (Math-Shepherd): a step is good when continuations sampled from
                         it reach the right answer; any task with a verifiable answer gets a PRM this way
    -> tokens with a label on each step's separator -> BCE (objectives.prm.prm_loss) -> model dir

``target=outcome`` trains an outcome reward model instead (one label, the answer's correctness, on the last step).
Held-out traces (the policy's, on held-out problems, labelled by the step checker) give the metrics:
``step_accuracy`` and ProcessBench's first-error F1 (``first_error_f1``, with its two accuracies), beside what
chance gets (the majority label's step accuracy; the F1 of a judge that flags steps at random at the error rate).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.table import Table

from lmforge.answers import is_correct
from lmforge.config import parse_cli
from lmforge.data import thinkworld
from lmforge.data.chat import encode_prompt
from lmforge.data.preference import Batches
from lmforge.data.prompts import read_rl_prompts
from lmforge.data.stepwise import (
    StepExample,
    collate_steps,
    prompt_ids_of,
    read_stepwise,
    tokenize_steps,
)
from lmforge.errors import DataError
from lmforge.evaluation import generate_all
from lmforge.generation import SamplingParams
from lmforge.modelio import load_model_dir, load_tokenizer, save_model_dir, write_model_files
from lmforge.objectives.prm import first_error_f1, prm_loss
from lmforge.prm import PRMScorer, mc_step_labels, policy_rollouts, step_logits
from lmforge.thinking import split_steps
from lmforge.train.loop import TrainConfig, train
from lmforge.train.runs import start_run

LABELS = ("checker", "mc")
TARGETS = ("step", "outcome")


@dataclass
class PRMConfig:
    model: str = "runs/reasoning/sft/model"  # the trunk, and the policy that samples traces
    out_dir: str = "runs/reasoning/prm"
    data: str = ""  # stepwise rows to train on; empty: label traces the policy samples on `problems`
    eval_data: str = ""  # held-out stepwise rows; empty: policy traces on `eval_problems`, step-checker labels
    problems: str = "builtin:tinyworld/think_rl"  # {"prompt", "answer"} rows to sample training traces on
    eval_problems: str = "builtin:tinyworld/think_eval"
    num_problems: int = 400
    eval_num_problems: int = 200
    samples_per_problem: int = 4
    labels: str = "checker"  # checker | mc
    mc_rollouts: int = 4  # labels=mc: continuations per step
    mc_soft: bool = False  # labels=mc: train on the share of rollouts that succeed instead of "any succeeds"
    target: str = "step"  # step (a PRM) | outcome (an ORM: the answer's correctness on the last step)
    temperature: float = 1.0
    max_new_tokens: int = 200
    chat: bool = True  # prompts through the chat template
    prefix: str = "<think>\n"  # what the PRM reads between the prompt and the first step
    separator: str = "\n"  # what ends each step (the label sits on its last token)
    max_length: int = 256
    packing: bool = True
    seed: int = 0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=3e-4, warmup_steps=10, max_steps=150,
                                                                   batch_size=32, micro_batch_size=32,
                                                                   weight_decay=0.0, eval_every=0))

    def validate(self) -> None:
        if self.labels not in LABELS:
            raise ValueError(f"labels must be one of {', '.join(LABELS)}, got {self.labels!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.samples_per_problem < 1 or self.mc_rollouts < 1:
            raise ValueError("samples_per_problem and mc_rollouts must be >= 1")


@dataclass
class Traces:
    """Solutions as steps: prompt ids, steps, per-step labels, and (when known) whether the answer is right."""
    prompt_ids: list[list[int]]
    steps: list[list[str]]
    labels: list[list[float]]
    correct: list[bool | None]
    levels: list[int | None]
    checker: list[list[bool]] | None = None  # the step checker's labels too, when the labels are MC's


def sample_traces(model, tok, spec: str, limit: int, cfg: PRMConfig, seed: int) -> tuple[list[dict], list]:
    """(problem rows, completion texts per row) sampled from the policy."""
    rows = read_rl_prompts(spec)[:limit or None]
    if any(r["answer"] is None for r in rows):
        raise DataError(f"{spec}: every problem needs an 'answer' to label traces against")
    prompts = [encode_prompt(tok, r["prompt"], chat=cfg.chat) for r in rows]
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            n=cfg.samples_per_problem, seed=seed)
    results = generate_all(model.eval(), prompts, params, tok, batch_size=32, label="sample traces")
    return rows, [[c.text or "" for c in row] for row in results]


def checker_traces(tok, rows: list[dict], texts: list[list[str]], cfg: PRMConfig) -> Traces:
    """Traces labelled by the thinking world's step checker (the answer step by the gold answer)."""
    out = Traces([], [], [], [], [])
    for row, samples in zip(rows, texts):
        problem = thinkworld.parse_question(row["prompt"] if isinstance(row["prompt"], str)
                                            else row["prompt"][-1]["content"])
        if problem is None:
            raise DataError(f"{row['where']}: labels=checker needs thinking-world questions ('What is A + B?'); "
                            "use labels=mc for other tasks")
        ids = prompt_ids_of(tok, row["prompt"], cfg.chat, cfg.prefix)
        for text in samples:
            steps, labels = thinkworld.label_solution(problem, text)
            if steps:
                out.prompt_ids.append(ids)
                out.steps.append(steps)
                out.labels.append([float(x) for x in labels])
                out.correct.append(is_correct(text, row["answer"]))
                out.levels.append(problem.level)
    return out


def mc_traces(model, tok, rows: list[dict], texts: list[list[str]], cfg: PRMConfig) -> Traces:
    """Traces labelled by Monte-Carlo rollouts from each step (prm.mc_step_labels); on thinking-world problems
    the step checker's labels are kept beside them, to measure how often the two agree."""
    prompt_ids, steps, golds, checker = [], [], [], []
    for row, samples in zip(rows, texts):
        ids = encode_prompt(tok, row["prompt"], chat=cfg.chat)
        problem = thinkworld.parse_question(row["prompt"] if isinstance(row["prompt"], str)
                                            else row["prompt"][-1]["content"])
        for text in samples:
            s = split_steps(text)
            if s:
                prompt_ids.append(ids)
                steps.append(s)
                golds.append(row["answer"])
                checker.append(thinkworld.label_solution(problem, text)[1] if problem else None)
    rollout = policy_rollouts(model, tok, cfg.max_new_tokens, cfg.temperature, cfg.seed + 7)
    hard, soft = mc_step_labels(tok, prompt_ids, steps, lambda i, text: is_correct(text, golds[i]), rollout,
                                cfg.mc_rollouts, prefix=cfg.prefix, separator=cfg.separator)
    labels = soft if cfg.mc_soft else [[float(x) for x in h] for h in hard]
    pre = tok.encode(cfg.prefix) if cfg.prefix else []
    return Traces([p + pre for p in prompt_ids], steps, labels, [h[-1] if h else None for h in hard],
                  [None] * len(steps), checker if all(c is not None for c in checker) else None)


def label_agreement(a: list[list[float]], b: list[list[bool]]) -> float:
    """Share of steps where two labellings agree (labels >= 0.5 count as right)."""
    pairs = [(x >= 0.5) == y for xs, ys in zip(a, b) for x, y in zip(xs, ys)]
    return sum(pairs) / max(len(pairs), 1)


def data_traces(tok, rows, cfg: PRMConfig) -> Traces:
    return Traces([prompt_ids_of(tok, r.prompt, cfg.chat, cfg.prefix) for r in rows], [r.steps for r in rows],
                  [[float(x) for x in r.labels] for r in rows], [bool(r.labels[-1]) for r in rows],
                  [None] * len(rows))


def examples_of(tok, traces: Traces, cfg: PRMConfig) -> list[StepExample]:
    """Token examples; an ORM keeps only the last step's label (the answer's correctness, when known)."""
    out = []
    for ids, steps, labels, correct in zip(traces.prompt_ids, traces.steps, traces.labels, traces.correct):
        ex = tokenize_steps(tok, ids, steps, labels, cfg.separator)
        if cfg.target == "outcome":
            ex = StepExample(ex.input_ids, ex.label_positions[-1:],
                             [float(correct if correct is not None else labels[-1])])
        if cfg.max_length and len(ex.input_ids) > cfg.max_length:
            keep = [k for k, p in enumerate(ex.label_positions) if p < cfg.max_length]
            ex = StepExample(ex.input_ids[:cfg.max_length], [ex.label_positions[k] for k in keep],
                             [ex.labels[k] for k in keep])
        if ex.label_positions:
            out.append(ex)
    return out


def chance_baselines(labels: list[list[bool]], seed: int = 0, reps: int = 200) -> dict:
    """What guessing gets: the majority label's step accuracy, and the first-error F1 of a judge that calls each
    step wrong at random with the steps' error rate (the mean over ``reps`` draws)."""
    flat = [x for row in labels for x in row]
    right = sum(flat) / len(flat)
    rng = random.Random(seed)
    f1s = []
    for _ in range(reps):
        guesses = [[1.0 if rng.random() < right else 0.0 for _ in row] for row in labels]
        f1s.append(first_error_f1(guesses, labels)["f1"])
    f1s = [f for f in f1s if f == f]
    return {"step_accuracy": max(right, 1 - right), "f1_random": sum(f1s) / len(f1s) if f1s else float("nan")}


def evaluate_prm(model, tok, traces: Traces, cfg: PRMConfig) -> dict:
    """Step accuracy and first-error F1 of the PRM on held-out traces (gold: their labels), and chance's."""
    scorer = PRMScorer(model.eval(), tok, prefix="", separator=cfg.separator)
    probs = scorer.step_probs(traces.prompt_ids, traces.steps)  # prompt_ids already end with the prefix
    gold = [[y >= 0.5 for y in row] for row in traces.labels]
    pairs = [(p >= 0.5) == g for ps, gs in zip(probs, gold) for p, g in zip(ps, gs)]
    out = {"traces": len(gold), "steps": len(pairs), "step_accuracy": sum(pairs) / len(pairs),
           "first_error": first_error_f1(probs, gold), "chance": chance_baselines(gold, cfg.seed)}
    finals = [(ps[-1] >= 0.5) == c for ps, c in zip(probs, traces.correct) if ps and c is not None]
    if finals:
        out["outcome_accuracy"] = sum(finals) / len(finals)
    return out


def run_prm(cfg: PRMConfig) -> dict:
    """Sample and label traces (or read stepwise data), train the PRM, evaluate it on held-out traces."""
    rows_given = read_stepwise(cfg.data) if cfg.data else None  # bad rows fail before anything loads
    eval_given = read_stepwise(cfg.eval_data) if cfg.eval_data else None
    run = start_run(cfg)
    dist, out_dir, t0 = run.dist, run.out_dir, run.t0
    tok = load_tokenizer(cfg.model)
    if rows_given is not None:
        train_traces = data_traces(tok, rows_given, cfg)
    else:
        policy = load_model_dir(cfg.model).eval()
        rows, texts = sample_traces(policy, tok, cfg.problems, cfg.num_problems, cfg, cfg.seed)
        train_traces = (checker_traces(tok, rows, texts, cfg) if cfg.labels == "checker"
                        else mc_traces(policy, tok, rows, texts, cfg))
    if eval_given is not None:
        eval_traces = data_traces(tok, eval_given, cfg)
    else:
        policy = load_model_dir(cfg.model).eval()
        rows, texts = sample_traces(policy, tok, cfg.eval_problems, cfg.eval_num_problems, cfg, cfg.seed + 1)
        eval_traces = checker_traces(tok, rows, texts, cfg)
    examples = examples_of(tok, train_traces, cfg)
    if not examples:
        raise DataError("no training traces with a labelled step")
    model = load_model_dir(cfg.model, num_labels=1)
    if model.score.weight.abs().sum() == 0:
        torch.nn.init.normal_(model.score.weight, std=1 / (model.config.hidden_size + 1) ** 0.5)
    model.to(dist.device)

    def collate(items):
        return collate_steps(items, tok.pad_id, packed=cfg.packing, seq_len=cfg.max_length)

    def loss_fn(m, batch):
        return prm_loss(step_logits(m, batch), batch["labels"])

    batches = Batches(examples, cfg.train.micro_batch_size, collate, cfg.train.seed, dist.rank, dist.world_size,
                      length=lambda e: len(e.input_ids))
    result = train(model, loss_fn, batches, cfg.train, out_dir, dist=dist, run_config=cfg,
                   save_model=lambda path: write_model_files(path, model, tok), description="prm",
                   tokens_per_batch_fn=lambda b: int((b["input_ids"] != tok.pad_id).sum()))
    summary = {}
    if dist.is_main:
        save_model_dir(out_dir / "model", model, tok)
        flat = [y for row in train_traces.labels for y in row]
        summary = {"target": cfg.target, "labels": "data" if cfg.data else cfg.labels,
                   "train_traces": len(train_traces.steps), "train_steps": len(flat),
                   "train_wrong_step_rate": round(sum(y < 0.5 for y in flat) / max(len(flat), 1), 4),
                   "train_loss": result.metrics.get("loss"), "steps": result.step,
                   "eval": evaluate_prm(model, tok, eval_traces, cfg),
                   "seconds": round(time.time() - t0, 1), "model_dir": str(out_dir / "model")}
        if train_traces.checker is not None:  # Math-Shepherd's labels against the step checker's
            summary["mc_agreement_with_checker"] = round(label_agreement(train_traces.labels,
                                                                         train_traces.checker), 4)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out_dir / "tables.json").write_text(json.dumps([prm_table(summary)], indent=2) + "\n")
    return summary


def prm_table(summary: dict) -> dict:
    """The held-out metrics beside chance, as a report table."""
    e, fe = summary["eval"], summary["eval"]["first_error"]
    rows = [["step accuracy", f"{e['step_accuracy']:.1%}", f"{e['chance']['step_accuracy']:.1%} (majority label)"],
            ["first-error F1 (ProcessBench)", f"{fe['f1']:.3f}", f"{e['chance']['f1_random']:.3f} (random judge)"],
            ["first error found (traces with an error)", f"{fe['error_accuracy']:.1%} of {fe['n_error']}", ""],
            ["judged all right (traces without)", f"{fe['correct_accuracy']:.1%} of {fe['n_correct']}", ""]]
    if "outcome_accuracy" in e:
        rows.append(["answer right / wrong", f"{e['outcome_accuracy']:.1%}", ""])
    if "mc_agreement_with_checker" in summary:
        rows.append(["Monte-Carlo labels = step checker's", f"{summary['mc_agreement_with_checker']:.1%}", ""])
    return {"title": f"held-out traces ({e['traces']}, {e['steps']} steps; {summary['labels']} labels)",
            "headers": ["metric", "value", "chance"], "rows": rows}


def print_summary(summary: dict) -> None:
    e = summary["eval"]
    kind = "outcome reward model" if summary["target"] == "outcome" else "process reward model"
    table = Table(title=f"{kind} ({summary['labels']} labels)", show_header=False)
    table.add_row("trained on", f"{summary['train_traces']:,} traces, {summary['train_steps']:,} steps "
                                f"({summary['train_wrong_step_rate']:.1%} wrong), {summary['steps']} steps, "
                                f"{summary['seconds']} s")
    if "mc_agreement_with_checker" in summary:
        table.add_row("MC labels = step checker's", f"{summary['mc_agreement_with_checker']:.1%} of steps")
    table.add_row("held-out step accuracy", f"{e['step_accuracy']:.1%} (majority label: "
                                            f"{e['chance']['step_accuracy']:.1%}; {e['steps']:,} steps)")
    fe = e["first_error"]
    table.add_row("first-error F1 (ProcessBench)", f"{fe['f1']:.3f} (random judge {e['chance']['f1_random']:.3f}); "
                                                   f"error found {fe['error_accuracy']:.1%} of {fe['n_error']}, "
                                                   f"no error {fe['correct_accuracy']:.1%} of {fe['n_correct']}")
    if "outcome_accuracy" in e:
        table.add_row("answer right/wrong accuracy", f"{e['outcome_accuracy']:.1%}")
    table.add_row("model", summary["model_dir"])
    Console().print(table)


def main(argv: list[str]) -> int:
    cfg = parse_cli(argv, PRMConfig, prog="lmforge prm", description=__doc__, default_recipe="reasoning",
                    section="prm")
    summary = run_prm(cfg)
    if summary:
        print_summary(summary)
    return 0
