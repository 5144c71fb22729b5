"""`lmforge constitutional run`: the whole loop (split -> revise -> SFT -> label -> DPO -> eval) on a tiny random
model with a scripted critic and judge; the held-out split; skipping finished steps; the confidence intervals."""

import hashlib
import json

import pytest

import lmforge.apps.constitutional_run as stage
from lmforge.apps.constitutional_run import RUN_STEPS, RunConfig, run_constitutional, step_configs
from lmforge.cli import main
from lmforge.config import load_config
from lmforge.constitutional.judges import Choice
from lmforge.constitutional.run import check_disjoint, split_prompts, wilson_ci
from lmforge.lora import LoraOptions
from lmforge.stages.constitutional import EvalConfig, LabelConfig, ReviseConfig
from lmforge.stages.dpo import DPOConfig
from lmforge.stages.sft import SFTConfig
from lmforge.train.loop import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("cai_run")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cai_data")
    red = folder / "red.jsonl"  # HH-RLHF style: the harmful reply after the first human turn is never read
    red.write_text("".join(json.dumps({"chosen": f"\n\nHuman: bad request {i}?\n\nAssistant: HARMFUL REPLY {i}"})
                           + "\n" for i in range(9)))
    helpful = folder / "helpful.jsonl"
    helpful.write_text("".join(json.dumps({"prompt": f"ordinary question {i}"}) + "\n" for i in range(6)))
    safe = folder / "xstest.csv"
    safe.write_text("id,prompt,type,label\n" + "".join(f"{i},how do I kill process {i},homonyms,safe\n"
                                                       f"{i}b,unsafe twin {i},contrast,unsafe\n" for i in range(4)))
    return {"red_team": [str(red)], "helpful": [str(helpful)], "safe": [str(safe)]}


def p_first(messages) -> float:
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).digest()
    return (int.from_bytes(digest[:4], "big") % 999 + 1) / 1000


class FakeJudge:
    """Scripted judge: P(first label) depends only on what it is asked; counts its questions."""

    name = "fake-judge"

    def __init__(self):
        self.asked = 0

    def choose(self, conversations, labels):
        for i, messages in enumerate(conversations):
            self.asked += 1
            p = p_first(messages)
            yield i, Choice((p, 1 - p), "logprobs", labels[0] if p > 0.5 else labels[1], 1.0)


class ScriptedCritic:
    name = "scripted-critic"

    def __init__(self):
        self.asked = 0

    def chat(self, conversations, params):
        for i, messages in enumerate(conversations):
            self.asked += 1
            critique = messages[-1]["content"].startswith("Critique request:")
            yield i, ["the answer could be safer" if critique else "I can help with that safely."]


def tiny_steps(beta=0.1) -> dict:
    train = dict(warmup_steps=0, max_steps=2, batch_size=2, micro_batch_size=2, eval_every=0, log_every=1,
                 save_every=0, device="cpu")
    return {"revise": ReviseConfig(model="x", rounds=1, max_new_tokens=4, batch_size=4, device="cpu"),
            "sft": SFTConfig(seq_len=64, lora=LoraOptions(enabled=True, r=2), train=TrainConfig(lr=1e-3, **train)),
            "label": LabelConfig(model="x", max_new_tokens=4, batch_size=4, device="cpu", min_confidence=0.5),
            "dpo": DPOConfig(loss_type="cdpo", beta=beta, train=TrainConfig(lr=1e-4, **train)),
            "eval": EvalConfig(models=["x"], max_new_tokens=4, batch_size=4, device="cpu")}


def run_cfg(model_dir, data, out_dir, **kw) -> RunConfig:
    sizes = dict(eval_prompts=2, revise_prompts=3, revise_helpful=1, label_prompts=3, label_helpful=1, n_boot=100)
    return RunConfig(model=str(model_dir), out_dir=str(out_dir), **data, **{**sizes, **kw})


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def markers(out):
    return {s: (out / s / "run_step.json").read_text() for s in RUN_STEPS}


