"""The report's demo problems, chosen by rule from the held-out answers every stage gave, so that the report shows
what the stages changed rather than questions picked by hand.

Every evaluated stage leaves ``eval/records.jsonl``: one row per held-out problem with its prompt, the model's
answer and whether it was right. Over the problems all of them answered, in held-out order, the first one that:

1. **alignment fixed**: the SFT model gets wrong and the aligned models get right (DPO and GRPO when the run has
   them, else every stage after SFT that was evaluated; when no problem satisfies all of them, the one most of
   them get right);
2. **every stage right**: every chat stage (SFT and after) gets right;
3. **no stage right**: no stage, the base models included, gets right.

A kind with no such problem is left out. Base models (pretrain, midtrain) answer the raw question, chat models
through their chat template, as in the evaluation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

BASE_STAGES = ("pretrain", "midtrain")
ALIGNED = ("dpo", "grpo")


@dataclass
class Demo:
    kind: str  # "alignment fixed" | "every stage right" | "no stage right"
    rule: str  # the rule that chose it, in words
    prompt: str
    answer: str
    responses: dict[str, tuple[str, bool]] = field(default_factory=dict)  # stage -> (response, correct)


def task_records(stage_dir: Path) -> list[dict]:
    """The held-out task answers of a stage's evaluation (kind "task"), in problem order."""
    path = Path(stage_dir) / "eval" / "records.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == "task" and "correct" in r]


def choose_demos(stage_dirs: dict[str, Path]) -> list[Demo]:
    """stage name -> directory, in pipeline order -> the chosen demos (at most one of each kind)."""
    records = {name: {r["prompt"]: r for r in task_records(d)} for name, d in stage_dirs.items()}
    records = {name: r for name, r in records.items() if r}
    if "sft" not in records:
        return []
    prompts = [p for p in records["sft"] if all(p in r for r in records.values())]
    right = {p: {name: bool(r[p]["correct"]) for name, r in records.items()} for p in prompts}
    names = list(records)
    chat = names[names.index("sft"):]
    aligned = [n for n in ALIGNED if n in records] or chat[1:]
    demos = []
    if aligned:
        wrong_at_sft = [p for p in prompts if not right[p]["sft"]]
        best = max(wrong_at_sft, key=lambda p: sum(right[p][n] for n in aligned), default=None)
        if best is not None and any(right[best][n] for n in aligned):
            best = next(p for p in wrong_at_sft if sum(right[p][n] for n in aligned) == sum(right[best][n] for n in aligned))
            fixed = [n for n in aligned if right[best][n]]
            demos.append(_demo("alignment fixed", f"the first held-out problem SFT gets wrong and "
                               f"{' and '.join(fixed)} {'get' if len(fixed) > 1 else 'gets'} right", best, records))
    every = next((p for p in prompts if all(right[p][n] for n in chat)), None)
    if every is not None:
        demos.append(_demo("every stage right", "the first held-out problem every stage from SFT on gets right",
                           every, records))
    none = next((p for p in prompts if not any(right[p].values())), None)
    if none is not None:
        demos.append(_demo("no stage right", "the first held-out problem no stage gets right", none, records))
    return demos


def _demo(kind: str, rule: str, prompt: str, records: dict) -> Demo:
    first = next(iter(records.values()))[prompt]
    return Demo(kind, rule, prompt, str(first.get("answer", "")),
                {name: (str(r[prompt]["response"]), bool(r[prompt]["correct"])) for name, r in records.items()})
