"""Sampling: the parameters, the filters and the draw shared by every engine (lmforge.generation's static batch and
lmforge.scheduler's continuous batch), and the per-row helpers (random streams, stop strings, thinking budgets).

Log-probabilities (``return_logprobs``) are those of the raw model: log-softmax of the logits at temperature 1
(or at ``logprobs_temperature``: RL's rollout log-probs at the sampling temperature), before any penalty or filter.

Sampling is done by inverse CDF with one uniform number per row and step, drawn from the row's own random
stream, keyed by (seed, prompt tokens, occurrence of that prompt, sample index). So with a seed a completion
depends only on its prompt, never on what else is in the batch. Top-p without top-k avoids sorting the
vocabulary: a token is drawn from the min-p-filtered distribution and accepted if it lies in the nucleus
(rejection sampling is exact, and accepts with probability >= top_p); rare leftovers take the sorted path.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmforge.modelio import eos_ids
from lmforge.thinking import ThinkTags, new_state

Draw = Callable[[list[int] | None], torch.Tensor]  # live-row positions (None = all) -> uniforms in [0, 1)


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # nucleus: smallest set of most likely tokens whose probability reaches top_p
    min_p: float = 0.0  # drop tokens below min_p x the most likely token's probability
    repetition_penalty: float = 1.0  # CTRL-style: > 1 discourages tokens already in prompt or completion
    n: int = 1  # samples per prompt, sharing the prompt's prefill
    stop_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)  # need a tokenizer; the text ends before them
    seed: int | None = None  # None: drawn from torch's global generator (so torch.manual_seed still works)
    return_logprobs: bool = False  # raw model log p of each generated token (costs a logsumexp per step)
    logprobs_temperature: float = 1.0  # the log-probs are of softmax(logits / this): RL uses its sampling temperature
    compile: bool = False  # torch.compile'd fixed-shape decode step: 10-40 s of warm-up on a 2-core CPU, once
    static_cache: bool | None = None  # fixed-shape decode uncompiled; None = the growing cache (faster on CPU)
    thinking_budget: int | None = None  # most tokens inside <think> ... </think>; then the close is forced (s1)
    min_thinking_tokens: int = 0  # a close before this many thinking tokens becomes "Wait" (s1's extension)
    num_waits: int = 0  # the first num_waits closes of the think block become "Wait" (s1: ignore the end N times)

    @property
    def forces_thinking(self) -> bool:
        """Budget forcing is on (a budget, a minimum or Wait extensions): the engine needs the think tags."""
        return self.thinking_budget is not None or self.min_thinking_tokens > 0 or self.num_waits > 0

    def validate(self) -> None:
        checks = [(self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
                  (self.temperature >= 0, "temperature must be >= 0 (0 = greedy)"),
                  (self.top_k >= 0, "top_k must be >= 0 (0 = off)"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
                  (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 = off)"),
                  (self.n >= 1, "n must be >= 1"),
                  (self.logprobs_temperature > 0, "logprobs_temperature must be > 0"),
                  (self.thinking_budget is None or self.thinking_budget >= 0, "thinking_budget must be >= 0"),
                  (0 <= self.min_thinking_tokens <= (self.thinking_budget if self.thinking_budget is not None
                                                     else self.min_thinking_tokens),
                   "min_thinking_tokens must be in [0, thinking_budget]"),
                  (self.num_waits >= 0, "num_waits must be >= 0"),
                  (all(s for s in self.stop_strings), "stop_strings may not contain an empty string")]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}, got {self}")


SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "n",
                 "stop_strings", "seed", "compile", "thinking_budget", "min_thinking_tokens", "num_waits")


def sampling_params_from(cfg, **extra) -> SamplingParams:
    """SamplingParams from a stage config (generate, chat, sample, think): the keys of SAMPLING_KEYS the config
    has, the others left at SamplingParams' defaults, then ``extra`` (e.g. ``return_logprobs=cfg.logprobs``)."""
    values = {key: getattr(cfg, key) for key in SAMPLING_KEYS if hasattr(cfg, key)}
    if "stop_strings" in values:
        values["stop_strings"] = list(values["stop_strings"])  # a copy: the config's list stays the config's
    return SamplingParams(**{**values, **extra})


