"""The gradient of one GRPO / PPO optimizer step over a fixed rollout buffer, through the loop's forward_backward,
for test_rl_batches.py; run alone (1 process) or under torchrun (the rows split between the processes).

    python tests/rl_ddp.py OUT.safetensors MICRO_BATCH LOSS_AGG
    torchrun --standalone --nproc_per_node=2 tests/rl_ddp.py OUT.safetensors MICRO_BATCH LOSS_AGG
"""

import sys
from copy import deepcopy
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

from lmforge.model import ModelConfig, Transformer
from lmforge.rollout import RolloutStream, grpo_loss_fn, pack_rollout, policy_scores, score_buffer
from lmforge.stages.grpo import GRPOConfig
from lmforge.train.dist import cleanup, init_distributed, wrap_model
from lmforge.train.loop import TrainConfig, default_token_count, forward_backward

ROWS = 8  # completions of very uneven lengths: a micro-batch mean and the step's mean differ a lot
PROMPTS = [[1 + i % 5] * (1 + i % 3) for i in range(ROWS)]
COMPLETIONS = [[2 + (i * 7 + j) % 13 for j in range(1 + (i * 5) % 11)] for i in range(ROWS)]
ADVANTAGES = torch.tensor([1.0, -0.5, 2.0, -1.0, 0.25, -2.0, 0.5, -0.75])


def tiny_policy() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))


def buffer_of(rows: list[int], policy, ref) -> dict:
    buffer = pack_rollout([PROMPTS[i] for i in rows], [COMPLETIONS[i] for i in rows], 0)
    everything = [torch.arange(len(rows))]
    buffer["old_logprobs"] = score_buffer(policy_scores(policy), buffer, everything, "cpu")["logprobs"]
    buffer["ref_logprobs"] = score_buffer(policy_scores(ref), buffer, everything, "cpu")["logprobs"] - 0.1
    buffer["advantages"] = ADVANTAGES[rows]
    return buffer


def step_gradient(micro: int, loss_agg: str, loss_type: str = "grpo") -> dict[str, torch.Tensor]:
    """One optimizer step's gradients (averaged over processes, as DDP leaves them) on this process's rows."""
    dist = init_distributed("cpu")
    policy = tiny_policy()
    ref = deepcopy(policy).requires_grad_(False)
    rows = list(range(dist.rank, ROWS, dist.world_size))
    cfg = GRPOConfig(loss_agg=loss_agg, loss_type=loss_type, beta=0.04, epochs=2, clip_eps=0.2,
                     train=TrainConfig(batch_size=ROWS, micro_batch_size=micro, device="cpu"))
    accum = cfg.train.accumulation(dist.world_size)
    buffer = buffer_of(rows, policy, ref)
    stream = RolloutStream(lambda it, plan: (buffer, {}), epochs=1, micro_batch_size=micro, seed=0,
                           accumulation=accum)
    wrapped = wrap_model(policy, dist, "ddp")
    state = SimpleNamespace(cfg=cfg.train, dist=dist, train_data=stream, step=0, max_steps=1, flops_per_token=0.0,
                            model=policy, wrapped=wrapped, fwd_model=wrapped)
    torch.manual_seed(1)  # the same on every process
    with torch.no_grad():  # move the policy off pi_old, so the ratios and clipping are not trivial
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    forward_backward(state, grpo_loss_fn(cfg), accum, default_token_count)
    return {name: p.grad.clone() for name, p in policy.named_parameters()}


if __name__ == "__main__":
    grads = step_gradient(int(sys.argv[2]), sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "grpo")
    if init_distributed("cpu").is_main:
        save_file(grads, sys.argv[1])
    cleanup()
