"""Reward sources behind one interface: ``reward(RewardInput) -> (N,) tensor``, and weighted sums of them.

    math     1 when the completion's final answer equals the gold answer (answers.is_correct), else 0
    format   1 when the completion ends properly (a stop, not the length limit) and matches ``pattern``
             (default: it ends with the arithmetic world's "The answer is X." line), else 0
    length   the completion's length in tokens (weight < 0: a length penalty; weight > 0: a flawed reward
             that pays for rambling, see recipes/reward_hacking.yaml)
    concise  a length term relative to the group (Kimi k1.5's length reward, in the spirit of TOPS): within the
             completions of one prompt, lambda = 0.5 - (L - L_min) / (L_max - L_min); a right answer gets lambda
             (the shortest right one gains most), a wrong one min(0, lambda); all lengths equal: 0
    model    a trained reward model's scalar (its ``score`` head at the last token of prompt + completion)

A recipe lists them with weights, ``rewards: [{kind: math, weight: 1.0}, {kind: length, weight: -0.01}]``;
the total is sum_k w_k r_k and every part is reported on its own (``rewards/math/mean``, ...).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from lmforge.answers import ANSWER_PREFIX, is_correct
from lmforge.modelio import load_model_dir
from lmforge.scoring import reward_scores

KINDS = ("math", "format", "length", "concise", "model")
DEFAULT_FORMAT = rf"{ANSWER_PREFIX} [^\n]+\.\s*$"


@dataclass
class RewardSpec:
    kind: Literal["math", "format", "length", "concise", "model"] = "math"
    weight: float = 1.0
    path: str = ""  # model: the reward model directory
    pattern: str = ""  # format: regex a well-formed completion matches (re.search); empty = DEFAULT_FORMAT

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"reward kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "model" and not self.path:
            raise ValueError("a 'model' reward needs path: the reward model directory")


@dataclass
class RewardInput:
    """What a reward sees for N completions (the G samples of a prompt are contiguous)."""
    prompts: list[str]  # the prompt as the user wrote it (before the chat template)
    completions: list[str]  # decoded completion text, special tokens skipped
    answers: list[str | None]  # gold answers (None when the data has none)
    prompt_ids: list[list[int]]  # the rendered prompt the policy saw
    completion_ids: list[list[int]]  # including a final stop token
    finish_reasons: list[str] = field(default_factory=list)  # "stop" or "length"


RewardFn = Callable[[RewardInput], torch.Tensor]


def math_reward(inp: RewardInput) -> torch.Tensor:
    if any(a is None for a in inp.answers):
        raise ValueError("the math reward needs an answer for every prompt")
    return torch.tensor([float(is_correct(c, a)) for c, a in zip(inp.completions, inp.answers)])


def format_reward(pattern: str = "") -> RewardFn:
    regex = re.compile(pattern or DEFAULT_FORMAT)

    def reward(inp: RewardInput) -> torch.Tensor:
        finished = inp.finish_reasons or ["stop"] * len(inp.completions)
        return torch.tensor([float(f == "stop" and regex.search(c) is not None)
                             for c, f in zip(inp.completions, finished)])
    return reward


def length_reward(inp: RewardInput) -> torch.Tensor:
    return torch.tensor([float(len(ids)) for ids in inp.completion_ids])


def group_length_reward(lengths: list[int], correct: list[bool], groups: list[int]) -> torch.Tensor:
    """Kimi k1.5's length reward (Kimi Team 2025), relative to each group (``groups[i]``: completion i's group).

        lambda_i = 0.5 - (L_i - min_g L) / (max_g L - min_g L)      (0 when every length in the group is equal)
        r_i = lambda_i if completion i is right, else min(0, lambda_i)

    With a weight below 1 beside a 0/1 correctness reward, a right answer always outscores a wrong one, and among
    right answers the shortest gains most: the policy learns to think as long as a problem needs, and no longer.
    """
    out = []
    for i, (length, ok) in enumerate(zip(lengths, correct, strict=True)):
        mates = [lengths[j] for j in range(len(lengths)) if groups[j] == groups[i]]
        lo, hi = min(mates), max(mates)
        lam = 0.5 - (length - lo) / (hi - lo) if hi > lo else 0.0
        out.append(lam if ok else min(0.0, lam))
    return torch.tensor(out)


def prompt_groups(prompt_ids: list[list[int]]) -> list[int]:
    """Group index of each completion: runs of the same prompt (the G samples of a prompt are contiguous)."""
    groups, g = [], -1
    for i, p in enumerate(prompt_ids):
        if i == 0 or p != prompt_ids[i - 1]:
            g += 1
        groups.append(g)
    return groups


def concise_reward(inp: RewardInput) -> torch.Tensor:
    if any(a is None for a in inp.answers):
        raise ValueError("the concise reward needs an answer for every prompt")
    correct = [is_correct(c, a) for c, a in zip(inp.completions, inp.answers)]
    return group_length_reward([len(ids) for ids in inp.completion_ids], correct, prompt_groups(inp.prompt_ids))


def model_reward(reward_model, pad_id: int, batch_size: int = 16) -> RewardFn:
    """A reward model's scalar read at the last token of prompt + completion (scoring.reward_scores)."""
    def reward(inp: RewardInput) -> torch.Tensor:
        return torch.tensor(reward_scores(reward_model, list(zip(inp.prompt_ids, inp.completion_ids)), pad_id,
                                          batch_size))
    return reward


class CombinedReward:
    """sum_k w_k r_k over named parts; ``__call__`` returns (total (N,), {name: (N,) unweighted part})."""

    def __init__(self, parts: list[tuple[str, float, RewardFn]]):
        if not parts:
            raise ValueError("at least one reward is needed")
        self.parts = parts

    def __call__(self, inp: RewardInput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        values = {name: fn(inp).float().reshape(-1) for name, _, fn in self.parts}
        total = sum(w * values[name] for name, w, _ in self.parts)
        return total, values

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.parts]


def build_reward(specs: list[RewardSpec], *, pad_id: int = 0, device="cpu") -> CombinedReward:
    """The configured rewards as one CombinedReward; reward models are loaded once, in eval mode."""
    parts, seen = [], {}
    for spec in specs:
        spec.validate()
        seen[spec.kind] = seen.get(spec.kind, 0) + 1
        name = spec.kind if seen[spec.kind] == 1 else f"{spec.kind}{seen[spec.kind]}"
        if spec.kind == "math":
            fn = math_reward
        elif spec.kind == "format":
            fn = format_reward(spec.pattern)
        elif spec.kind == "length":
            fn = length_reward
        elif spec.kind == "concise":
            fn = concise_reward
        else:
            reward_model = load_model_dir(spec.path, device=device, num_labels=1).eval()
            if not bool(reward_model.score.weight.any()):
                raise ValueError(f"reward model {spec.path}: its score head is missing or all zeros, so every "
                                 "reward would be 0 (is this a policy rather than a trained reward model?)")
            fn = model_reward(reward_model, pad_id)
        parts.append((name, spec.weight, fn))
    return CombinedReward(parts)
