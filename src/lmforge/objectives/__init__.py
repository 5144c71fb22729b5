"""Losses as pure functions: tensors in, ``(loss, metrics)`` (or a tensor) out, the math in each docstring."""

from lmforge.objectives.lm import (
    chunked_cross_entropy,
    chunked_token_logprobs,
    fused_linear_cross_entropy,
    sequence_logprobs,
    token_logprobs,
)
from lmforge.objectives.preference import (
    bradley_terry_loss,
    dpo_loss,
    implicit_reward,
    kto_loss,
    orpo_loss,
    simpo_loss,
)
from lmforge.objectives.rl import (
    adaptive_kl_controller,
    aggregate_loss,
    entropy_from_logits,
    gae,
    grpo_advantages,
    grpo_loss,
    kl_estimate,
    kl_regularised_optimum,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_advantages,
    whiten,
)

__all__ = [
    "adaptive_kl_controller",
    "aggregate_loss",
    "bradley_terry_loss",
    "chunked_cross_entropy",
    "chunked_token_logprobs",
    "dpo_loss",
    "entropy_from_logits",
    "fused_linear_cross_entropy",
    "gae",
    "grpo_advantages",
    "grpo_loss",
    "implicit_reward",
    "kl_estimate",
    "kl_regularised_optimum",
    "kto_loss",
    "masked_mean",
    "orpo_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "rloo_advantages",
    "sequence_logprobs",
    "simpo_loss",
    "token_logprobs",
    "whiten",
]
