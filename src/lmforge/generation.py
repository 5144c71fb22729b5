"""Batched sampling with a KV cache: the engine under `lmforge sample`/`generate`, evaluation, RL rollouts and chat.

    prompts (any lengths) -> left-pad into one batch -> one prefill -> fan out to n samples per prompt
    -> decode one token per step for every live row -> rows that finish leave the batch (and the cache)

Log-probabilities (``return_logprobs``) are those of the raw model: log-softmax of the logits at temperature 1
(or at ``logprobs_temperature``: RL's rollout log-probs at the sampling temperature), before any penalty or filter.

Sampling is done by inverse CDF with one uniform number per row and step, drawn from the row's own random
stream, keyed by (seed, prompt tokens, occurrence of that prompt, sample index). So with a seed a completion
depends only on its prompt, never on what else is in the batch: batched == unbatched for greedy and for seeded
sampling, up to float rounding (padding and batch shape change the last bits of the logits, which matters
only when two tokens are within rounding of each other). Top-p without top-k avoids sorting the vocabulary:
a token is drawn from the min-p-filtered distribution and accepted if it lies in the nucleus (rejection
sampling is exact, and accepts with probability >= top_p); rare leftovers take the sorted path.

Two decoders run the steps. CacheDecoder (the default) calls the model's forward on a cache that grows by one
slot per step, and drops a finished row at once; on CPU with fp32 weights and 2 or more rows it calls a
``cpu_decode.PackedDecodeStep`` instead (the same math with prepacked, fused weights, ~1.5x faster).
StaticDecoder (``static_cache=True``, and always with ``compile=True``) calls ``Transformer.decode_step``,
gpt-fast style: the cache is preallocated, the new keys are written at a slot tensor and the token attends over
the cache with a key mask, so every step has the same shapes and ``torch.compile`` turns it into one graph
(compiled once per process and model shape, reused by later calls). Uncompiled, the growing cache is the faster
of the two on CPU; compiled, the fixed-shape step removes most of the per-op overhead (on CPU with 2 or more rows
the packed step is faster still). All give the same tokens and log-probs up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from functools import cache

import torch
import torch.fx.experimental._config  # noqa: F401  (use_duck_shape, patched in compiled_step)

from lmforge.cpu_decode import PackedDecodeStep, column_major_weights, packable, packed_head
from lmforge.model import KVCache, Transformer
from lmforge.sampling import (  # noqa: F401  (re-exported: callers import the sampling API from here)
    SAMPLING_KEYS,
    Completion,
    Draw,
    SamplingParams,
    _eos_ids,
    _stop_string_cut,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    filter_logits,
    force_thinking,
    last_logits,
    row_streams,
    sample_tokens,
    sampling_params_from,
    think_states,
    think_tags,
)
from lmforge.scheduler import Scheduler
from lmforge.scoring import left_pad

# ---- the engine ----

class CacheDecoder:
    """One token per live row and step through ``model.forward`` (or ``step``, a ``PackedDecodeStep``) with the
    growing KV cache; a finished row leaves the batch and the cache at once."""

    def __init__(self, model, cache: KVCache, position, key_mask, head, step: PackedDecodeStep | None = None):
        self.model, self.cache, self.position, self.key_mask, self.head = model, cache, position, key_mask, head
        self.step = step

    def keep(self, idx: torch.Tensor) -> None:
        """Keep only the live rows ``idx`` (positions among the current live rows), in that order."""
        self.cache.select(idx)
        self.position = self.position[idx] if self.position is not None else None
        self.key_mask = self.key_mask[idx] if self.key_mask is not None else None

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """(live,) tokens just picked -> (live, V) fp32 logits of the next ones."""
        mask = self.key_mask[:, :self.cache.length + 1] if self.key_mask is not None else None
        if self.step is not None:
            hidden = self.step(tokens, mask, self.position, self.cache)
        else:
            hidden = self.model(tokens[:, None], attention_mask=mask, position_ids=self.position, cache=self.cache,
                                return_hidden=True)[:, -1]
        if self.position is not None:
            self.position += 1
        return self.head(hidden)


class StaticDecoder:
    """gpt-fast-style decoding through ``Transformer.decode_step``: every step has the same shapes, so a compiled
    step is one graph. The cache is preallocated per layer and written at a slot tensor; the token attends to
    the filled slots with a key mask for left padding (``narrow``: only the first slot+1 slots are read; else all
    of them, fixed shapes for CUDA graphs). A finished row keeps its slot (its token is ignored and the head
    skips it) until at most half the rows are live; then the cache is compacted to the live rows (``compact``),
    never below ``min_rows`` (dead copies fill up: a dynamic-shape graph specializes a batch of 1).
    """

    def __init__(self, model, cache: KVCache, pad: torch.Tensor, key_mask: torch.Tensor, step, head, *,
                 narrow: bool = True, compact: bool = True, min_rows: int = 1):
        self.cache, self.pad, self.key_mask, self.step, self.head = cache, pad, key_mask, step, head
        self.narrow, self.compact, self.min_rows = narrow, compact, min_rows
        self.slot = torch.tensor([cache.length], device=pad.device)
        self.length = cache.length  # the same as slot, as an int
        self.rows = None  # batch positions of the live rows; None = every row is live
        self.tokens = torch.zeros(cache.batch_size, dtype=torch.long, device=pad.device)  # last token of every row
        model._extend_rope(cache.max_len)
        if cache.batch_size < min_rows:
            self._shrink(torch.arange(cache.batch_size, device=pad.device))

    def _shrink(self, rows: torch.Tensor) -> None:
        """Keep batch rows ``rows`` (and dead copies of the first up to min_rows) in the cache and the state."""
        fill = rows[:1].expand(max(self.min_rows - len(rows), 0))
        idx = torch.cat((rows, fill))
        self.cache.select(idx)
        self.pad, self.key_mask, self.tokens = self.pad[idx], self.key_mask[idx], self.tokens[idx]
        self.rows = torch.arange(len(rows), device=rows.device) if len(fill) else None

    def keep(self, idx: torch.Tensor) -> None:
        """Keep only the live rows ``idx`` (positions among the current live rows), in that order."""
        rows = idx if self.rows is None else self.rows[idx]
        if self.compact and 2 * len(rows) <= self.cache.batch_size and len(rows) < self.cache.batch_size:
            self._shrink(rows)
        else:
            self.rows = rows

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """(live,) tokens just picked -> (live, V) fp32 logits of the next ones."""
        self.tokens = tokens if self.rows is None else self.tokens.index_copy(0, self.rows, tokens)
        hidden = self.step(self.tokens, self.cache.k, self.cache.v, self.slot, self.pad, self.key_mask,
                           self.length + 1 if self.narrow else None)
        self.slot += 1
        self.length += 1
        return self.head(hidden if self.rows is None else hidden[self.rows])


def generate(model, prompts: list[list[int]], params: SamplingParams, *, tokenizer=None,
             eos_token_ids: list[int] | None = None, pad_id: int = 0,
             on_token: Callable[[int, int], None] | None = None,
             max_running: int | None = None) -> list[list[Completion]]:
    """Complete every prompt ``params.n`` times. Returns completions[prompt][sample].

    eos_token_ids: ids that end a completion besides params.stop_token_ids (default: the tokenizer's
    end-of-document and end-of-turn ids; [] generates exactly max_new_tokens unless a stop fires).
    on_token(row, token_id): streaming callback, row = prompt_index * n + sample_index.
    max_running: most rows decoding at once (None = all); on the scheduler the next prompt takes a finished
    row's place at once, on the static batch the prompts run in batches of max_running // n.
    """
    params.validate()
    vocab = model.config.vocab_size
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (add a bos token to empty prompts)")
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise ValueError(f"prompt token ids must be in [0, {vocab}) (the model's vocab_size)")
    if params.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode with")
    if params.forces_thinking and tokenizer is None:
        raise ValueError("a thinking budget needs a tokenizer (to find <think> and </think>)")
    static = params.compile or (params.static_cache if params.static_cache is not None else STATIC_BY_DEFAULT)
    rows = running_rows(prompts, params, max_running)
    packed = not static and packable(model, rows)
    with nullcontext() if packed else column_major_weights(model), torch.inference_mode():
        if not static and SCHEDULED_BY_DEFAULT:
            return batch_scheduler(model, prompts, params, max_running=rows, tokenizer=tokenizer,
                                   eos_token_ids=eos_token_ids, pad_id=pad_id).generate(prompts, params, on_token)
        size, out = max(rows // params.n, 1), []
        for start in range(0, len(prompts), size):
            callback = (lambda r, t, base=start * params.n: on_token(base + r, t)) if on_token is not None else None
            out += _decode(model, prompts[start:start + size], params, tokenizer, eos_token_ids, pad_id, callback,
                           static, packed)
        return out


def running_rows(prompts: list[list[int]], params: SamplingParams, max_running: int | None) -> int:
    """Rows decoding at once: every prompt's n samples, or at most max_running."""
    rows = len(prompts) * params.n
    return rows if max_running is None else min(max_running, rows)


