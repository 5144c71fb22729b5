"""Environments: the calculator and feedback environments by hand, every kind of misbehaviour as one error naming
the environment and the step, trajectories whose environment tokens are masked out of the loss, and GRPO over
trajectories from the CLI (a bad environment: exit 2, one line, the last checkpoint still valid)."""

import json
import textwrap

import pytest
from lmforge_cli import lmforge
from test_grpo import micro
from test_rollout import make_model_dir

from lmforge.answers import extract_answer
from lmforge.config import load_config
from lmforge.data.tinyworld import source_rows
from lmforge.environments import Calculator, Episode, Feedback, calculate, load_environment
from lmforge.errors import EnvError
from lmforge.generation import SamplingParams
from lmforge.modelio import load_model_and_tokenizer
from lmforge.rollout import pack_rollout, sample_trajectories
from lmforge.stages.grpo import GRPOConfig
from lmforge.stages.sft import SFTConfig
from lmforge.train.checkpointing import latest_checkpoint


def test_calculate_is_exact_and_evaluates_only_arithmetic():
    assert calculate("347 + 289") == "636" and calculate("2 * (3 + 4) - 1") == "13" and calculate("12 x 3") == "36"
    assert calculate("7 / 2") == "3.5" and calculate("1 / 3") == "0.333333" and calculate("-4 + 1") == "-3"
    for bad in ("1 / 0", "__import__('os')", "2 **", "abs(-1)", "True + 1", ""):
        assert calculate(bad) == "error", bad


def test_calculator_answers_calls_and_rewards_the_final_answer():
    env = Calculator(max_calls=2)
    env.reset({"prompt": "What is 347 + 289?", "answer": 636})
    assert env.step("Let me add. <calc>347 + 289</calc>") == (" = 636.", 0.0, False)
    assert env.step("The answer is 636.") == ("", 1.0, True)
    env.reset({"answer": 636})
    assert env.step("The answer is 635.") == ("", 0.0, True)
    env.reset({"answer": 1})
    assert env.step("<calc>1</calc>")[2] is False and env.step("<calc>1</calc>")[2] is False
    assert env.step("<calc>1</calc>") == ("", 0.0, True)  # a third call: over max_calls


def test_feedback_gives_another_turn_and_less_reward_for_later_answers():
    env = Feedback(max_turns=3)
    env.reset({"answer": 39})
    assert env.step("The answer is 41.") == (Feedback.hint, 0.0, False)
    assert env.step("The answer is 39.") == ("", 0.5, True)
    env.reset({"answer": 39})
    assert [env.step("The answer is 1.")[1:] for _ in range(3)] == [(0.0, False), (0.0, False), (0.0, True)]


class Raises:
    def reset(self, row):
        pass

    def step(self, text):
        raise RuntimeError("tool crashed")


class NotAString(Raises):
    def step(self, text):
        return 42, 1.0, True


class NeverDone(Raises):
    def step(self, text):
        return "more", 0.0, False


class NaNReward(Raises):
    def step(self, text):
        return "", float("nan"), True


@pytest.mark.parametrize("env, message", [
    (Raises, "'mine', prompt 3, step 1: raised RuntimeError: tool crashed"),
    (NotAString, "'mine', prompt 3, step 1: returned a int observation, not a string"),
    (NaNReward, "'mine', prompt 3, step 1: returned the reward nan, not a finite number"),
    (NeverDone, "'mine', prompt 3, step 2: never finished: still not done after max_env_steps=2 steps"),
])
def test_a_misbehaving_environment_is_one_error_naming_it_and_the_step(env, message):
    episode = Episode(env, "mine", {"prompt": "p"}, 3, max_steps=2)
    with pytest.raises(EnvError) as e:
        episode.step("a")
        episode.step("b")
    assert str(e.value) == f"environment {message}"


def test_load_environment_from_a_builtin_a_module_or_a_file(tmp_path):
    assert load_environment("calculator") is Calculator
    assert load_environment("lmforge.environments:Feedback") is Feedback
    (tmp_path / "envs.py").write_text("class Mine:\n    def reset(self, row): pass\n    def step(self, t): return '', 1.0, True\n")
    assert load_environment(f"{tmp_path / 'envs.py'}:Mine").__name__ == "Mine"
    for spec, message in (("nope", "not a built-in"), (f"{tmp_path / 'envs.py'}:Other", "cannot load it"),
                          (f"{tmp_path / 'missing.py'}:Mine", "cannot load it"),
                          ("lmforge.environments:calculate", "has no reset or step")):
        with pytest.raises(EnvError, match=message):
            load_environment(spec)


