"""Reward sources: verifiable math and format rewards, length, a reward model read at the last token, weighted
sums, and their YAML configuration."""

import pytest
import torch
from test_rollout import make_model_dir

from lmforge.config import from_dict
from lmforge.errors import ConfigError
from lmforge.modelio import load_model_dir
from lmforge.rewards import (
    RewardInput,
    RewardSpec,
    build_reward,
    format_reward,
    group_length_reward,
    length_reward,
    math_reward,
    prompt_groups,
)
from lmforge.stages.grpo import GRPOConfig


def inputs(completions, answers=None, finish=None, ids=None):
    n = len(completions)
    return RewardInput(prompts=["q"] * n, completions=completions, answers=answers or ["7"] * n,
                       prompt_ids=[[1, 2]] * n, completion_ids=ids or [[3] * (i + 1) for i in range(n)],
                       finish_reasons=finish or ["stop"] * n)


def test_math_reward_checks_the_final_answer():
    r = math_reward(inputs(["3 + 4: 3+4=7. The answer is 7.", "The answer is 8.", "no idea", "#### 7.0"]))
    assert r.tolist() == [1.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="needs an answer"):
        math_reward(inputs(["7"], answers=[None]))


def test_format_reward_wants_the_answer_line_and_a_proper_stop():
    texts = ["3+4=7. The answer is 7.", "The answer is 7. and then more", "The answer is 7.", "7"]
    r = format_reward()(inputs(texts, finish=["stop", "stop", "length", "stop"]))
    assert r.tolist() == [1.0, 0.0, 0.0, 0.0]  # the third was cut by the length limit
    assert format_reward(r"^\d+$")(inputs(["7", "x"])).tolist() == [1.0, 0.0]


def test_weighted_sum_and_parts():
    reward = build_reward([RewardSpec(kind="math", weight=1.0), RewardSpec(kind="length", weight=-0.1),
                           RewardSpec(kind="length", weight=0.5)])
    total, parts = reward(inputs(["The answer is 7.", "The answer is 9."], ids=[[1, 2, 3], [1] * 10]))
    assert list(parts) == ["math", "length", "length2"]
    assert parts["length"].tolist() == [3.0, 10.0] == length_reward(inputs(["a", "b"], ids=[[1, 2, 3], [1] * 10])).tolist()
    torch.testing.assert_close(total, torch.tensor([1 - 0.3 + 1.5, 0 - 1.0 + 5.0]))


def test_reward_model_reads_the_last_token(tmp_path):
    rm_dir = make_model_dir(tmp_path / "rm", num_labels=1)
    reward = build_reward([RewardSpec(kind="model", path=str(rm_dir), weight=2.0)])
    inp = inputs(["a", "b"], ids=[[5, 6], [7, 8, 9]])
    total, parts = reward(inp)

    rm = load_model_dir(rm_dir, num_labels=1).eval()
    with torch.no_grad():  # each row alone, no padding: the score head at its last token
        by_hand = [rm.score(rm(torch.tensor([[1, 2] + c]), return_hidden=True)[0, -1]).item()
                   for c in inp.completion_ids]
    torch.testing.assert_close(parts["model"], torch.tensor(by_hand), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(total, 2 * parts["model"])
    policy_dir = make_model_dir(tmp_path / "policy")
    with pytest.raises(ValueError, match="score head is missing or all zeros"):
        build_reward([RewardSpec(kind="model", path=str(policy_dir))])


def test_rewards_from_yaml_and_bad_kinds():
    cfg = from_dict(GRPOConfig, {"rewards": [{"kind": "math", "weight": 1.0}, {"kind": "length", "weight": -0.01}]})
    assert [(r.kind, r.weight) for r in cfg.rewards] == [("math", 1.0), ("length", -0.01)]
    with pytest.raises(ConfigError, match=r"rewards\[0\].kind: 'maths' is not one of"):
        from_dict(GRPOConfig, {"rewards": [{"kind": "maths"}]}, "r.yaml")
    with pytest.raises(ConfigError, match="needs path"):
        from_dict(GRPOConfig, {"rewards": [{"kind": "model"}]}, "r.yaml")


def test_group_length_reward_by_hand():
    # group 0: lengths 10 (right), 20 (right), 30 (wrong); group 1: all 5 -> 0
    r = group_length_reward([10, 20, 30, 5, 5], [True, True, False, True, False], [0, 0, 0, 1, 1])
    assert r.tolist() == [0.5, 0.0, -0.5, 0.0, 0.0]
    # a short wrong answer gains nothing: min(0, lambda)
    assert group_length_reward([10, 30], [False, True], [0, 0]).tolist() == [0.0, -0.5]
    assert prompt_groups([[1], [1], [2], [2], [1]]) == [0, 0, 1, 1, 2]


def test_concise_reward_beside_correctness_keeps_right_above_wrong():
    reward = build_reward([RewardSpec(kind="math"), RewardSpec(kind="concise", weight=0.5)])
    inp = RewardInput(prompts=["q"] * 4, completions=["The answer is 4.", "The answer is 4.", "The answer is 5.",
                                                      "The answer is 5."],
                      answers=["4"] * 4, prompt_ids=[[1]] * 4, completion_ids=[[0] * 3, [0] * 9, [0] * 3, [0] * 9])
    total, parts = reward(inp)
    assert parts["concise"].tolist() == [0.5, -0.5, 0.0, -0.5]
    assert total.tolist() == [1.25, 0.75, 0.0, -0.25]
    assert min(total[:2]) > max(total[2:])
