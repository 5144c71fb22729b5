"""End to end on tiny models: `lmforge think method=budget_sweep | prm_best_of_n | beam` and `lmforge prm`."""

import json

import pytest
import torch
from lmforge_cli import lmforge

from lmforge.data import thinkworld as tw
from lmforge.model import ModelConfig, Transformer
from lmforge.modelio import save_model_dir
from lmforge.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    """A random 2-layer model whose tokenizer has the think tags, trained on thinking-world text."""
    tok = train_tokenizer([r["text"] for r in tw.text_rows(300)], vocab_size=300, think_tokens=True)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                    max_position_embeddings=256))
    root = tmp_path_factory.mktemp("thinker")
    save_model_dir(root / "model", model, tok)
    problems = root / "problems.jsonl"
    problems.write_text("".join(json.dumps(r) + "\n" for r in tw.eval_rows(per_level=2)))
    return root


def test_budget_sweep_writes_a_table_per_level_and_the_plot(thinker):
    out = thinker / "sweep"
    lmforge("think", "method=budget_sweep", f"model={thinker / 'model'}", f"input={thinker / 'problems.jsonl'}",
            f"out_dir={out}", "budgets=[0,4]", "wait_minimums=[3]", "wait_counts=[1]", "adaptive_budget=6", "adaptive_threshold=0.5",
            "max_new_tokens=12", threads=1)
    summary = json.loads((out / "budget_sweep.json").read_text())
    settings = {r["setting"] for r in summary["table"]}
    assert settings == {"budget=0", "budget=4", "no budget", "wait>=3", "wait x1", "adaptive (p>=0.5)"}
    assert all(r["waits"] == (1 if r["setting"] == "wait x1" else 0) for r in summary["table"])
    assert {r["level"] for r in summary["table"]} == {*tw.LEVELS, "all"}
    for r in summary["table"]:  # budgets are never exceeded
        if r["setting"].startswith("budget="):
            assert r["mean_thinking_tokens"] <= int(r["setting"].split("=")[1])
        if r["setting"].startswith("adaptive"):
            assert r["mean_thinking_tokens"] <= 6
    assert {g["setting"] for g in summary["paired_vs_no_budget"]} == settings - {"no budget"}
    assert (out / "accuracy_vs_thinking_tokens.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def prm(thinker):
    """A PRM trained for 3 steps on stepwise rows (lmforge prm), from the thinker."""
    data = thinker / "steps.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tw.stepwise_rows(64)))
    held_out = thinker / "steps_eval.jsonl"
    held_out.write_text("".join(json.dumps(r) + "\n" for r in tw.stepwise_rows(16, split="test")))
    prm = thinker / "prm"
    lmforge("prm", f"model={thinker / 'model'}", f"data={data}", f"eval_data={held_out}", f"out_dir={prm}",
            "train.max_steps=3", "train.warmup_steps=0", "train.micro_batch_size=16", "train.batch_size=16", "train.log_every=1", threads=1)
    return prm


def test_prm_trains_on_stepwise_rows_then_ranks_samples_and_guides_beam_search(thinker, prm):
    summary = json.loads((prm / "summary.json").read_text())
    assert summary["train_traces"] == 64 and summary["eval"]["traces"] == 16
    assert 0 <= summary["eval"]["step_accuracy"] <= 1 and "f1" in summary["eval"]["first_error"]
    out = thinker / "beam"
    lmforge("think", "method=beam", f"model={thinker / 'model'}", f"input={thinker / 'problems.jsonl'}",
            f"prm={prm / 'model'}", f"orm={prm / 'model'}", f"out_dir={out}", "n=2", "beams=[[1,2]]",
            "max_new_tokens=12", "levels=[4,5]", threads=1)
    summary = json.loads((out / "compute.json").read_text())
    methods = {r["method"] for r in summary["table"]}
    assert methods == {"majority", "prm_min", "prm_prod", "prm_last", "prm_vote", "orm", "pass@n", "beam"}
    assert summary["problems"] == 4
    assert all(r["mean_generated_tokens"] > 0 for r in summary["table"])
    assert (out / "accuracy_vs_compute.png").stat().st_size > 1000


@pytest.mark.parametrize("verb", ["grpo", "ppo"])
@pytest.mark.parametrize("scorer", ["prm", "checker"])
def test_grpo_and_ppo_train_on_step_rewards(thinker, prm, tmp_path, verb, scorer):
    """process_reward=PRM_DIR (or checker): process supervision end to end, the step scores logged every step."""
    out = tmp_path / verb
    problems = thinker / "problems.jsonl"
    source = prm / "model" if scorer == "prm" else "checker"
    common = [f"model={thinker / 'model'}", f"process_reward={source}", f"out_dir={out}",
              f"data.source={problems}", f"data.eval_source={problems}", "data.eval_size=2", "max_new_tokens=12",
              "rewards=[{kind: math}]", "prompts_per_rollout=2", "num_generations=2", "train.max_steps=2",
              "train.batch_size=4", "train.micro_batch_size=4", "train.eval_every=0", "train.save_every=0",
              "train.log_every=1"]
    lmforge(verb, *common, *(["epochs=1"] if verb == "ppo" else []), threads=1)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2 and all(0 <= r["process/step_reward"] <= 1 for r in steps)
    if scorer == "checker":  # a random model's steps are almost all wrong, and the checker says so
        assert all(r["process/step_reward"] < 0.5 for r in steps)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)