class Echo:
    """Two turns of at most 4 tokens each, cut by the token budget, and a fixed observation between them."""
    stop_strings: list[str] = []
    observation = " 1 + 1"

    def reset(self, row):
        self.turns = 0
        return "2 + 2"

    def step(self, text):
        self.turns += 1
        return self.observation, 0.25, self.turns == 2


def test_trajectories_mask_the_environments_tokens_out_of_the_loss(tmp_path):
    make_model_dir(tmp_path / "m")
    model, tok = load_model_and_tokenizer(tmp_path / "m", "cpu")
    rows = [{"prompt": "What is 1 + 1?", "answer": "2"}] * 2
    prompts = [tok.encode("What is 1 + 1?")] * 2
    params = SamplingParams(max_new_tokens=40, temperature=1.0, n=2, seed=0, stop_token_ids=list(range(tok.vocab_size)))
    s = sample_trajectories(model, tok, rows, prompts, params, Echo, "echo")  # every token ends a turn
    first, obs = tok.encode("2 + 2"), tok.encode(Echo.observation)
    for ids, mask, reward in zip(s.completion_ids, s.masks, s.rewards):
        # reset's text (env) | one model token | the observation (env) | one model token: done at step 2
        assert len(ids) == len(first) + 1 + len(obs) + 1 and reward == 0.5
        assert mask == [0] * len(first) + [1] + [0] * len(obs) + [1]
        assert ids[:len(first)] == first and ids[len(first) + 1:-1] == obs
    buffer = pack_rollout(s.prompt_ids, s.completion_ids, tok.pad_id, s.masks)
    assert buffer["response_mask"].tolist() == [[float(m) for m in mask] for mask in s.masks]
    assert ((buffer["labels"] != -100) == buffer["response_mask"].bool()).all()
    assert s.parts["env"].tolist() == [0.5] * 4 and s.finish_reasons == ["stop"] * 4
    short = SamplingParams(**{**vars(params), "max_new_tokens": len(first) + 3})  # the observation gets cut
    cut = sample_trajectories(model, tok, rows, prompts, short, Echo, "echo")
    assert cut.finish_reasons == ["length"] * 4 and cut.rewards.tolist() == [0.25] * 4
    assert all(mask == [0] * len(first) + [1, 0, 0] for mask in cut.masks)


@pytest.mark.slow
def test_cli_grpo_in_the_calculator_and_a_bad_environment_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "calc"
    lmforge("grpo", f"out_dir={out}", "environment=calculator", *micro(tmp_path))
    rows = [r for r in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())]
    assert "rewards/env/mean" in rows[1] and "eval/accuracy" in rows[0]
    bad = tmp_path / "bad_env.py"
    bad.write_text(textwrap.dedent("""
        CALLS = [0]
        class Flaky:
            def reset(self, row):  # every episode: 4 for the first eval, 8 for rollout 1 (steps 1-2), 4 for the
                CALLS[0] += 1      # eval at step 2, then rollout 2 breaks after the step-2 checkpoint
                if CALLS[0] > 20:
                    raise ValueError("the tool is down")
            def step(self, text):
                return "", 0.0, True
    """))
    out = tmp_path / "flaky"
    proc = lmforge("grpo", f"out_dir={out}", f"environment={bad}:Flaky", *micro(tmp_path), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"environment '{bad}:Flaky', prompt" in proc.stderr and "reset: raised ValueError: the tool is down" in proc.stderr
    ckpt = latest_checkpoint(out / "checkpoints")
    assert ckpt is not None and ckpt.name == "step_0000002" and (ckpt / "model.safetensors").exists()
    load_model_and_tokenizer(ckpt, "cpu")  # still a whole model


def test_the_tool_demonstrations_are_what_the_calculator_answers():
    for row in source_rows("sft_tool")[:200]:
        question, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        call, rest = answer.split("</calc>")
        env = Calculator()
        env.reset({"answer": extract_answer(rest)})
        observation, reward, done = env.step(call + "</calc>")
        assert rest.startswith(observation) and not done  # the demonstration shows the tool's own output
        assert env.step(rest[len(observation):]) == ("", 1.0, True)
        assert calculate(question.removeprefix("What is ").removesuffix("?")) == extract_answer(rest)
    assert max(len(r["question"].split()[2]) for r in source_rows("eval_hard")) == 3


def test_the_tool_use_recipe_parses():
    grpo = load_config(GRPOConfig, "tool_use", section="grpo")
    sft = load_config(SFTConfig, "tool_use", section="sft")
    assert grpo.environment == "calculator" and grpo.model == sft.out_dir + "/model"
    assert sft.data == "builtin:tinyworld/sft_tool" and grpo.data.source == "builtin:tinyworld/rl_hard"