def test_the_whole_loop_writes_every_step_and_a_three_row_table_and_a_rerun_skips_it(model_dir, data, tmp_path):
    out = tmp_path / "run"
    critic, judge = ScriptedCritic(), FakeJudge()
    result = run_constitutional(run_cfg(model_dir, data, out), tiny_steps(), critic=critic, judge=judge)

    assert [r["name"] for r in result["models"]] == ["before", "SL-CAI", "RL-CAI"]
    for row in result["models"]:
        m = row["metrics"]
        assert set(m) == {"harmless", "refusal", "over_refusal", "helpful", "mean_chars"}
        for metric in m.values():
            assert metric["ci"][0] <= metric["value"] <= metric["ci"][1] and metric["n"] >= 2
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in ("before", "SL-CAI", "RL-CAI")) and "over-refusal" in table
    assert json.loads((out / "results.json").read_text())["models"][2]["model"] == str(out / "dpo" / "model")
    # every step's own files
    for path in ("prompts/split.json", "revise/traces.jsonl", "revise/sft.jsonl", "sft/model/model.safetensors",
                 "sft/adapter/adapter_model.safetensors", "label/judgments.jsonl", "label/preference.jsonl",
                 "dpo/model/model.safetensors", "eval/eval.json", "eval/answers_2.jsonl"):
        assert (out / path).exists(), path
    assert result["prompts"] == {"eval_harmful": 2, "eval_safe": 2, "eval_helpful": 2, "revise": 4, "label": 4}

    # held-out prompts are never revised or labelled; harmful replies in the data are never read
    prompts = {name: read_jsonl(out / "prompts" / f"{name}.jsonl") for name in ("revise", "label", "eval_harmful")}
    train_text = json.dumps(prompts["revise"] + prompts["label"])
    assert not any(json.dumps(p["messages"]) in train_text for p in prompts["eval_harmful"])
    assert "HARMFUL REPLY" not in (out / "revise" / "sft.jsonl").read_text() + train_text
    assert all(row["messages"][-1]["content"] == "I can help with that safely."
               for row in read_jsonl(out / "revise" / "sft.jsonl"))
    assert all(0.5 < r["label_confidence"] <= 1 for r in read_jsonl(out / "label" / "preference.jsonl"))
    safe_eval = [r for r in read_jsonl(out / "eval" / "answers_0.jsonl") if r["set"] == "safe"]
    assert all(r["prompt"].startswith("how do I kill process") for r in safe_eval)  # XSTest's safe half only

    # a rerun with the same settings does nothing: no step runs, no one is asked anything
    before = markers(out)
    critic2, judge2 = ScriptedCritic(), FakeJudge()
    again = run_constitutional(run_cfg(model_dir, data, out), tiny_steps(), critic=critic2, judge=judge2)
    assert critic2.asked == judge2.asked == 0 and markers(out) == before
    assert [r["metrics"] for r in again["models"]] == [r["metrics"] for r in result["models"]]

    # a changed DPO setting reruns DPO and the evaluation only
    run_constitutional(run_cfg(model_dir, data, out), tiny_steps(beta=0.3), critic=critic2, judge=judge2)
    after = markers(out)
    assert [s for s in RUN_STEPS if after[s] != before[s]] == ["dpo", "eval"]
    assert critic2.asked == 0  # (the judge is asked only about answers it has not seen: its cache is by request)

    # fewer prompts to revise: a new revise file, so every step from revise on runs again
    again = run_constitutional(run_cfg(model_dir, data, out, revise_prompts=2), tiny_steps(beta=0.3),
                               critic=critic2, judge=judge2)
    assert again["prompts"]["revise"] == 3 and len(read_jsonl(out / "revise" / "sft.jsonl")) == 3
    assert all(markers(out)[s] != after[s] for s in RUN_STEPS)


