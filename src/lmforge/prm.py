"""Process reward models at work: scoring the steps of solutions, and Monte-Carlo step labels (Math-Shepherd).

    step_logits       a PRM forward: the ``score`` head at every position, (B, T)
    PRMScorer         p(step is right) for every step of many solutions, batched; ``.solution_scores``
                      aggregates them (min / prod / last, objectives.prm.aggregate_steps)
    mc_step_labels    Math-Shepherd (Wang et al. 2024): a step is good when rollouts continued from it reach the
                      right answer; soft label = the share that do, hard label = whether any does
    policy_rollouts   the rollout function for mc_step_labels: the policy continues a prefix n times

A PRM is the SFT trunk plus a scalar head, read at each step's separator (data.stepwise says where).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lmforge.data import thinkworld
from lmforge.data.stepwise import StepExample, collate_steps, tokenize_steps
from lmforge.evaluation import generate_all
from lmforge.generation import SamplingParams
from lmforge.modelio import load_model_dir
from lmforge.objectives.prm import aggregate_steps
from lmforge.thinking import THINK_CLOSE, split_steps


def step_logits(model, batch: dict) -> torch.Tensor:
    """(B, T) fp32 logits of the score head at every position (document masking when the batch is packed)."""
    hidden = model(batch["input_ids"], document_ids=batch.get("document_ids"), return_hidden=True)
    score = getattr(model, "module", model).score
    return score(hidden)[..., 0].float()


@dataclass
class PRMScorer:
    """p(right) for each step of (prompt_ids, steps) pairs: the prompt as the policy saw it, then ``prefix``
    (``<think>\\n`` for the thinking world) and the steps joined by ``separator``."""
    model: object
    tokenizer: object
    prefix: str = ""
    separator: str = "\n"
    batch_size: int = 32

    def __post_init__(self):
        if getattr(self.model, "score", None) is None:
            raise ValueError("the PRM has no score head (load it with num_labels=1)")
        self._prefix = self.tokenizer.encode(self.prefix) if self.prefix else []

    @classmethod
    def from_dir(cls, path: str, tokenizer, device, prefix: str = "") -> PRMScorer:
        """The PRM saved in ``path`` (``lmforge prm``'s model directory), in eval mode on ``device``, reading the
        policy's ``tokenizer`` (the PRM trains on the policy's own tokenizer)."""
        return cls(load_model_dir(path, device=device, num_labels=1).eval(), tokenizer, prefix=prefix)

    @torch.inference_mode()
    def step_probs(self, prompt_ids: Sequence[list[int]], steps: Sequence[list[str]]) -> list[list[float]]:
        examples = [tokenize_steps(self.tokenizer, list(p) + self._prefix, s, None, self.separator)
                    for p, s in zip(prompt_ids, steps)]
        out: list[list[float]] = [[] for _ in examples]
        order = [i for i in range(len(examples)) if examples[i].label_positions]
        device = self.model.score.weight.device
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = collate_steps([examples[i] for i in idx], self.tokenizer.pad_id)
            logits = step_logits(self.model, {"input_ids": batch["input_ids"].to(device)}).sigmoid().cpu()
            for row, i in enumerate(idx):
                out[i] = logits[row, examples[i].label_positions].tolist()
        return out

    def solution_scores(self, prompt_ids: Sequence[list[int]], texts: Sequence[str],
                        how: str = "min") -> list[float]:
        probs = self.step_probs(prompt_ids, [split_steps(t) for t in texts])
        return [aggregate_steps(p, how) for p in probs]


@dataclass
class CheckerScorer:
    """The thinking world's step checker in a PRM's place (``process_reward=checker``): 1.0 for a right step, 0.0
    for a wrong one, read from the prompt's question (thinkworld.label_steps). An oracle PRM, to tell what process
    supervision is worth apart from how well a learned PRM judges steps."""
    tokenizer: object

    def step_probs(self, prompt_ids: Sequence[list[int]], steps: Sequence[list[str]]) -> list[list[float]]:
        out = []
        for ids, solution in zip(prompt_ids, steps):
            problem = thinkworld.parse_question(self.tokenizer.decode(list(ids)))
            if problem is None:
                raise ValueError("process_reward=checker needs thinking-world prompts ('What is 7+5-9?'), got "
                                 f"{self.tokenizer.decode(list(ids))[-80:]!r}")
            out.append([float(ok) for ok in thinkworld.label_steps(problem, list(solution))])
        return out


def load_process_scorer(spec: str, tokenizer, device, prefix: str = ""):
    """RL's ``process_reward``: ``checker`` (the step checker, CheckerScorer) or a PRM directory (PRMScorer)."""
    if spec == "checker":
        return CheckerScorer(tokenizer)
    return PRMScorer.from_dir(spec, tokenizer, device, prefix=prefix)