@dataclass
class Completion:
    token_ids: list[int]  # as generated, up to and including a stop token or the token completing a stop string
    finish_reason: str  # "stop" (stop token or stop string) or "length"
    text: str | None = None  # with a tokenizer: special tokens skipped, cut before a stop string
    logprobs: list[float] | None = None  # with return_logprobs: raw model log p(token | prefix), one per token
    thinking_tokens: int | None = None  # with a tokenizer: tokens inside the think block (the rest is the answer)
    forced_close: bool = False  # the thinking budget closed the think block
    waits: int = 0  # "Wait" extensions inserted (min_thinking_tokens, num_waits)


# ---- sampling filters: pure functions on (B, V) logits; -inf marks a dropped token ----

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """seen: (B, V) bool of tokens already present. Positive logits are divided, negative multiplied."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most likely tokens until their probability reaches p (always at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass strictly before each token
    drop = torch.zeros_like(before, dtype=torch.bool).scatter(-1, order, before >= p)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    if min_p <= 0:
        return logits
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution ``sample_tokens`` draws from, as logits: temperature, then top-k, top-p, min-p."""
    logits = logits / params.temperature if params.temperature not in (0, 1) else logits
    return apply_min_p(apply_top_p(apply_top_k(logits, params.top_k), params.top_p), params.min_p)


# ---- sampling: the same distribution as filter_logits, without sorting the vocabulary when possible ----

def sample_tokens(logits: torch.Tensor, params: SamplingParams, draw: Draw) -> torch.Tensor:
    """One token per row of (B, V) float logits (penalties already applied); ``draw`` gives the uniforms."""
    if params.temperature == 0:  # max's indices: argmax's (the first maximum), ~3x faster on a (16, 49152) CPU row
        return logits.max(-1).indices
    if params.temperature != 1:
        logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:  # a small sorted candidate set: filter it exactly
        values, ids = logits.topk(params.top_k, dim=-1)
        weights = _sorted_weights(values.softmax(-1), params.top_p, params.min_p)
        return ids.gather(-1, _inverse_cdf(weights, draw(None))[:, None]).squeeze(-1)
    probs = logits.softmax(-1)
    weights = probs
    if params.min_p > 0:
        weights = probs.masked_fill(probs < params.min_p * probs.max(-1, keepdim=True).values, 0.0)
    tokens = _inverse_cdf(weights, draw(None))
    if params.top_p < 1:
        tokens = _reject_outside_nucleus(probs, weights, tokens, params, draw)
    return tokens