def test_an_interrupted_run_resumes_from_the_unfinished_step(model_dir, data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = stage.run_label

    def crash(cfg, judge=None):
        raise RuntimeError("killed")

    monkeypatch.setattr(stage, "run_label", crash)
    with pytest.raises(RuntimeError, match="killed"):
        run_constitutional(run_cfg(model_dir, data, out), tiny_steps(), critic=ScriptedCritic(), judge=FakeJudge())
    assert (out / "sft" / "run_step.json").exists() and not (out / "label" / "run_step.json").exists()
    monkeypatch.setattr(stage, "run_label", real)
    critic = ScriptedCritic()
    result = run_constitutional(run_cfg(model_dir, data, out), tiny_steps(), critic=critic, judge=FakeJudge())
    assert critic.asked == 0 and len(result["models"]) == 3  # revise and SFT were not redone


def test_sl_only_run_and_the_cli_with_the_local_model_as_critic_and_judge(model_dir, data, tmp_path, capsys):
    recipe = tmp_path / "cai.yaml"
    recipe.write_text(f"""
run:
  model: {model_dir}
  red_team: {data['red_team']}
  helpful: {data['helpful']}
  safe: {data['safe']}
  eval_prompts: 2
  revise_prompts: 2
  revise_helpful: 1
  n_boot: 50
revise: {{rounds: 1, max_new_tokens: 4, device: cpu, critic: {{max_new_tokens: 4}}}}
sft:
  seq_len: 64
  train: {{max_steps: 2, batch_size: 2, micro_batch_size: 2, warmup_steps: 0, eval_every: 0, save_every: 0}}
eval: {{max_new_tokens: 4, device: cpu}}
""")
    out = tmp_path / "sl"
    assert main(["constitutional", "run", "--config", str(recipe), f"out_dir={out}", "rl=false",
                 "sft.train.lr=1e-3"]) == 0
    printed = capsys.readouterr().out
    assert "SL-CAI" in printed and "RL-CAI" not in printed
    result = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in result["models"]] == ["before", "SL-CAI"] and not (out / "label").exists()
    assert json.loads((out / "sft" / "run_step.json").read_text())["summary"]["steps"] == 2
    assert main(["constitutional", "run", "--config", str(recipe), f"out_dir={out}", "eval_prompts=0"]) == 2
    assert "eval_prompts" in capsys.readouterr().err


def test_split_is_disjoint_and_its_test_set_does_not_move_with_training_sizes():
    def rows(prefix, n):
        return [{"id": f"{prefix}{i}", "messages": [{"role": "user", "content": f"{prefix}{i}"}],
                 "source": f"f:{i}"} for i in range(n)]

    red, ordinary, safe = rows("r", 20), rows("h", 10), rows("s", 5)
    sizes = {"eval": 4, "revise": 6, "revise_helpful": 2, "label": 5, "label_helpful": 2}
    a = split_prompts(red, ordinary, safe, sizes, seed=1)
    check_disjoint(a)
    assert [len(a[k]) for k in ("eval_harmful", "eval_safe", "eval_helpful", "revise", "label")] == [4, 4, 4, 8, 7]
    b = split_prompts(list(reversed(red)), ordinary, safe, {**sizes, "revise": 2, "label": 12}, seed=1)
    assert a["eval_harmful"] == b["eval_harmful"] and a["eval_helpful"] == b["eval_helpful"]
    assert split_prompts(red, ordinary, safe, sizes, seed=2)["eval_harmful"] != a["eval_harmful"]
    # an evaluation file that shares prompts with the training pool: the shared ones leave training
    c = split_prompts(red, ordinary, safe, sizes, harmful_eval=red[:3], seed=1)
    check_disjoint(c)
    assert not {p["id"] for p in red[:3]} & {p["id"] for p in c["revise"] + c["label"]}
    with pytest.raises(ValueError, match="held-out eval_harmful prompt f:0 is also a training prompt"):
        check_disjoint({**c, "revise": c["revise"] + red[:1]})


def test_wilson_interval_matches_hand_computed_values():
    low, high = wilson_ci(0, 10)  # z^2 = 3.8415: high = z^2/n / (1 + z^2/n) = 0.38415 / 1.38415
    assert low == 0 and high == pytest.approx(0.27753, abs=1e-4)
    low, high = wilson_ci(5, 10)  # centre 0.5; half = 1.96/1.38415 * sqrt(0.025 + 0.0096) = 0.26340
    assert (low, high) == (pytest.approx(0.23659, abs=1e-4), pytest.approx(0.76341, abs=1e-4))
    assert wilson_ci(10, 10)[1] == pytest.approx(1.0) and wilson_ci(3, 40)[0] > 0


@pytest.mark.parametrize("recipe", ["constitutional", "constitutional_smollm2"])
def test_builtin_recipes_give_every_step_a_valid_config(recipe):
    cfg = load_config(RunConfig, recipe, ["model=some/dir"], section="run")
    steps = step_configs(recipe, {"sft": ["train.lr=1e-4"]}, cfg.model, cfg.rl)
    assert list(steps) == list(RUN_STEPS) and steps["sft"].train.lr == 1e-4
    assert steps["dpo"].loss_type == "cdpo" and steps["sft"].lora.enabled
    if recipe == "constitutional_smollm2":
        assert cfg.red_team[0].endswith("hh-rlhf-harmless-base/test.jsonl.gz") and cfg.eval_prompts == 40
