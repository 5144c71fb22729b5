"""The four exercises of docs/exercises.md, each one command, run end to end on a tiny configuration so the page
cannot rot: DPO against the SFT baseline (1), the customer-service constitution through the whole constitutional
loop (2), and the Chinchilla-optimal size for 10^23 FLOPs with the numbers the page quotes (4). Exercise 3's
command, `lmforge pipeline --config reasoning`, is run end to end on a micro budget by tests/test_reasoning_cli.py;
here the page must name it and link to the README's Reasoning section."""

import json
import re
from pathlib import Path

import pytest
from lmforge_cli import lmforge
from test_pipeline import micro_overrides

from lmforge.constitutional.constitution import load_constitution

DOC = Path(__file__).parent.parent / "docs" / "exercises.md"


def test_the_page_is_linked_from_the_readme_and_names_every_command():
    readme = (DOC.parent.parent / "README.md").read_text()
    assert "docs/exercises.md" in readme[:6000]  # on the README's first screens
    doc = DOC.read_text()
    for command in ('lmforge pipeline "stages=[pretrain,midtrain,sft,dpo]"',
                    "lmforge constitutional run --config constitutional_customer_service",
                    "lmforge pipeline --config reasoning", "lmforge scaling optimal --flops 1e23"):
        assert command in doc, command
    section = "../README.md#reasoning-thinking-budgets-process-reward-models-step-level-search"
    assert "{{" not in doc and f"]({section})" in doc  # exercise 3 points at the recipe's section
    assert "\n## Reasoning: thinking budgets, process reward models, step-level search\n" in readme  # the anchor's heading


@pytest.mark.slow
def test_exercise_1_dpo_vs_sft_prints_the_paired_comparison(tmp_path):
    run = tmp_path / "run"
    args = [o for o in micro_overrides(run) if not o.startswith("stages=")]
    args += ["pretrain.train.max_steps=20", "midtrain.train.max_steps=4", "sft.train.max_steps=8",
             "dpo.train.max_steps=4", "eval.limit=8", "eval.max_new_tokens=24", "eval.think_samples=0",
             "eval.sample_tokens=8"]  # the plumbing of the comparison, not its size: later overrides win
    proc = lmforge("pipeline", "stages=[pretrain,midtrain,sft,dpo]", *args, threads=1)
    record = json.loads((run / "pipeline.json").read_text())
    assert list(record["stages"]) == ["pretrain", "midtrain", "sft", "dpo"]
    dpo = record["stages"]["dpo"]["eval"]
    assert dpo["accuracy_gain_low"] <= dpo["accuracy_gain"] <= dpo["accuracy_gain_high"]
    assert dpo["accuracy"] - dpo["reference_accuracy"] == pytest.approx(dpo["accuracy_gain"], abs=1e-9)
    assert "vs SFT (paired, 95%)" in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if re.match(r"│\s*dpo\s*│", line))  # the table's row
    assert re.search(r"[+-]\d+\.\d \[[+-]\d+\.\d, [+-]\d+\.\d\]", row), row  # the gain in points, with its CI


@pytest.mark.slow
def test_exercise_2_customer_service_constitution_runs_the_whole_loop(tiny_model_dir, tmp_path):
    model = tiny_model_dir("cai_exercise")
    out = tmp_path / "cai"
    train = ["train.max_steps=2", "train.batch_size=2", "train.micro_batch_size=2", "train.save_every=0"]
    proc = lmforge("constitutional", "run", "--config", "constitutional_customer_service", f"model={model}",
                   f"out_dir={out}", "eval_prompts=2", "revise_prompts=2", "revise_helpful=1", "label_prompts=2",
                   "label_helpful=1", "n_boot=50", "revise.max_new_tokens=4", "revise.critic.max_new_tokens=4",
                   "label.max_new_tokens=4", "eval.max_new_tokens=4", "sft.seq_len=512", "sft.epochs=0",
                   *(f"sft.{t}" for t in train), *(f"dpo.{t}" for t in train), "dpo.data.max_length=512",
                   "dpo.data.max_prompt_length=384", threads=1)
    result = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in result["models"]] == ["before", "SL-CAI", "RL-CAI"]
    assert "RL-CAI" in proc.stdout
    principles = {t["rounds"][0]["principle"] for t in map(json.loads, (out / "revise" / "traces.jsonl").open())}
    assert principles <= {p.name for p in load_constitution("customer_service").principles}
    shipped = {json.loads(line)["prompt"] for line in
               (Path(__file__).parent.parent / "src/lmforge/assets/constitutional/customer_service_risky.jsonl").open()}
    held_out = [json.loads(line)["messages"][-1]["content"] for line in (out / "prompts" / "eval_harmful.jsonl").open()]
    assert held_out and set(held_out) <= shipped  # evaluated on the shipped customer-service prompts


def test_exercise_4_chinchilla_optimal_size_for_1e23_flops_matches_the_page():
    proc = lmforge("scaling", "optimal", "--flops", "1e23", "--json")
    rows = {r["law"].split(" (")[0].split(":")[0]: r for r in json.loads(proc.stdout)}
    chin, rule = rows["Chinchilla approach 3"], rows["20 tokens/param"]
    assert f"{chin['N']:.3g}" == "1.46e+10" and f"{chin['D']:.3g}" == "1.14e+12" and f"{chin['loss']:.3f}" == "2.005"
    assert f"{rule['N']:.3g}" == "2.89e+10" and f"{rule['D']:.3g}" == "5.77e+11"
    doc = DOC.read_text()
    for quoted in ("14.6B", "1.14T", "2.005", "28.9B", "577B"):  # what the page says the command prints
        assert quoted in doc, quoted