def step_end_tokens(tokenizer, completion_ids: list[int], steps: list[str]) -> list[int]:
    """Index of the token that ends each step of ``split_steps(text)`` in the generated ids (the step's line and
    its newline; the answer step ends at the last token)."""
    ends, total = [], 0
    for t in completion_ids:
        total += len(tokenizer.decode([t]))
        ends.append(total)
    text = tokenizer.decode(completion_ids)
    out, at = [], 0
    for k, step in enumerate(steps):
        if k == len(steps) - 1 and step.startswith(THINK_CLOSE):
            out.append(len(completion_ids) - 1)
            break
        at = text.find(step, at)
        if at < 0:  # cannot place it (a decode that does not round-trip): credit it to the end
            out.append(len(completion_ids) - 1)
            at = len(text)
            continue
        at += len(step)
        stop = at + 1 if text[at:at + 1] == "\n" else at
        out.append(next((i for i, e in enumerate(ends) if e >= stop), len(completion_ids) - 1))
    return out


def process_rewards(scorer: PRMScorer, prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]],
                    texts: Sequence[str]) -> tuple[list[list[float]], list[list[int]]]:
    """Per completion: the PRM's probability for each step and the token each step ends on (for GRPO with
    process supervision, objectives.rl.process_advantages). A completion with no step gets its last token's."""
    steps = [split_steps(t) for t in texts]
    probs = scorer.step_probs(prompt_ids, steps)
    ends = [step_end_tokens(scorer.tokenizer, ids, s) if s else [] for ids, s in zip(completion_ids, steps)]
    return probs, ends


def mean_step_reward(step_rewards: Sequence[list[float]]) -> float:
    """The mean over every step of a rollout (RL's ``process/step_reward``); 0 when no completion has a step."""
    return sum(map(sum, step_rewards)) / max(sum(map(len, step_rewards)), 1)


# ---- Monte-Carlo step labels ----

Rollout = Callable[[list[list[int]], int], list[list[str]]]  # prefixes, n -> n continuation texts per prefix


def mc_step_labels(tokenizer, prompt_ids: Sequence[list[int]], steps: Sequence[list[str]],
                   verify: Callable[[int, str], bool], rollout: Rollout, n: int = 4, prefix: str = "",
                   separator: str = "\n") -> tuple[list[list[bool]], list[list[float]]]:
    """Math-Shepherd labels: for each solution i and step k, continue ``prompt + prefix + steps[:k+1]`` n times
    with ``rollout`` and check each continuation with ``verify(i, text so far + continuation)``.

    Returns (hard, soft): hard[i][k] = any rollout from step k succeeds ("HE" in the paper), soft[i][k] = the
    share that do ("SE"). A step that ends the solution (the answer step) is judged by itself, with no rollout.
    """
    sep = separator
    jobs, texts = [], []  # (solution, step) and the text through that step
    prefixes: list[list[int]] = []
    hard = [[False] * len(s) for s in steps]
    soft = [[0.0] * len(s) for s in steps]
    for i, (p, solution) in enumerate(zip(prompt_ids, steps)):
        for k in range(len(solution)):
            text = prefix + sep.join(solution[:k + 1]) + sep
            if solution[k].startswith(THINK_CLOSE) or k == len(solution) - 1 and THINK_CLOSE not in text:
                ok = verify(i, text)  # the final step: nothing left to roll out
                hard[i][k], soft[i][k] = ok, float(ok)
                continue
            jobs.append((i, k))
            texts.append(text)
            prefixes.append(list(p) + tokenizer.encode(text))
    continuations = rollout(prefixes, n) if prefixes else []
    for (i, k), text, outs in zip(jobs, texts, continuations):
        wins = [verify(i, text + c) for c in outs]
        hard[i][k], soft[i][k] = any(wins), sum(wins) / len(wins)
    return hard, soft


def policy_rollouts(model, tokenizer, max_new_tokens: int = 160, temperature: float = 1.0, seed: int = 0,
                    batch_size: int = 64) -> Rollout:
    """The policy as mc_step_labels' rollout function: n sampled continuations of each prefix."""
    def rollout(prefixes: list[list[int]], n: int) -> list[list[str]]:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, n=n, seed=seed)
        return [[c.text or "" for c in row]
                for row in generate_all(model, prefixes, params, tokenizer, batch_size, label="MC rollouts")]

    return rollout


def examples_from_solutions(tokenizer, prompt_ids: Sequence[list[int]], steps: Sequence[list[str]],
                            labels: Sequence[Sequence[float]], prefix: str = "",
                            separator: str = "\n") -> list[StepExample]:
    pre = tokenizer.encode(prefix) if prefix else []
    return [tokenize_steps(tokenizer, list(p) + pre, s, list(y), separator)
            for p, s, y in zip(prompt_ids, steps, labels)]
