"""Online / iterative DPO: pair selection (best vs worst, ties skipped and counted), a round's pairs.jsonl that
`lmforge dpo` trains on, exact resume from a crash mid-round (finished rounds untouched, pairs not redrawn), the
two references, and the CLI end to end (per-round summary, rerun is a no-op, bad data is one error)."""

import json
from pathlib import Path

import pytest
import torch
from lmforge_cli import lmforge as run_lmforge
from safetensors.torch import load_file
from test_rollout import make_model_dir, write_rl_prompts

import lmforge.stages.online_dpo as online
from lmforge.data.preference import PreferenceDataConfig, load_preference_data
from lmforge.generation import Completion
from lmforge.modelio import load_tokenizer
from lmforge.rewards import RewardSpec
from lmforge.rollout import RLDataConfig, Samples
from lmforge.stages.dpo import DPOConfig, run_dpo
from lmforge.stages.online_dpo import OnlineDPOConfig, make_pairs, run_online_dpo, select_pairs
from lmforge.train.loop import TrainConfig
from lmforge.train.metrics import read_metrics


def test_select_pairs_best_against_worst_and_ties_give_nothing():
    rewards = [[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0.5, 0.2, 0.9, 0.1]]
    samples = [[[p, j] for j in range(4)] for p in range(4)]
    # ties keep sample order: prompt 0's best is its first 1, its worst its last 0
    assert select_pairs(rewards, samples) == [(0, 0, 3), (3, 2, 3)]
    assert select_pairs(rewards, samples, max_pairs=2) == [(0, 0, 3), (0, 2, 1), (3, 2, 3), (3, 0, 1)]
    # 2nd best vs 2nd worst only while chosen is strictly better; duplicates count once
    assert select_pairs([[1, 0, 0, 0]], [[[1], [2], [3], [4]]], max_pairs=2) == [(0, 0, 3)]
    assert select_pairs([[1, 1, 0, 0]], [[[5], [5], [6], [6]]], max_pairs=2) == [(0, 0, 2)]
    assert select_pairs([[1, 0]], [[[7], [7]]]) == []  # one distinct answer cannot make a pair


