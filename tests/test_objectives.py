"""Objectives against hand-computed values: every expected number is written out with math.log / math.exp."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.objectives import (
    adaptive_kl_controller,
    aggregate_loss,
    bradley_terry_loss,
    chunked_cross_entropy,
    chunked_token_logprobs,
    dpo_loss,
    entropy_from_logits,
    gae,
    grpo_advantages,
    grpo_loss,
    implicit_reward,
    kl_estimate,
    kl_regularised_optimum,
    kto_loss,
    orpo_loss,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_advantages,
    sequence_logprobs,
    simpo_loss,
    token_logprobs,
    whiten,
)
from lmforge.objectives.rl import process_advantages, process_token_rewards


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def softplus(x):  # -log sigma(-x) = log(1 + e^x)
    return math.log(1 + math.exp(x))


def leaf(*xs):
    return t(*xs).requires_grad_()


# ---------------------------------------------------------------- lm.py


def _ce_case(seed=0, n=13, d=8, v=37):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) * 0.5
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[1, 6, n - 1]] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunked_cross_entropy_matches_full_logits(reduction):
    hidden, weight, labels = _ce_case()
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ours = chunked_cross_entropy(h1, w1, labels, chunk_size=5, reduction=reduction)  # 5 does not divide 13
    ref = F.cross_entropy(h2 @ w2.T, labels, reduction=reduction)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    upstream = torch.linspace(0.5, 1.5, 13) if reduction == "none" else torch.tensor(0.7)
    (ours * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-5, rtol=1e-5)


def test_chunked_cross_entropy_batched_shape_and_no_grad():
    hidden, weight, labels = _ce_case(seed=1, n=12)
    ours = chunked_cross_entropy(hidden.view(3, 4, -1), weight, labels.view(3, 4), chunk_size=5, reduction="none")
    assert ours.shape == (3, 4)
    torch.testing.assert_close(ours.flatten(), F.cross_entropy(hidden @ weight.T, labels, reduction="none"))
    with torch.no_grad():  # no gradient buffers are built, the value is the same
        value = chunked_cross_entropy(hidden.requires_grad_(), weight, labels, chunk_size=5)
    torch.testing.assert_close(value, F.cross_entropy(hidden @ weight.T, labels))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunked_cross_entropy_all_ignored_is_zero_without_nan(reduction):
    hidden, weight, _ = _ce_case()
    hidden.requires_grad_()
    weight.requires_grad_()
    labels = torch.full((13,), -100)
    loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=4, reduction=reduction)
    assert torch.all(loss == 0)
    loss.sum().backward()
    assert torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)


@pytest.mark.parametrize("keep_limit", [0, 2**30])  # rebuild the softmax in backward, or keep it
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_token_logprobs_gradients_entropy_and_temperature(keep_limit, temperature):
    """Against autograd through full fp64 logits: log-probs, entropies, and both gradients, for either backward."""
    hidden, weight, labels = _ce_case(seed=3)
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    log_p = (h @ w.T / temperature).log_softmax(-1)
    valid = labels != -100
    expected = torch.where(valid, log_p.gather(1, labels.clamp(min=0)[:, None]).squeeze(1), 0.0)
    expected_entropy = torch.where(valid, -(log_p.exp() * log_p).sum(-1), 0.0)
    g = torch.linspace(-1, 2, len(labels), dtype=torch.float64)
    (expected * g).sum().backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, entropy = chunked_token_logprobs(h2, w2, labels, chunk_size=4, temperature=temperature,
                                           return_entropy=True, keep_limit=keep_limit)
    assert not entropy.requires_grad and logp.dtype == torch.float32
    (logp * g.float()).sum().backward()
    torch.testing.assert_close(logp, expected.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, expected_entropy.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h2.grad, h.grad.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w2.grad, w.grad.float(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the rollout scores without grad: bit-identical numbers, so the first PPO ratio is 1
        assert torch.equal(chunked_token_logprobs(hidden, weight, labels, chunk_size=4, temperature=temperature),
                           logp.detach())


def test_token_logprobs_and_chunked_token_logprobs():
    hidden, weight, labels = _ce_case(seed=2)
    logits = hidden @ weight.T
    expected = torch.log_softmax(logits, -1).gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    expected = torch.where(labels == -100, 0.0, expected)
    torch.testing.assert_close(token_logprobs(logits, labels, chunk_size=4), expected)
    torch.testing.assert_close(chunked_token_logprobs(hidden, weight, labels, chunk_size=4), expected)
    # bf16 logits: the result is fp32, computed from the upcast logits
    lp = token_logprobs(logits.bfloat16(), labels)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, token_logprobs(logits.bfloat16().float(), labels))
    # differentiable through the checkpointed chunks
    x = logits.clone().requires_grad_()
    token_logprobs(x, labels, chunk_size=4).sum().backward()
    y = logits.clone().requires_grad_()
    expected_y = torch.log_softmax(y, -1).gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    (expected_y * (labels != -100)).sum().backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_sequence_logprobs_sum_and_mean():
    logps = t(-1.0, -2.0, -3.0, -9.0)
    mask = t(1, 1, 1, 0)
    assert sequence_logprobs(logps, mask).item() == pytest.approx(-6.0)
    assert sequence_logprobs(logps, mask, average=True).item() == pytest.approx(-2.0)
    assert sequence_logprobs(logps, torch.zeros(4), average=True).item() == 0.0


# ---------------------------------------------------------------- preference.py


def test_bradley_terry_hand_value():
    loss, m = bradley_terry_loss(t(2.5), t(1.0))
    sigma = 1 / (1 + math.exp(-1.5))
    assert sigma == pytest.approx(0.8176, abs=1e-4)
    assert loss.item() == pytest.approx(-math.log(sigma)) and loss.item() == pytest.approx(0.2014, abs=1e-4)
    assert m["accuracy"].item() == 1.0 and m["margin"].item() == pytest.approx(1.5)
    assert m["rewards/chosen"].item() == 2.5 and m["rewards/rejected"].item() == 1.0
    loss_m, _ = bradley_terry_loss(t(2.5), t(1.0), margin=0.5)
    assert loss_m.item() == pytest.approx(softplus(-1.0))


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("robust", 0.2), ("cdpo", 0.0), ("cdpo", 0.3),
                                           ("sigmoid", 0.45)])
def test_dpo_is_ln2_when_policy_equals_reference(beta, loss_type, eps):
    logps = t(-3.0, -7.5)
    loss, m = dpo_loss(logps, logps - 1, logps, logps - 1, beta=beta, loss_type=loss_type, label_smoothing=eps)
    assert loss.item() == pytest.approx(math.log(2))
    assert m["rewards/margins"].item() == 0.0


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_and_hinge_value_at_h_zero(beta):
    logps = t(-3.0, -7.5)
    ipo, _ = dpo_loss(logps, logps, logps, logps, beta=beta, loss_type="ipo")
    hinge, _ = dpo_loss(logps, logps, logps, logps, beta=beta, loss_type="hinge")
    assert ipo.item() == pytest.approx(1 / (4 * beta**2))
    assert hinge.item() == pytest.approx(1.0)


def _dpo_example(loss_type, **kw):
    # h = (-10 - -11) - (-12 - -11) = 1 - (-1) = 2
    return dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.1, loss_type=loss_type, **kw)


def test_dpo_loss_types_hand_values():
    bh = 0.1 * 2  # beta * h
    assert _dpo_example("sigmoid")[0].item() == pytest.approx(math.log(1 + math.exp(-bh)))
    eps = 0.1
    cdpo = (1 - eps) * math.log(1 + math.exp(-bh)) + eps * math.log(1 + math.exp(bh))
    assert _dpo_example("cdpo", label_smoothing=eps)[0].item() == pytest.approx(cdpo)
    assert _dpo_example("sigmoid", label_smoothing=eps)[0].item() == pytest.approx(cdpo)
    robust = ((1 - eps) * math.log(1 + math.exp(-bh)) - eps * math.log(1 + math.exp(bh))) / (1 - 2 * eps)
    assert _dpo_example("robust", label_smoothing=eps)[0].item() == pytest.approx(robust)
    assert _dpo_example("ipo")[0].item() == pytest.approx((2 - 1 / (2 * 0.1)) ** 2)  # (2 - 5)^2 = 9
    assert _dpo_example("ipo", label_smoothing=eps)[0].item() == pytest.approx((2 - 0.8 / 0.2) ** 2)  # target 4
    assert _dpo_example("hinge")[0].item() == pytest.approx(1 - bh)  # relu(0.8)
    hinge_soft = (1 - eps) * (1 - bh) + eps * (1 + bh)
    assert _dpo_example("hinge", label_smoothing=eps)[0].item() == pytest.approx(hinge_soft)
    # IPO on length-averaged log-probs: chosen ratio (-10 + 11)/2 = 0.5, rejected (-12 + 11)/4 = -0.25
    ipo_avg, m = _dpo_example("ipo", chosen_lengths=t(2.0), rejected_lengths=t(4.0))
    assert ipo_avg.item() == pytest.approx((0.75 - 5) ** 2)
    assert m["rewards/chosen"].item() == pytest.approx(0.05)


def test_dpo_metrics_and_per_pair_soft_labels():
    loss, m = _dpo_example("sigmoid")
    assert m["rewards/chosen"].item() == pytest.approx(0.1) and m["rewards/rejected"].item() == pytest.approx(-0.1)
    assert m["rewards/margins"].item() == pytest.approx(0.2) and m["rewards/accuracies"].item() == 1.0
    assert m["logps/chosen"].item() == -10.0 and m["logps/rejected"].item() == -12.0
    # two pairs, both h = 2; soft labels 0 and 0.5 (a judge that cannot tell the second pair apart)
    pc, pr, rc, rr = t(-10.0, -10.0), t(-12.0, -12.0), t(-11.0, -11.0), t(-11.0, -11.0)
    soft, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=t(0.0, 0.5))
    first = math.log(1 + math.exp(-0.2))
    second = 0.5 * math.log(1 + math.exp(-0.2)) + 0.5 * math.log(1 + math.exp(0.2))
    assert soft.item() == pytest.approx((first + second) / 2)
    with pytest.raises(ValueError):
        _dpo_example("nope")


def _grad_signs(loss_fn):
    chosen, rejected = leaf(-10.0), leaf(-12.0)
    loss = loss_fn(chosen, rejected)
    loss.backward()
    return chosen.grad.item(), rejected.grad.item()


@pytest.mark.parametrize("name,fn", [
    ("dpo", lambda c, r: dpo_loss(c, r, t(-11.0), t(-11.0))[0]),
    ("ipo_below_target", lambda c, r: dpo_loss(c, r, t(-11.0), t(-11.0), loss_type="ipo")[0]),  # h=2 < 5
    ("simpo", lambda c, r: simpo_loss(c, r, t(5.0), t(6.0))[0]),
    ("orpo", lambda c, r: orpo_loss(c, r, t(5.0), t(6.0), t(2.0))[0]),
    ("hinge", lambda c, r: dpo_loss(c, r, t(-11.0), t(-11.0), loss_type="hinge")[0]),  # beta h = 0.2 < 1
    ("robust", lambda c, r: dpo_loss(c, r, t(-11.0), t(-11.0), loss_type="robust", label_smoothing=0.1)[0]),
    ("cdpo", lambda c, r: dpo_loss(c, r, t(-11.0), t(-11.0), loss_type="cdpo", label_smoothing=0.1)[0]),
    ("kto", lambda c, r: kto_loss(torch.cat([c, r]), t(-11.0, -11.0), torch.tensor([True, False]), 0.0)[0]),
])
def test_gradient_pushes_chosen_up_and_rejected_down(name, fn):
    d_chosen, d_rejected = _grad_signs(fn)
    assert d_chosen < 0 < d_rejected, name


def test_simpo_hand_value():
    # avg logps: -6/3 = -2 and -12/4 = -3; z = 2*(-2) - 2*(-3) - 0.5 = 1.5
    loss, m = simpo_loss(t(-6.0), t(-12.0), t(3.0), t(4.0), beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.5)))
    assert m["rewards/chosen"].item() == pytest.approx(-4.0) and m["rewards/margins"].item() == pytest.approx(2.0)
    smooth, _ = simpo_loss(t(-6.0), t(-12.0), t(3.0), t(4.0), beta=2.0, gamma=0.5, label_smoothing=0.2)
    assert smooth.item() == pytest.approx(0.8 * math.log(1 + math.exp(-1.5)) + 0.2 * math.log(1 + math.exp(1.5)))


def test_orpo_hand_value_and_stability():
    # avg logps: -2/4 = -0.5 and -6/3 = -2
    loss, m = orpo_loss(t(-2.0), t(-6.0), t(4.0), t(3.0), chosen_nll=t(1.3), lambda_=0.1)
    odds_w = -0.5 - math.log(1 - math.exp(-0.5))
    odds_l = -2.0 - math.log(1 - math.exp(-2.0))
    log_sig = -math.log(1 + math.exp(-(odds_w - odds_l)))
    assert loss.item() == pytest.approx(1.3 - 0.1 * log_sig)
    assert m["log_odds_chosen"].item() == pytest.approx(odds_w - odds_l)
    assert m["log_odds_ratio"].item() == pytest.approx(log_sig)
    assert m["nll_loss"].item() == pytest.approx(1.3)
    # p -> 1 (avg logp ~ 0) and p -> 0 (avg logp very negative): finite loss and gradients
    c, r = leaf(-1e-12, -1e-3), leaf(-400.0, -1e-4)
    loss, _ = orpo_loss(c, r, t(1.0, 2.0), t(1.0, 2.0), t(0.5))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()


def test_kto_hand_value():
    # r = [-5 - -6, -8 - -7] = [1, -1]; z0 = 0.3
    policy, ref, labels = t(-5.0, -8.0), t(-6.0, -7.0), torch.tensor([True, False])
    loss, m = kto_loss(policy, ref, labels, kl_estimate=0.3, beta=0.1, undesirable_weight=2.0)
    desirable = 1 - 1 / (1 + math.exp(-0.1 * (1 - 0.3)))
    undesirable = 2.0 * (1 - 1 / (1 + math.exp(-0.1 * (0.3 + 1))))
    assert loss.item() == pytest.approx((desirable + undesirable) / 2)
    assert m["rewards/chosen"].item() == pytest.approx(0.1) and m["rewards/rejected"].item() == pytest.approx(-0.1)
    assert m["kl"].item() == pytest.approx(0.3)
    # a negative KL estimate is clamped to 0, and an empty group gives finite metrics
    loss0, m0 = kto_loss(policy, ref, torch.tensor([True, True]), kl_estimate=-1.0, beta=0.1)
    expected = ((1 - 1 / (1 + math.exp(-0.1))) + (1 - 1 / (1 + math.exp(0.1)))) / 2
    assert loss0.item() == pytest.approx(expected)
    assert m0["kl"].item() == 0.0 and m0["rewards/rejected"].item() == 0.0
    assert all(torch.isfinite(v) for v in m0.values())


def test_implicit_reward():
    assert implicit_reward(t(-3.0), t(-5.0), beta=0.5).item() == pytest.approx(1.0)


# ---------------------------------------------------------------- rl.py


def test_kl_estimators_are_unbiased_under_exact_expectation():
    p, q = t(0.2, 0.5, 0.3), t(0.4, 0.4, 0.2)
    kl = 0.2 * math.log(0.2 / 0.4) + 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.2)
    for kind in ("k1", "k3"):
        assert (p * kl_estimate(p.log(), q.log(), kind)).sum().item() == pytest.approx(kl)
    assert torch.all(kl_estimate(p.log(), q.log(), "k3") >= 0)
    k2 = (p * kl_estimate(p.log(), q.log(), "k2")).sum().item()
    assert k2 == pytest.approx(0.5 * sum(pi * math.log(qi / pi) ** 2 for pi, qi in zip([0.2, 0.5, 0.3],
                                                                                      [0.4, 0.4, 0.2])))


def test_gae_three_step_hand_example():
    gamma, lam = 0.9, 0.8
    rewards = t(0.0, 0.0, 1.0, 7.0)[None]  # last position is padding: its reward and value must be ignored
    values = t(0.5, 0.4, 0.3, 9.0)[None]
    mask = t(1, 1, 1, 0)[None]
    adv, ret = gae(rewards, values, mask, gamma, lam)
    d2 = 1.0 + gamma * 0.0 - 0.3  # last valid token bootstraps with 0
    a2 = d2
    d1 = 0.0 + gamma * 0.3 - 0.4
    a1 = d1 + gamma * lam * a2
    d0 = 0.0 + gamma * 0.4 - 0.5
    a0 = d0 + gamma * lam * a1
    torch.testing.assert_close(adv, t(a0, a1, a2, 0.0)[None])
    torch.testing.assert_close(ret, t(a0 + 0.5, a1 + 0.4, a2 + 0.3, 0.0)[None])
    assert a0 == pytest.approx(0.12928)


def test_whiten_masked():
    x = t(1.0, 2.0, 3.0, 100.0)
    mask = t(1, 1, 1, 0)
    w = whiten(x, mask)
    assert w[3].item() == 0.0
    torch.testing.assert_close(w[:3], t(-1.0, 0.0, 1.0), atol=1e-6, rtol=0)  # mean 2, unbiased std 1
    torch.testing.assert_close(whiten(x, mask, shift_mean=False)[:3], t(1.0, 2.0, 3.0), atol=1e-6, rtol=0)


def test_ppo_policy_loss_zero_gradient_when_clipped():
    # ratios 1.5, 1.5, 0.5, 0.5 with advantages +1, -1, -1, +1: the 1st and 3rd are clipped
    old = t(0.0, 0.0, 0.0, 0.0)
    logprobs = leaf(math.log(1.5), math.log(1.5), math.log(0.5), math.log(0.5))
    adv = t(1.0, -1.0, -1.0, 1.0)
    mask = torch.ones(4, dtype=torch.float64)
    loss, m = ppo_policy_loss(logprobs[None], old[None], adv[None], mask[None], clip_eps=0.2)
    loss.backward()
    g = logprobs.grad
    assert g[0].item() == 0.0 and g[2].item() == 0.0
    assert g[1].item() != 0.0 and g[3].item() != 0.0
    # values: -min(rho A, clip(rho) A): -1.2, 1.5, 0.8, -0.5
    assert loss.item() == pytest.approx((-1.2 + 1.5 + 0.8 - 0.5) / 4)
    assert m["clipfrac"].item() == 0.5 and m["ratio_mean"].item() == pytest.approx(1.0)
    approx_kl = 2 * (1.5 - 1 - math.log(1.5)) + 2 * (0.5 - 1 - math.log(0.5))
    assert m["approx_kl"].item() == pytest.approx(approx_kl / 4)


def test_ppo_clip_higher_lets_positive_tokens_grow():
    logprobs = leaf(math.log(1.25))
    loss, m = ppo_policy_loss(logprobs[None], t(0.0)[None], t(1.0)[None], t(1.0)[None],
                              clip_eps=0.2, clip_eps_high=0.28)
    loss.backward()
    assert logprobs.grad.item() == pytest.approx(-1.25) and m["clipfrac"].item() == 0.0


def test_ppo_value_loss_clipping():
    values, old, returns, mask = leaf(1.0, 0.0), t(0.5, 0.0), t(0.0, 0.3), t(1.0, 1.0)
    loss, m = ppo_value_loss(values[None], old[None], returns[None], mask[None], clip_range=0.2)
    # token 0: unclipped (1-0)^2 = 1, clipped (0.7-0)^2 = 0.49 -> 1; token 1: both (0-0.3)^2 = 0.09
    assert loss.item() == pytest.approx(0.5 * (1.0 + 0.09) / 2)
    assert m["vf_clipfrac"].item() == 0.0
    loss.backward()
    assert values.grad[0].item() == pytest.approx(0.5)  # d/dV of 0.5 * (V - R)^2 / 2 tokens


def test_loss_aggregations():
    token_loss = t(1.0, 2.0, 0.0, 4.0, 4.0, 4.0).view(2, 3)
    mask = t(1, 1, 0, 1, 1, 1).view(2, 3)
    assert aggregate_loss(token_loss, mask, "token-mean").item() == pytest.approx(15 / 5)
    assert aggregate_loss(token_loss, mask, "seq-mean-token-sum").item() == pytest.approx((3 + 12) / 2)
    assert aggregate_loss(token_loss, mask, "seq-mean-token-mean").item() == pytest.approx((1.5 + 4) / 2)
    assert aggregate_loss(token_loss, mask, "dr_grpo").item() == pytest.approx(15 / (2 * 3))
    assert aggregate_loss(token_loss, mask, "dr_grpo", max_len=10).item() == pytest.approx(15 / 20)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_advantages_sum_to_zero_per_group(scale):
    rewards = t(1.0, 0.0, 0.0, 1.0, 0.5, 0.25, 3.0, 3.0, 2.0)
    adv = grpo_advantages(rewards, group_size=3, scale=scale)
    torch.testing.assert_close(adv.view(3, 3).sum(1), torch.zeros(3, dtype=torch.float64))
    if scale == "group":  # group (1, 0, 0): mean 1/3, unbiased std sqrt(1/3)
        assert adv[0].item() == pytest.approx((2 / 3) / (math.sqrt(1 / 3) + 1e-4))


def test_rloo_hand_example():
    adv = rloo_advantages(t(1.0, 2.0, 6.0), group_size=3)
    torch.testing.assert_close(adv, t(1 - (2 + 6) / 2, 2 - (1 + 6) / 2, 6 - (1 + 2) / 2))  # -3, -1.5, 4.5


def test_grpo_loss_on_policy_and_kl_term():
    logprobs = leaf(-1.0, -2.0, -0.5, -0.7)
    mask = t(1, 1, 1, 0).view(2, 2)
    adv = t(1.0, -2.0)
    loss, m = grpo_loss(logprobs.view(2, 2), None, None, adv, mask, beta=0.04)
    # ratio 1 everywhere: loss = -mean_token A = -(1 + 1 - 2) / 3
    assert loss.item() == pytest.approx(0.0) and "kl" not in m
    loss.backward()
    torch.testing.assert_close(logprobs.grad, t(-1 / 3, -1 / 3, 2 / 3, 0.0))
    ref = t(-1.0, -2.0, -0.5 - math.log(2), 0.0).view(2, 2)  # pi_ref = pi / 2 on the third token
    loss_kl, m_kl = grpo_loss(logprobs.view(2, 2).detach(), None, ref, adv, mask, beta=0.04,
                              loss_agg="seq-mean-token-mean")
    k3 = 0.5 - 1 - math.log(0.5)
    assert m_kl["kl"].item() == pytest.approx(k3 / 3)
    assert loss_kl.item() == pytest.approx((-1.0 + (2.0 + 0.04 * k3)) / 2)


def test_entropy_from_logits():
    logits = torch.zeros(2, 3, 4)
    logits[1, 2] = torch.tensor([0.0, math.log(3), -1e4, -1e4])  # probs 1/4, 3/4
    h = entropy_from_logits(logits, chunk_size=4)
    assert h[0, 0].item() == pytest.approx(math.log(4), abs=1e-6)
    assert h[1, 2].item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-6)
    mask = torch.tensor([[1, 0, 0], [0, 0, 0]])
    assert entropy_from_logits(logits, mask).item() == pytest.approx(math.log(4), abs=1e-6)


def test_adaptive_kl_controller():
    # KL 12 vs target 6: error (12 - 6)/6 = 1 clipped to 0.2
    assert adaptive_kl_controller(0.1, 12.0, 6.0, 256, 10000) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    assert adaptive_kl_controller(0.1, 5.4, 6.0, 100, 1000) == pytest.approx(0.1 * (1 - 0.1 * 100 / 1000))


def test_kl_regularised_optimum_closed_form_and_gradient_descent():
    pi_ref, rewards, beta = t(0.6, 0.4), t(1.0, 3.0), 2.0
    z = 0.6 * math.exp(1 / 2) + 0.4 * math.exp(3 / 2)
    expected = t(0.6 * math.exp(1 / 2) / z, 0.4 * math.exp(3 / 2) / z)
    optimum = kl_regularised_optimum(pi_ref, rewards, beta)
    torch.testing.assert_close(optimum, expected)
    torch.testing.assert_close(optimum, t(0.355, 0.645), atol=1e-3, rtol=0)
    # gradient descent on -(E_pi[r] - beta KL(pi || pi_ref)) with exact expectations over the 2 actions
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=1.0)
    for _ in range(300):
        log_pi = torch.log_softmax(theta, -1)
        pi = log_pi.exp()
        objective = (pi * rewards).sum() - beta * (pi * kl_estimate(log_pi, pi_ref.log(), "k1")).sum()
        opt.zero_grad()
        (-objective).backward()
        opt.step()
    assert torch.allclose(torch.softmax(theta, -1).detach(), optimum, atol=0.01)


def test_process_advantages_by_hand():
    """Two completions in a group: step rewards [1, 0] ending at tokens 1 and 3, and [1] ending at token 2.
    Group rewards {1, 0, 1}: mean 2/3, std (unbiased) sqrt(1/3); token t gets the normalised rewards of the
    steps ending at or after t."""
    adv = process_advantages([[1.0, 0.0], [1.0]], [[1, 3], [2]], group_size=2, length=5, eps=0.0)
    hi, lo = (1 - 2 / 3) / math.sqrt(1 / 3), (0 - 2 / 3) / math.sqrt(1 / 3)
    expected = torch.tensor([[hi + lo, hi + lo, lo, lo, 0.0], [hi, hi, hi, 0.0, 0.0]])
    torch.testing.assert_close(adv, expected)
    assert process_advantages([[0.5], [0.5]], [[0], [0]], 2, 3).abs().sum() == 0  # equal rewards: nothing


def test_process_token_rewards_by_hand_and_gae_over_them_is_grpos_process_advantage():
    """The same steps as above: each normalised step reward is paid at its step's last token (an end past the
    row lands on the last column); GAE with gamma = lam = 1 and zero values sums them from the end, which is
    GRPO's process advantage for a buffer that is one group."""
    rewards = process_token_rewards([[1.0, 0.0], [1.0]], [[1, 3], [2]], length=5, eps=0.0)
    hi, lo = (1 - 2 / 3) / math.sqrt(1 / 3), (0 - 2 / 3) / math.sqrt(1 / 3)
    torch.testing.assert_close(rewards, torch.tensor([[0.0, hi, 0.0, lo, 0.0], [0.0, 0.0, hi, 0.0, 0.0]]))
    assert process_token_rewards([[1.0, 0.0]], [[1, 9]], length=4)[0, 3] < 0  # clamped to the last column
    assert process_token_rewards([[0.7]], [[0]], length=3).abs().sum() == 0  # one step reward: no std
    mask = torch.ones(2, 5)
    advantages, _ = gae(rewards, torch.zeros(2, 5), mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(advantages, process_advantages([[1.0, 0.0], [1.0]], [[1, 3], [2]], 2, 5, eps=0.0))