def batch_scheduler(model, prompts: list[list[int]], params: SamplingParams, *, max_running: int | None = None,
                    block_size: int = 16, **kwargs) -> Scheduler:
    """A Scheduler sized for one batch of prompts: a KV pool for every row at full length (so nothing is ever
    preempted), all rows running at once unless ``max_running`` says fewer, every prompt prefilled in the first
    step (nothing is decoding yet that a chunk limit would protect); later prompts join a quarter of the rows at a
    time (min_admit: fewer prefill forwards, measured faster on CPU than joining one by one)."""
    longest = max(map(len, prompts)) + params.max_new_tokens
    rows = running_rows(prompts, params, max_running)
    per_row = -(-longest // block_size) + 1
    return Scheduler(model, kv_tokens=(rows + params.n) * per_row * block_size, block_size=block_size,
                     max_running=rows, prefill_chunk=max(sum(map(len, prompts)), 1),
                     min_admit=max(1, rows // 4), **kwargs)


def _decode(model, prompts, params: SamplingParams, tokenizer, eos_token_ids, pad_id, on_token, static: bool,
            packed: bool):
    vocab = model.config.vocab_size
    stop_ids = set(params.stop_token_ids) | set(_eos_ids(tokenizer) if eos_token_ids is None else eos_token_ids)
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    n, steps = params.n, params.max_new_tokens
    seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()))
    streams = row_streams(prompts, n, seed)

    # Prefill each distinct prompt once, left-padded so every row's last prompt token is in the last column.
    input_ids, prompt_mask, positions = left_pad(prompts, pad_id, device)
    width = input_ids.shape[1]
    cuda_graphs = params.compile and device.type == "cuda"  # fixed shapes: the cache length rounds up to 256
    max_len = -(-(width + steps) // 256) * 256 if cuda_graphs else width + steps
    cache = KVCache(model.config, len(prompts), max_len, device=device, dtype=dtype, per_layer=static)
    if prompt_mask is None:  # no row is padded: positions are the model's default, past..past+T-1 (no gather)
        positions = None
    logits = last_logits(model, input_ids, attention_mask=prompt_mask, position_ids=positions, cache=cache)
    seen = None
    if params.repetition_penalty != 1.0:
        real = prompt_mask if prompt_mask is not None else torch.ones_like(input_ids)
        seen = torch.zeros(len(prompts), vocab, device=device).scatter_add_(1, input_ids, real.float()) > 0

    # Fan out to n samples per prompt: rows share the prefilled keys and values.
    fan = torch.arange(len(prompts), device=device).repeat_interleave(n)
    if n > 1:
        cache.select(fan)
        logits, seen = logits[fan], seen[fan] if seen is not None else None
    if static:
        key_mask = torch.ones(len(fan), cache.max_len, dtype=torch.bool, device=device)
        if prompt_mask is not None:
            key_mask[:, :width] = prompt_mask[fan].bool()
        pad = width - torch.tensor([len(prompts[p]) for p in fan.tolist()], device=device)
        step = compiled_step(model) if params.compile else model.decode_step
        decoder = StaticDecoder(model, cache, pad, key_mask, step, packed_head(model, len(fan)),
                                narrow=not cuda_graphs, compact=not cuda_graphs,
                                min_rows=2 if params.compile and not cuda_graphs else 1)
    else:
        position = positions[fan, -1:] + 1 if positions is not None else None  # (rows, 1) next position per row
        key_mask = None  # decode keys: the prompt's mask, then ones for generated tokens; None when unpadded
        if prompt_mask is not None:
            key_mask = torch.ones(len(fan), width + steps, dtype=torch.long, device=device)
            key_mask[:, :width] = prompt_mask[fan]
        step = PackedDecodeStep(model, len(fan)) if packed else None
        decoder = CacheDecoder(model, cache, position, key_mask, step.head if step else packed_head(model, len(fan)),
                               step)

    live = list(range(len(fan)))  # batch position -> output row
    tokens_out: list[list[int]] = [[] for _ in live]
    logprobs_out: list[list[float]] = [[] for _ in live]
    finish, texts = ["length"] * len(live), [None] * len(live)
    window = 4 * max(map(len, params.stop_strings), default=0) + 4  # tokens enough to spell any stop string
    thinking = think_states(tokenizer, prompts, fan.tolist(), params)  # one budget state machine per row

    def draw(batch_rows: list[int] | None) -> torch.Tensor:
        rows = live if batch_rows is None else [live[j] for j in batch_rows]
        return torch.tensor([streams[r].random() for r in rows], device=device)

    for step in range(steps):
        picked = sample_tokens(apply_repetition_penalty(logits, seen, params.repetition_penalty)
                               if seen is not None else logits, params, draw)
        if thinking is not None:
            picked = force_thinking(picked, live, thinking)
        if params.return_logprobs:
            scaled = logits / params.logprobs_temperature if params.logprobs_temperature != 1.0 else logits
            lps = (scaled.gather(-1, picked[:, None]).squeeze(-1) - scaled.logsumexp(-1)).tolist()
        keep = []
        for j, tok in enumerate(picked.tolist()):
            r = live[j]
            tokens_out[r].append(tok)
            if params.return_logprobs:
                logprobs_out[r].append(lps[j])
            if on_token is not None:
                on_token(r, tok)
            if tok in stop_ids:
                finish[r] = "stop"
            elif params.stop_strings and (cut := _stop_string_cut(tokenizer, tokens_out[r], params, window)):
                finish[r], texts[r] = "stop", cut[0]
            else:
                keep.append(j)
        if not keep or step == steps - 1:
            break
        if seen is not None:
            seen[torch.arange(len(picked), device=device), picked] = True
        if len(keep) < len(live):  # finished rows leave the batch: no more compute for them
            idx = torch.tensor(keep, device=device)
            decoder.keep(idx)
            picked = picked[idx]
            seen = seen[idx] if seen is not None else None
            live = [live[j] for j in keep]
        logits = decoder(picked)

    results: list[list[Completion]] = [[] for _ in prompts]
    for r, p in enumerate(fan.tolist()):
        text = texts[r]
        if tokenizer is not None and text is None:
            ids = tokens_out[r][:-1] if finish[r] == "stop" else tokens_out[r]  # the stop token is not text
            text = tokenizer.decode(ids, skip_special_tokens=True)
        state = thinking[r] if thinking is not None else None
        results[p].append(Completion(tokens_out[r], finish[r], text,
                                     logprobs_out[r] if params.return_logprobs else None,
                                     state.thinking_tokens if state else None, bool(state and state.forced_close),
                                     state.waits if state else 0))
    return results


STATIC_BY_DEFAULT = False  # uncompiled, the growing cache measured faster on CPU (see StaticDecoder)
SCHEDULED_BY_DEFAULT = True  # the growing-cache path runs on lmforge.scheduler (False: the static batch below)


def compiled_step(model):
    """``torch.compile(Transformer.decode_step)`` bound to ``model``. One compiled function per device kind serves
    every model: the weights are graph inputs (read live, so RL updates need no recompile) and the code cache
    lives as long as the process, so repeated generate calls (RL rollouts, evaluation) compile once per model
    shape. On CPU the batch size and cache length are dynamic dimensions: rows leaving the batch or other
    prompt lengths need no recompile. (Without duck shaping: else a batch that happens to equal a fixed size,
    2 kv heads or 64 head dims, would be specialized to it.) On CUDA the shapes are fixed (a graph per batch
    size and 256-slot cache bucket) and mode="reduce-overhead" replays CUDA graphs.
    """
    step = _compiled_decode_step(model.lm_head.weight.device.type == "cuda")

    first = [True]

    def run(*args):
        if first[0]:  # where a (re)compile happens, if any: later steps only change dynamic sizes
            first[0] = False
            with torch.fx.experimental._config.patch(use_duck_shape=False):
                return step(model, *args)
        return step(model, *args)
    run.compiled = step
    return run


@cache
def _compiled_decode_step(cuda: bool):
    return torch.compile(Transformer.decode_step, mode="reduce-overhead" if cuda else None, dynamic=not cuda)
