"""The report shows what changed: demo problems chosen by rule from the graded held-out answers, the stage table in
the order the pipeline ran, loss curves grouped and smoothed."""

import json

import pytest

from lmforge.apps.demos import choose_demos
from lmforge.apps.report import LOSS_GROUPS, collect_stages, smooth, write_report

# problem -> which stages answer it right; the rule must pick p2 (SFT wrong, DPO and GRPO right, the first such),
# p3 (every chat stage right) and p4 (nobody right); p1 is wrong at SFT but only DPO fixes it
RIGHT = {"p1": {"sft": False, "dpo": True, "grpo": False, "ppo": False},
         "p2": {"sft": False, "dpo": True, "grpo": True, "ppo": False},
         "p3": {"sft": True, "dpo": True, "grpo": True, "ppo": True},
         "p4": {"sft": False, "dpo": False, "grpo": False, "ppo": False}}
ORDER = ["pretrain", "sft", "dpo", "grpo", "ppo"]  # as the pipeline ran them (ppo after grpo)


@pytest.fixture
def run(tmp_path):
    for stage in ORDER:
        d = tmp_path / stage
        (d / "eval").mkdir(parents=True)
        records = [{"kind": "task", "prompt": f"What is {p}?", "answer": "7", "correct": RIGHT[p].get(stage, False),
                    "response": f"{stage} says {p}"} for p in RIGHT]
        (d / "eval" / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (d / "eval" / "eval.json").write_text(json.dumps({"accuracy": sum(RIGHT[p].get(stage, False) for p in RIGHT) / 4}))
        (d / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 3 - i / 10}) + "\n" for i in range(1, 31)))
    (tmp_path / "pipeline.json").write_text(json.dumps({"stages": {s: {} for s in ORDER}}))
    return tmp_path


def test_demo_problems_are_chosen_by_rule(run):
    demos = choose_demos({s: run / s for s in ORDER})
    assert [(d.kind, d.prompt) for d in demos] == [("alignment fixed", "What is p2?"),
                                                   ("every stage right", "What is p3?"),
                                                   ("no stage right", "What is p4?")]
    assert demos[0].rule.endswith("SFT gets wrong and dpo and grpo get right")
    assert demos[0].responses["sft"] == ("sft says p2", False) and demos[0].responses["grpo"] == ("grpo says p2", True)


def test_report_shows_them_in_pipeline_order(run):
    md = open(write_report(run)["markdown"]).read()
    table = md.split("## Stages")[1].split("##")[0]
    assert [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "stage" not in line] \
        == ORDER
    changed = md.split("## What the stages changed")[1].split("\n## ")[0]
    assert "alignment fixed: What is p2? (answer 7)" in changed
    assert "| grpo | ✓ grpo says p2 | ✓ grpo says p3 | ✗ grpo says p4 |" in changed
    assert [s.name for s in collect_stages(run)] == ORDER


def test_smoothing_and_groups():
    assert smooth([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])  # debiased: no pull towards 0
    assert smooth([0.0, 10.0], 0.5) == pytest.approx([0.0, 10 * 0.5 / 0.75])
    grouped = [n for _, names in LOSS_GROUPS for n in names]
    assert len(grouped) == len(set(grouped)) and {"pretrain", "sft", "dpo", "grpo"} <= set(grouped)


def test_stages_the_pipeline_did_not_run_keep_their_usual_place(run):
    (run / "pipeline.json").write_text(json.dumps({"stages": {s: {} for s in ["sft", "dpo", "grpo", "ppo"]}}))
    assert [s.name for s in collect_stages(run)] == ORDER  # pretrain (from an earlier run) first, ppo after grpo
    (run / "pipeline.json").unlink()
    assert [s.name for s in collect_stages(run)] == ["pretrain", "sft", "dpo", "ppo", "grpo"]  # the usual order
