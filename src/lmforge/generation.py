"""Batched sampling with a KV cache: the engine under `lmforge sample`, evaluation, RL rollouts and chat.

    prompts (any lengths) -> left-pad into one batch -> one prefill -> fan out to n samples per prompt
    -> decode one token per step for every live row -> rows that finish leave the batch (and the cache)

Every step's token comes with its log-probability under the model's own (unfiltered, temperature-1)
distribution, which is what RL needs for pi(a|s). Sampling filters are pure functions on logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lmforge.model import KVCache


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # nucleus: smallest set whose probability reaches top_p
    min_p: float = 0.0  # drop tokens below min_p x the most likely token's probability
    repetition_penalty: float = 1.0  # CTRL-style: > 1 discourages tokens already in prompt or completion
    n: int = 1  # samples per prompt, sharing the prompt's prefill
    stop_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    seed: int | None = None

    def validate(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or not 0 <= self.min_p < 1 or self.n < 1:
            raise ValueError(f"bad sampling parameters: {self}")


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # log p(token | prefix) under the unfiltered model distribution
    finish_reason: str  # "stop" (stop token or string) or "length"
    text: str | None = None  # with a tokenizer; cut before a stop string


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
    drop_sorted = before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    if min_p <= 0:
        return logits
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))


def pick_tokens(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from (B, V) logits."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = logits / params.temperature
    logits = apply_min_p(apply_top_p(apply_top_k(logits, params.top_k), params.top_p), params.min_p)
    probs = logits.softmax(-1)
    # Exponential race (equivalent to multinomial): argmax p_i / E_i with E_i ~ Exp(1); one vectorised call.
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(-1)


@torch.inference_mode()
def generate(model, prompts: list[list[int]], params: SamplingParams, *, tokenizer=None,
             eos_token_ids: list[int] | None = None, pad_id: int = 0,
             on_token: Callable[[int, int], None] | None = None) -> list[list[Completion]]:
    """Complete every prompt ``params.n`` times. Returns completions[prompt][sample].

    eos_token_ids: ids that end a completion (default: the tokenizer's end-of-document and end-of-turn ids).
    on_token(row, token_id): streaming callback, row = prompt_index * n + sample_index.
    """
    params.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (add a bos token to empty prompts)")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    stop_ids = set(params.stop_token_ids)
    if eos_token_ids is not None:
        stop_ids |= set(eos_token_ids)
    elif tokenizer is not None:
        from lmforge.modelio import eos_ids

        ids = eos_ids(tokenizer)
        stop_ids |= set(ids if isinstance(ids, list) else [ids])
    if params.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode with")
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)

    # Prefill the distinct prompts once, left-padded so every row's last prompt token is in the last column.
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lengths.max())
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p, device=device)
    padded = bool((lengths != width).any())
    key_mask = (torch.arange(width, device=device)[None] >= (width - lengths)[:, None]).long() if padded else None
    positions = (torch.arange(width, device=device)[None] - (width - lengths)[:, None]).clamp(min=0)
    cache = KVCache(model.config, len(prompts), width + params.max_new_tokens, device=device, dtype=dtype)
    logits = model(input_ids, attention_mask=key_mask, position_ids=positions, cache=cache)[:, -1].float()

    # Fan out to n samples per prompt: rows share the prefilled keys and values.
    n = params.n
    fan = torch.arange(len(prompts), device=device).repeat_interleave(n)
    if n > 1:
        cache.select(fan)
        logits = logits[fan]
        key_mask = key_mask[fan] if key_mask is not None else None
    next_pos = lengths[fan]
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(len(fan), logits.shape[-1], dtype=torch.bool, device=device)
        for r, p in enumerate(fan.tolist()):
            seen[r, torch.tensor(prompts[p], device=device)] = True

    rows = list(range(len(fan)))  # live row -> output index
    out_tokens: list[list[int]] = [[] for _ in fan]
    out_logprobs: list[list[float]] = [[] for _ in fan]
    finish = ["length"] * len(fan)
    texts: list[str | None] = [None] * len(fan)
    for step in range(params.max_new_tokens):
        logprobs = F.log_softmax(logits, dim=-1)
        tokens = pick_tokens(logits, params, seen, generator)
        token_logprobs = logprobs.gather(-1, tokens[:, None]).squeeze(-1)
        keep = []
        for j, (tok, lp) in enumerate(zip(tokens.tolist(), token_logprobs.tolist())):
            r = rows[j]
            out_tokens[r].append(tok)
            out_logprobs[r].append(lp)
            if on_token is not None:
                on_token(r, tok)
            if tok in stop_ids or (params.stop_strings and _hit_stop_string(out_tokens[r], tokenizer, params, texts, r)):
                finish[r] = "stop"
            else:
                keep.append(j)
        if not keep or step == params.max_new_tokens - 1:
            break
        if seen is not None:
            seen[torch.arange(len(tokens), device=device), tokens] = True
        if len(keep) < len(rows):  # finished rows leave the batch: no more compute for them
            idx = torch.tensor(keep, device=device)
            cache.select(idx)
            tokens, next_pos = tokens[idx], next_pos[idx]
            key_mask = key_mask[idx] if key_mask is not None else None
            seen = seen[idx] if seen is not None else None
            rows = [rows[j] for j in keep]
        if key_mask is not None:
            key_mask = torch.cat([key_mask, torch.ones_like(key_mask[:, :1])], dim=1)
        logits = model(tokens[:, None], attention_mask=key_mask, position_ids=next_pos[:, None],
                       cache=cache)[:, -1].float()
        next_pos = next_pos + 1

    results: list[list[Completion]] = [[] for _ in prompts]
    for r, p in enumerate(fan.tolist()):
        text = texts[r]
        if tokenizer is not None and text is None:
            ids = out_tokens[r][:-1] if finish[r] == "stop" else out_tokens[r]  # the stop token is not text
            text = tokenizer.decode(ids, skip_special_tokens=True)
        results[p].append(Completion(out_tokens[r], out_logprobs[r], finish[r], text))
    return results


def _hit_stop_string(tokens: list[int], tokenizer, params: SamplingParams, texts: list, r: int) -> bool:
    """Decode the completion so far; on a stop string, keep the text before it (the stop string is not output)."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    tail_start = max(0, len(text) - max(map(len, params.stop_strings)) - 16)
    hits = [text.find(s, tail_start) for s in params.stop_strings]
    hits = [h for h in hits if h >= 0]
    if not hits:
        return False
    texts[r] = text[:min(hits)]
    return True