def test_make_pairs_writes_trl_rows_and_counts_prompts_without_a_pair():
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "answer": str(i)} for i in range(3)]
    rows[2]["prompt"] = "plain q2"
    texts = ["right", "wrong", "same", "same", "good", "bad"]
    completions = [Completion([10 + i, 2], "stop", t) for i, t in enumerate(texts)]
    rep_rows = [r for r in rows for _ in range(2)]
    rep_ids = [[1, i] for i in range(3) for _ in range(2)]
    samples = Samples(rep_rows, rep_ids, completions, torch.tensor([1.0, 0.0, 0.0, 0.0, 0.8, 0.3]),
                      {"math": torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])})
    cfg = OnlineDPOConfig(num_generations=2)
    pair_rows, tokens, stats = make_pairs(cfg, samples)
    assert (stats["prompts"], stats["pairs"], stats["no_pair_prompts"]) == (3, 2, 1)
    assert stats["reward"] == pytest.approx(2.1 / 6)
    assert pair_rows[0] == {"prompt": rows[0]["prompt"], "chosen": [{"role": "assistant", "content": "right"}],
                            "rejected": [{"role": "assistant", "content": "wrong"}],
                            "score_chosen": 1.0, "score_rejected": 0.0}
    assert pair_rows[1]["prompt"] == "plain q2" and pair_rows[1]["chosen"] == "good"  # TRL's standard form
    assert tokens[1][:3] == [[1, 2], [14, 2], [15, 2]] and tokens[1][3] == pytest.approx(0.5)
    with_system = make_pairs(OnlineDPOConfig(num_generations=2, data=RLDataConfig(system_prompt="Be brief.")),
                             samples)[0]
    assert with_system[1]["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert with_system[1]["chosen"] == [{"role": "assistant", "content": "good"}]


def micro_config(tmp_path: Path, out: str = "odpo", **kw) -> OnlineDPOConfig:
    """A random micro policy, a random reward model (scores vary, so every prompt makes a pair), 8 prompts."""
    policy = tmp_path / "policy"
    if not policy.exists():
        make_model_dir(policy)
        make_model_dir(tmp_path / "rm", seed=1, num_labels=1)
        write_rl_prompts(tmp_path / "rl.jsonl", n=12)
    data = str(tmp_path / "rl.jsonl")
    train = TrainConfig(lr=1e-2, schedule="constant", warmup_steps=0, max_steps=kw.pop("max_steps", 3), batch_size=4,
                        micro_batch_size=4, weight_decay=0.0, eval_every=0, save_every=kw.pop("save_every", 0),
                        log_every=1, device="cpu", num_threads=1)
    base = dict(model=str(policy), out_dir=str(tmp_path / out), data=RLDataConfig(source=data, eval_source=data,
                                                                                   eval_size=4),
                rewards=[RewardSpec(kind="model", path=str(tmp_path / "rm"))], rounds=2, prompts_per_round=6,
                num_generations=4, max_new_tokens=6, train=train)
    return OnlineDPOConfig(**{**base, **kw})


def test_a_round_writes_pairs_that_lmforge_dpo_trains_on(tmp_path):
    summary = run_online_dpo(micro_config(tmp_path, rounds=1))
    round1 = summary["rounds"][1]
    assert round1["pairs"] == 6 and round1["no_pair_prompts"] == 0 and round1["steps"] == 3
    path = tmp_path / "odpo" / "round_1" / "pairs.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 6 and all(r["score_chosen"] > r["score_rejected"] for r in rows)
    assert all(r["prompt"].startswith("What is") and isinstance(r["chosen"], str) for r in rows)  # string prompts
    data = PreferenceDataConfig(source=str(path), eval_fraction=0.0, chosen_score="score_chosen",
                                rejected_score="score_rejected")
    train, _, stats = load_preference_data(data, load_tokenizer(tmp_path / "policy"))
    assert stats["kept"] + stats.get("empty_answer", 0) + stats.get("identical", 0) == 6 and len(train) >= 4
    dpo = run_dpo(DPOConfig(model=str(tmp_path / "odpo" / "model"), out_dir=str(tmp_path / "dpo"), data=data,
                            train=TrainConfig(lr=1e-3, warmup_steps=0, max_steps=2, batch_size=4, micro_batch_size=4,
                                              eval_every=0, device="cpu", num_threads=1)))
    assert dpo["steps"] == 2 and (tmp_path / "dpo" / "model" / "model.safetensors").exists()


def weights(path: Path) -> dict:
    return load_file(str(path / "model.safetensors"))


def test_crash_mid_round_resumes_exactly_and_finished_rounds_are_not_redone(tmp_path, monkeypatch):
    full = run_online_dpo(micro_config(tmp_path, "full", save_every=1))
    real = online.dpo_loss_fn
    calls = {"n": 0}

    def crashing_loss_fn(*args, **kw):
        inner = real(*args, **kw)

        def loss_fn(model, batch):
            calls["n"] += 1
            if calls["n"] == 3 + 2 + 2 + 1:  # round 1: 3 steps + 2 eval batches; round 2: 2 steps, then crash
                raise RuntimeError("killed")
            return inner(model, batch)
        return loss_fn

    monkeypatch.setattr(online, "dpo_loss_fn", crashing_loss_fn)
    cfg = micro_config(tmp_path, "run", save_every=1)
    with pytest.raises(RuntimeError, match="killed"):
        run_online_dpo(cfg)
    run = tmp_path / "run"
    assert (run / "round_1" / "round.json").exists() and not (run / "round_2" / "round.json").exists()
    frozen = {p: p.stat().st_mtime_ns for p in [*(run / "round_1").rglob("*"), run / "round_2" / "rollout.json",
                                                run / "round_2" / "pairs.jsonl"]}
    monkeypatch.setattr(online, "dpo_loss_fn", real)
    resumed = run_online_dpo(cfg)
    assert {p: p.stat().st_mtime_ns for p in frozen} == frozen  # round 1 untouched, round 2's pairs not redrawn
    assert [r["eval/accuracy"] for r in resumed["rounds"]] == [r["eval/accuracy"] for r in full["rounds"]]
    assert [r["pairs"] for r in resumed["rounds"][1:]] == [r["pairs"] for r in full["rounds"][1:]]
    for a, b in zip(weights(run / "model").values(), weights(tmp_path / "full" / "model").values()):
        assert torch.equal(a, b)
    assert any(r.get("event") == "resume" for r in map(json.loads, (run / "round_2" / "metrics.jsonl").open()))
    assert not (run / "round_2" / "checkpoints").exists()  # a finished round's model dir is its state


def test_more_rounds_continue_a_finished_run_and_a_changed_config_starts_over(tmp_path):
    run_online_dpo(micro_config(tmp_path, rounds=1))
    out = tmp_path / "odpo"
    before = {p: p.stat().st_mtime_ns for p in (out / "round_1").rglob("*")}
    summary = run_online_dpo(micro_config(tmp_path, rounds=2))
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2] and summary["steps"] == 6
    assert [r["step"] for r in read_metrics(out)] == [0, 3, 6]  # one row per round, at optimizer steps so far
    run_online_dpo(micro_config(tmp_path, rounds=2, beta=0.5))  # another config: the old rounds go
    assert (out / "round_1" / "pairs.jsonl").stat().st_mtime_ns != before[out / "round_1" / "pairs.jsonl"]