def _sorted_weights(sorted_probs: torch.Tensor, top_p: float, min_p: float) -> torch.Tensor:
    """Zero the tokens that top-p then min-p drop, for probabilities sorted in descending order."""
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p if top_p < 1 else None
    if min_p > 0:
        above = sorted_probs >= min_p * sorted_probs[:, :1]
        keep = above if keep is None else keep & above
    return sorted_probs if keep is None else sorted_probs * keep


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index drawn with probability proportional to non-negative ``weights`` (B, K); a zero weight is never drawn."""
    cdf = weights.cumsum(-1)
    idx = torch.searchsorted(cdf, u.to(cdf)[:, None] * cdf[:, -1:], right=True).squeeze(-1)
    over = idx == cdf.shape[-1]
    if bool(over.any()):  # u * total rounded up to total: the first index that reaches total has weight
        idx[over] = (cdf[over] < cdf[over, -1:]).sum(-1)
    return idx


def _reject_outside_nucleus(probs, weights, tokens, params: SamplingParams, draw: Draw, rounds: int = 4):
    """Redraw tokens outside the top-p nucleus; exact, since accepted draws are proportional to the target.

    Token i is in the nucleus when the mass of the tokens more likely than it is below top_p. The proposal
    (min-p-filtered probs) puts at least top_p of its mass inside, so few rows need a second draw.
    """
    rows = None  # the rows still to check; None = all (no gather for the common case)
    for _ in range(rounds):
        p = probs if rows is None else probs[rows]
        p_tok = p.gather(-1, (tokens if rows is None else tokens[rows])[:, None])
        outside = (p * (p > p_tok)).sum(-1) >= params.top_p
        if not bool(outside.any()):
            return tokens
        rows = outside.nonzero().squeeze(-1) if rows is None else rows[outside]
        tokens[rows] = _inverse_cdf(weights[rows], draw(rows.tolist()))
    sorted_probs, order = probs[rows].sort(-1, descending=True)  # still outside after `rounds`: sort
    choice = _inverse_cdf(_sorted_weights(sorted_probs, params.top_p, params.min_p), draw(rows.tolist()))
    tokens[rows] = order.gather(-1, choice[:, None]).squeeze(-1)
    return tokens


def row_streams(prompts: list[list[int]], n: int, seed: int) -> list[random.Random]:
    """One random stream per output row, keyed by (seed, prompt tokens, occurrence of that prompt, sample)."""
    streams, seen = [], {}
    for prompt in prompts:
        key = ",".join(map(str, prompt))
        occurrence = seen[key] = seen.get(key, -1) + 1
        streams += [random.Random(f"{seed}/{occurrence}/{j}/{key}") for j in range(n)]
    return streams


def last_logits(model, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """(B, V) fp32 logits of the last position only: a prefill never multiplies every position by lm_head."""
    return model.lm_head(model(input_ids, return_hidden=True, **kwargs)[:, -1]).float()


def think_states(tokenizer, prompts, fan: list[int], params: SamplingParams):
    """The thinking state machine of every output row (lmforge.thinking), or None without a tokenizer that can
    spell the tags. With no budget the machines only count; with one they force the close and the "Wait"."""
    if tokenizer is None or not hasattr(tokenizer, "encode"):
        return None
    tags = think_tags(tokenizer)
    return [new_state(tags, prompts[p], params.thinking_budget, params.min_thinking_tokens, params.num_waits)
            for p in fan]


def think_tags(tokenizer) -> ThinkTags:
    cached = getattr(tokenizer, "_lmforge_think_tags", None)
    if cached is None:
        cached = ThinkTags.from_tokenizer(tokenizer)
        try:
            tokenizer._lmforge_think_tags = cached
        except AttributeError:
            pass
    return cached


def force_thinking(picked: torch.Tensor, live: list[int], states) -> torch.Tensor:
    """The sampled tokens with each live row's thinking machine applied (a forced close, a "Wait")."""
    sampled = picked.tolist()
    emitted = [states[r].step(t) for r, t in zip(live, sampled)]
    return picked if emitted == sampled else torch.tensor(emitted, dtype=picked.dtype, device=picked.device)


def _eos_ids(tokenizer) -> list[int]:
    if tokenizer is None:
        return []
    ids = eos_ids(tokenizer)
    return ids if isinstance(ids, list) else [ids]


def _stop_string_cut(tokenizer, ids: list[int], params: SamplingParams, window: int) -> tuple[str] | None:
    """(text before the first stop string,) once one appears; only the last ``window`` tokens are decoded
    each step, so checking stays O(1) per token however long the completion grows."""
    tail = tokenizer.decode(ids[-window:], skip_special_tokens=True)
    if not any(s in tail for s in params.stop_strings):
        return None
    text = tokenizer.decode(ids, skip_special_tokens=True)
    hits = [i for i in (text.find(s) for s in params.stop_strings) if i >= 0]
    return (text[:min(hits)],) if hits else None
