"""GSPO, DAPO (clip-higher, dynamic sampling, overlong shaping, the token-level loss), CISPO and truncated importance
sampling against hand-computed values (objectives/rl.py)."""

import math

import pytest
import torch

from lmforge.objectives.rl import (
    aggregate_loss,
    cispo_token_loss,
    grpo_loss,
    gspo_loss,
    informative_groups,
    overlong_penalty,
    truncated_is_weights,
)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def leaf(*values):
    return t(*values).requires_grad_(True)


def test_gspo_uses_one_length_normalised_ratio_per_sequence():
    old = t(-1.0, -2.0, -1.0, -3.0).view(2, 2)
    logprobs = leaf(-0.9, -1.7, -1.2, -9.0)  # log-ratios (0.1, 0.3) and (-0.2, masked)
    mask = t(1, 1, 1, 0).view(2, 2)
    adv = t(1.0, -1.0)
    s1, s2 = math.exp(0.2), math.exp(-0.2)  # exp(mean log-ratio): 1.2214, 0.8187

    loss, m = gspo_loss(logprobs.view(2, 2), old, adv, mask, clip_eps=0.5, clip_eps_high=0.5)
    assert loss.item() == pytest.approx((-s1 + s2) / 2)
    assert m["ratio_mean"].item() == pytest.approx((s1 + s2) / 2) and m["clipfrac"].item() == 0.0
    loss.backward()
    # d/dlogp_t of -(1/2) A_i s_i = -(1/2) A_i s_i / |y_i|: every token of a sequence gets the same weight
    torch.testing.assert_close(logprobs.grad, t(-s1 / 4, -s1 / 4, s2 / 2, 0.0))

    logprobs.grad = None
    loss, m = gspo_loss(logprobs.view(2, 2), old, adv, mask, clip_eps=0.1, clip_eps_high=0.1)
    assert loss.item() == pytest.approx((-1.1 + 0.9) / 2)  # both sequences clipped, as wholes
    assert m["clipfrac"].item() == 1.0 and m["clipfrac_high"].item() == 0.5 and m["clipfrac_low"].item() == 0.5
    loss.backward()
    assert (logprobs.grad == 0).all()


def test_dapo_clip_higher_keeps_the_gradient_of_a_rising_low_probability_token():
    old = t(math.log(0.1))[None]
    logprobs = leaf(math.log(0.125))  # ratio 1.25, advantage > 0
    for high, expect_grad in ((None, 0.0), (0.28, -1.25)):
        logprobs.grad = None
        loss, m = grpo_loss(logprobs[None], old, None, t(1.0), t(1.0)[None], clip_eps=0.2, clip_eps_high=high,
                            loss_type="dapo" if high else "grpo")
        loss.backward()
        assert logprobs.grad.item() == pytest.approx(expect_grad)  # d(-rho A)/dlogp = -rho A = -1.25
        assert m["clipfrac_high"].item() == (0.0 if high else 1.0)


def test_cispo_clips_the_weight_not_the_update():
    old = t(-1.0, -1.0)[None]
    logprobs = leaf(-0.5, -1.5)  # ratios e^0.5 = 1.65 (truncated to 1.2) and e^-0.5 = 0.61 (kept)
    token_loss, m = cispo_token_loss(logprobs[None], old, t(2.0), t(1.0, 1.0)[None], clip_eps=1.0,
                                     clip_eps_high=0.2)
    w = t(1.2, math.exp(-0.5))
    torch.testing.assert_close(token_loss[0].detach(), -w * 2.0 * logprobs.detach())
    aggregate_loss(token_loss, t(1.0, 1.0)[None]).backward()
    torch.testing.assert_close(logprobs.grad, -w * 2.0 / 2)  # the truncated token still learns
    assert m["clipfrac"].item() == 0.5 and m["clipfrac_high"].item() == 0.5
    assert m["ratio_mean"].item() == pytest.approx((math.exp(0.5) + math.exp(-0.5)) / 2)


def test_truncated_importance_weights():
    old, rollout, mask = t(-1.0, -2.0)[None], t(-1.5, -1.0)[None], t(1.0, 1.0)[None]
    torch.testing.assert_close(truncated_is_weights(old, rollout, mask, cap=1.5), t(1.5, math.exp(-1.0))[None])
    torch.testing.assert_close(truncated_is_weights(old, rollout, mask, cap=2.0, sequence=True),
                               t(math.exp(-0.25))[None])
    # in the loss: the policy term is weighted token by token, the KL term is not
    logprobs = leaf(-1.0, -2.0)
    loss, m = grpo_loss(logprobs[None], None, None, t(1.0), mask, rollout_logprobs=rollout, tis_cap=1.5)
    assert loss.item() == pytest.approx(-(1.5 + math.exp(-1.0)) / 2)
    assert m["tis_weight"].item() == pytest.approx((1.5 + math.exp(-1.0)) / 2)


def test_dynamic_sampling_finds_the_groups_that_teach_something():
    assert informative_groups(t(1, 1, 1, 0, 1, 0, 0.5, 0.5, 0.5), 3).tolist() == [False, True, False]


def test_overlong_penalty_ramps_down_over_the_buffer():
    lengths = torch.tensor([5, 6, 8, 10, 11])
    assert overlong_penalty(lengths, max_len=10, buffer=4).tolist() == [0.0, 0.0, -0.5, -1.0, -1.0]
    assert overlong_penalty(lengths, max_len=10, buffer=4, penalty=0.5).tolist()[2] == -0.25
    assert overlong_penalty(lengths, max_len=10, buffer=0).tolist() == [0.0] * 5


def test_token_mean_divides_by_the_steps_token_count():
    token_loss = t(1.0, 2.0, 0.0, 4.0, 4.0, 4.0).view(2, 3)
    mask = t(1, 1, 0, 1, 1, 1).view(2, 3)
    assert aggregate_loss(token_loss, mask, "token-mean", num_tokens=7.5).item() == pytest.approx(15 / 7.5)
    assert aggregate_loss(token_loss, mask, "bnpo", num_tokens=7.5).item() == pytest.approx(15 / 5)
    assert aggregate_loss(token_loss, mask, "token-mean").item() == pytest.approx(15 / 5)


def test_unknown_loss_type_is_an_error():
    with pytest.raises(ValueError, match="loss_type must be one of"):
        grpo_loss(t(0.0)[None], None, None, t(1.0), t(1.0)[None], loss_type="ppo2")