@pytest.mark.parametrize("reference", ["round", "initial"])
def test_reference_is_the_round_start_or_the_initial_model(tmp_path, reference):
    summary = run_online_dpo(micro_config(tmp_path, reference=reference))
    first_step = read_metrics(tmp_path / "odpo" / "round_2")[0]
    if reference == "round":  # round 2's reference is round 1's policy: at its first step pi == pi_ref
        assert summary["rounds"][2]["reference"] == str(tmp_path / "odpo" / "round_1" / "model")
        assert abs(first_step["rewards/chosen"]) < 1e-4 and abs(first_step["rewards/margins"]) < 1e-4
    else:  # the start model throughout: round 2 starts away from its reference
        assert summary["rounds"][2]["reference"] == str(tmp_path / "policy")
        assert abs(first_step["rewards/chosen"]) > 1e-3



def lmforge(*args, check=True):
    return run_lmforge(*args, check=check, threads=1)


def test_cli_two_rounds_summary_noop_rerun_and_bad_data(tmp_path):
    cfg = micro_config(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""online_dpo:
  model: {cfg.model}
  out_dir: {tmp_path / "cli"}
  data: {{source: {cfg.data.source}, eval_source: {cfg.data.eval_source}, eval_size: 4}}
  rewards: [{{kind: model, path: {tmp_path / "rm"}}}]
  rounds: 2
  prompts_per_round: 6
  num_generations: 4
  max_new_tokens: 6
  epochs: 1.0
  rpo_alpha: 1.0
  train: {{lr: 1.0e-2, schedule: constant, warmup_steps: 0, batch_size: 4, micro_batch_size: 4, device: cpu}}
""")
    proc = lmforge("online-dpo", "--config", str(recipe))
    assert "online dpo" in proc.stdout and "round 2/2" in proc.stderr
    out = tmp_path / "cli"
    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    for r in summary["rounds"][1:]:
        assert r["steps"] == 2  # epochs=1: ceil(6 pairs / batch 4)
        for key in ("pairs", "no_pair_prompts", "reward", "rewards/accuracies", "rewards/margins", "eval/accuracy",
                    "eval/accuracy_low", "eval/accuracy_high", "nll_loss"):
            assert key in r, key
        assert (out / f"round_{r['round']}" / "pairs.jsonl").exists()
    assert "eval/accuracy first" in summary and (out / "model" / "config.json").exists()
    stamp = (out / "model" / "model.safetensors").stat().st_mtime_ns
    again = lmforge("online-dpo", "--config", str(recipe))
    assert "nothing to do" in again.stderr
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == stamp

    bad = tmp_path / "no_answers.jsonl"
    bad.write_text('{"prompt": "What is 1 + 1?"}\n')
    proc = lmforge("online-dpo", "--config", str(recipe), f"out_dir={tmp_path / 'bad'}", f"data.source={bad}",
                   "rewards=[{kind: math}]", check=False)
    assert proc.returncode == 2 and "no_answers.jsonl:1: the math reward needs an 'answer' field" in proc.stderr