def test_generate_and_eval_take_a_thinking_budget(thinker):
    """A prompt that opens the think block: every completion closes it within the budget, and the output counts
    thinking and answer tokens apart; eval reports accuracy and thinking tokens by level."""
    prompts = thinker / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 7+5?\n<think>\n"}) + "\n")
    out = thinker / "generated.jsonl"
    lmforge("generate", f"model={thinker / 'model'}", f"input={prompts}", f"output={out}", "n=4",
            "max_new_tokens=10", "thinking_budget=3", threads=1)
    for c in json.loads(out.read_text())["completions"]:
        assert c["thinking_tokens"] <= 3 and c["thinking_tokens"] + c["answer_tokens"] == c["tokens"]
        assert "</think>" in c["text"]
    lmforge("eval", f"model={thinker / 'model'}", "task=thinkworld", "limit=1", "max_new_tokens=8",
            "thinking_budget=2", f"out_dir={thinker / 'eval'}", threads=1)
    summary = json.loads((thinker / "eval" / "eval.json").read_text())
    assert set(summary["by_level"]) == {str(lv) for lv in tw.LEVELS}
    assert all(r["mean_thinking_tokens"] <= 2 for r in summary["by_level"].values())


REASONING_MICRO = [  # the built-in reasoning recipe on a budget of seconds: every stage, every table and plot
    "pretrain.train.max_steps=4", "pretrain.train.warmup_steps=1", "pretrain.train.eval_every=0",
    "pretrain.train.save_every=0", "pretrain.train.batch_size=8", "pretrain.train.micro_batch_size=8",
    "sft.train.max_steps=2", "sft.train.warmup_steps=1", "sft.train.eval_every=0", "sft.train.batch_size=8",
    "sft.train.micro_batch_size=8",
    *[f"{s}.{k}" for s in ("prm", "orm") for k in (
        "num_problems=6", "eval_num_problems=6", "samples_per_problem=2", "max_new_tokens=24", "train.max_steps=2",
        "train.warmup_steps=1", "train.batch_size=4", "train.micro_batch_size=4")],
    "grpo_length.train.max_steps=1", "grpo_length.prompts_per_rollout=2", "grpo_length.num_generations=2",
    "grpo_length.train.batch_size=4", "grpo_length.train.micro_batch_size=4", "grpo_length.max_new_tokens=24",
    "grpo_length.data.eval_size=4", "grpo_length.train.eval_every=0", "grpo_length.train.save_every=0",
    "budget_sweep.per_level=2", "budget_sweep.budgets=[0,8]", "budget_sweep.wait_minimums=[12]",
    "budget_sweep.adaptive_budget=12", "budget_sweep.max_new_tokens=24",
    "compute_sweep.per_level=2", "compute_sweep.n=2", "compute_sweep.beams=[[1,2]]", "compute_sweep.max_new_tokens=24",
    "eval.limit=2", "eval.max_new_tokens=24", "eval.sample_tokens=24",
]


@pytest.mark.slow
def test_the_reasoning_recipe_runs_end_to_end_and_its_report_shows_every_table(tmp_path):
    run = tmp_path / "reasoning"
    lmforge("pipeline", "--config", "reasoning", f"run_dir={run}", *REASONING_MICRO, threads=1)
    stages = json.loads((run / "pipeline.json").read_text())["stages"]
    assert list(stages) == ["pretrain", "sft", "prm", "orm", "grpo_length", "budget_sweep", "compute_sweep"]
    assert "by_level" in json.loads((run / "grpo_length" / "eval" / "eval.json").read_text())
    md = (run / "report.md").read_text()
    for heading in ("accuracy [95% CI] and mean thinking tokens by difficulty level", "prm: held-out traces", "orm: held-out traces",
                    "budget_sweep: accuracy [95% CI]", "budget_sweep: paired gain over no budget",
                    "compute_sweep: accuracy [95% CI]", "compute_sweep: gain over majority voting"):
        assert f"### {heading}" in md, heading
    assert "| grpo_length |" in md and "first-error F1" in md
    assert "budget_sweep/accuracy_vs_thinking_tokens.png" in md and "compute_sweep/accuracy_vs_compute.png" in md
