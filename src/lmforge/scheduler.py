"""Continuous batching: requests join and leave the running batch between decode steps, over a paged KV cache.

    submit(prompt, params) -> queue -> admit (blocks for the prompt free, running < max_running)
      -> prefill in chunks of at most prefill_chunk tokens per step, interleaved with decoding
      -> fork into params.n samples (sharing the prompt's full blocks) -> one token per running row and step
      -> a row that stops frees its blocks at once; the next queued request takes its place

Iteration-level scheduling as in Orca (Yu et al. 2022): the batch is re-formed at every step, so a short request
never waits for a long one. KV memory is a ``model.PagedKVPool`` of ``kv_tokens // block_size`` fixed-size
blocks (vLLM's paged attention, Kwon et al. 2023): each sequence has a block table, so memory stays under the
budget whatever the lengths. A request is queued while its prompt's blocks are not free; a running row that needs
a block when none is free preempts the most recently admitted sequence (its blocks are freed and it is recomputed
later from its tokens, vLLM's recompute mode). Full prompt blocks are shared by reference: the n samples of a
request always, and equal prefixes across requests (a common system prompt) by a chained hash of their tokens.

A request's tokens do not depend on what else runs: each sample draws from its own random stream keyed by its
prompt and sample index (sampling.row_streams), and its keys and values are the same numbers wherever it sits in
the batch (up to float rounding of the batch shape, as in generation.generate).

Decoding speed on CPU: the packed decode step (cpu_decode.PackedDecodeStep) reads a contiguous cache. The running
rows' keys are therefore mirrored in one right-aligned ``KVCache`` (every row writes at the same column, left
padding masked, a position per row), gathered from the pool only when a row joins or the mirror is full; rows
that leave are dropped from it; a step's new keys go to the mirror only, and are written to the pool when the
mirror is rebuilt (a row that leaves frees its blocks, so it needs none).
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

import torch

from lmforge.cpu_decode import PackedDecodeStep, packable, packed_head
from lmforge.model import KVCache, PagedKVPool
from lmforge.sampling import (
    Completion,
    SamplingParams,
    _eos_ids,
    _stop_string_cut,
    apply_repetition_penalty,
    force_thinking,
    row_streams,
    sample_tokens,
    think_states,
)


class Request:
    """One submitted prompt, ``params.n`` samples. ``completions`` is set when it finishes (None if cancelled)."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, streams, stop_ids: set[int],
                 on_token: Callable[[int, int], None] | None = None, think=None):
        self.prompt_ids, self.params, self.streams, self.stop_ids = prompt_ids, params, streams, stop_ids
        self.on_token, self.think = on_token, think  # think: one thinking state machine per sample, or None
        # tokens enough to spell any stop string (only those are decoded each step); 0 = no stop strings
        self.window = 4 * max(map(len, params.stop_strings)) + 4 if params.stop_strings else 0
        self.completions: list[Completion] | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.raise_callback_errors = False  # generate(): an exception in on_token propagates (else: cancels)
        self.sequences: list[Sequence] = []
        self._cancel = False
        self._event = threading.Event()

    @property
    def done(self) -> bool:
        return self._event.is_set()

    def cancel(self) -> None:
        """Thread-safe: the scheduler drops the request at its next step and frees its KV blocks."""
        self._cancel = True

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    def _finish(self, completions=None, error=None) -> None:
        self.completions, self.error = completions, error
        self._event.set()


class Sequence:
    """One sample's state: its tokens (prompt + generated), block table and how many positions are in the pool."""

    def __init__(self, request: Request, sample: int, tokens: list[int], fan: int = 1):
        self.request, self.sample, self.tokens, self.fan = request, sample, tokens, fan
        self.table: list[int] = []  # block ids, position p in block table[p // block_size]
        self.reserved: list[int] = []  # blocks for the n - 1 copies of a shared partial last prompt block
        self.hashes: list[int] = []  # chained hash of each full block registered for prefix sharing
        self.computed = 0  # positions whose keys and values are computed (in the pool, or the decode mirror)
        self.pooled = 0  # of those, the ones written to the pool (the mirror's are flushed when it is rebuilt)
        self.generated: list[int] = []
        self.logprobs: list[float] = []
        self.seen: torch.Tensor | None = None  # (V,) bool, for the repetition penalty
        self.state = "waiting"  # waiting, prefill, ready (its prefill just ended), decode, done
        self.order = 0  # admission order: the latest admitted is preempted first

    @property
    def stream(self):
        return self.request.streams[self.sample]

    @property
    def think(self):
        return self.request.think[self.sample] if self.request.think is not None else None


class BlockAllocator:
    """Free list, reference counts and the prefix table of the pool's blocks."""

    def __init__(self, num_blocks: int):
        self.total = num_blocks
        self.free = deque(range(num_blocks))
        self.refs = [0] * num_blocks
        self.by_key: dict[tuple, int] = {}  # (parent hash, block tokens) -> block
        self.key_of: dict[int, tuple] = {}

    @property
    def used(self) -> int:
        return self.total - len(self.free)

    def allocate(self) -> int | None:
        if not self.free:
            return None
        block = self.free.popleft()
        self.refs[block] = 1
        return block

    def share(self, block: int) -> int:
        self.refs[block] += 1
        return block

    def release(self, blocks: list[int]) -> None:
        for block in blocks:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                key = self.key_of.pop(block, None)
                if key is not None and self.by_key.get(key) == block:
                    del self.by_key[key]
                self.free.append(block)

    def register(self, key: tuple, block: int) -> None:
        if key not in self.by_key and block not in self.key_of:
            self.by_key[key], self.key_of[block] = block, key


class ScratchKV:
    """Key and value storage that outlives one mirror or one prefill forward: the largest of each kind asked for so
    far, handed out again as views of the shape asked for (contents undefined).

    PyTorch's CPU allocator returns big tensors to the OS, so a fresh 50 MB cache paid its page faults again at
    every mirror rebuild and every prefill: 10-40 ms each for SmolLM2 on a 2-core VM (bench/bench_serve_external's
    16-client wave spent ~80 ms of its ~1.3 s in the zero-fills of those caches, profiled). The scheduler drops
    these buffers after a while without work (``Scheduler.IDLE_RELEASE_S``)."""

    def __init__(self):
        self.flat: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def take(self, name: str, shape: tuple[int, ...], device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        n = math.prod(shape)
        held = self.flat.get(name)
        if held is None or held[0].numel() < n or held[0].dtype != dtype or held[0].device != torch.device(device):
            self.flat.pop(name, None)  # the old storage goes before the new one is allocated
            held = self.flat[name] = (torch.empty(n, device=device, dtype=dtype),
                                      torch.empty(n, device=device, dtype=dtype))
        return held[0][:n].view(shape), held[1][:n].view(shape)

    def clear(self) -> None:
        self.flat.clear()


class StepBatch(NamedTuple):
    """One batch of a step's forward: (B,) tokens to decode or (B, T) prompt chunks, their key mask and RoPE
    positions (None, None when every row is aligned), the cache they attend over and write, and whose they are
    (the decoding rows, or a chunk batch's (sequence, chunk length) pairs)."""
    tokens: torch.Tensor
    key_mask: torch.Tensor | None
    position: torch.Tensor | None
    cache: KVCache
    members: list


class DecodeMirror:
    """The decoding rows' keys and values in one contiguous, right-aligned cache, for the packed decode step.

    Storage has room for ``capacity`` rows; the live rows are its first B (``cache`` views them, so the step's
    batched matmuls see exactly B rows). Every row writes its next key at the same column ``cache.length``; a
    row with fewer positions is left-padded (``key_mask`` 0) and has its own RoPE ``position``. A row that leaves
    is replaced by the last row (one row copied, not the whole cache); a row that joins is gathered from the pool
    into the next free row. Rebuilt from the pool only when a joining row is longer than the mirror is wide, or
    the columns run out.
    """

    def __init__(self, config, capacity: int, width: int, room: int, device, dtype, scratch: ScratchKV | None = None):
        L, kv, d = config.num_hidden_layers, config.num_key_value_heads, config.resolved_head_dim
        # uninitialised: every position a step reads is written first (gathered when its row joins, at or left of
        # the width: padding from the pool's zero slot; decoded at cache.length after)
        self.k, self.v = (scratch or ScratchKV()).take("mirror", (L, capacity, kv, width + room, d), device, dtype)
        self.position = torch.zeros(capacity, 1, dtype=torch.long, device=device)
        self.key_mask = torch.ones(capacity, width + room, dtype=torch.long, device=device)
        self.cache = KVCache(config, 0, 0, device=device, dtype=dtype)
        self.cache.length = width
        self.rows: list[Sequence] = []
        self.uniform = True  # every row has cache.length positions: no mask, default positions
        self._view()

    def _view(self) -> None:
        B = len(self.rows)
        self.cache.k, self.cache.v = self.k[:, :B], self.v[:, :B]

    def fits(self, joining: list[Sequence]) -> bool:
        return (self.cache.length < self.k.shape[3] and len(self.rows) + len(joining) <= self.k.shape[1]
                and all(s.computed <= self.cache.length for s in joining))

    def add(self, joining: list[Sequence], pool: PagedKVPool) -> None:
        """Gather the joining rows' positions from the pool, right-aligned at the current width."""
        W, B, b = self.cache.length, len(self.rows), len(joining)
        slots = torch.full((b, W), pool.zero_slot, dtype=torch.long)
        for i, s in enumerate(joining):
            slots[i, W - s.computed:] = torch.tensor(pool.slots(s.table, 0, s.computed))
            self.uniform = self.uniform and s.computed == W
        self.k[:, B:B + b, :, :W], self.v[:, B:B + b, :, :W] = pool.gather(slots.to(self.k.device))
        self.position[B:B + b, 0] = torch.tensor([s.computed for s in joining])
        self.key_mask[B:B + b] = 1
        for i, s in enumerate(joining):
            self.key_mask[B + i, :W - s.computed] = 0
        self.rows += joining
        self._view()

    def drop(self, leaving: set[int]) -> None:
        """Remove the rows whose id is in ``leaving``: each hole is filled by the current last row."""
        for i in sorted((i for i, s in enumerate(self.rows) if id(s) in leaving), reverse=True):
            last = len(self.rows) - 1
            if i != last:
                for t in (self.k, self.v):
                    t[:, i] = t[:, last]
                self.position[i], self.key_mask[i] = self.position[last], self.key_mask[last]
                self.rows[i] = self.rows[last]
            self.rows.pop()
        self._view()

    def flush(self, pool: PagedKVPool) -> None:
        """Write the positions computed here since each row joined to the pool (before the mirror is dropped;
        rows that leave need none: their blocks are freed)."""
        W, rows, cols, slots = self.cache.length, [], [], []
        for i, s in enumerate(self.rows):
            rows += [i] * (s.computed - s.pooled)
            cols += range(W - s.computed + s.pooled, W)
            slots += pool.slots(s.table, s.pooled, s.computed)
            s.pooled = s.computed
        if slots:
            r, c = torch.tensor(rows, device=self.k.device), torch.tensor(cols, device=self.k.device)
            pool.write(torch.tensor(slots, device=self.k.device), self.k[:, r, :, c].transpose(0, 1),
                       self.v[:, r, :, c].transpose(0, 1))

    def inputs(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(key mask over length + 1 columns, positions) for the step; None, None when every row is aligned."""
        if self.uniform:
            return None, None
        B = len(self.rows)
        return self.key_mask[:B, :self.cache.length + 1], self.position[:B]


class Scheduler:
    """Continuous batching over a paged KV pool; ``step`` runs one iteration, ``start`` a thread that steps.

    kv_tokens: the pool's budget (rounded down to whole blocks); block_size: positions a block holds, which is
    also how finely equal prefixes are shared (8: SmolLM2's 24-token system-prompt preamble shares 3 blocks instead
    of 1 at 16, and a 16-client wave's second prefill took 125-141 against 160-179 ms; the decode step reads the
    mirror, not the blocks, so smaller blocks cost it nothing); max_running: most sequences (samples) prefilling
    or decoding at once; prefill_chunk: most prompt tokens prefilled per step (the rest waits for later steps, so
    running rows keep decoding); min_admit: while rows are decoding, admit only once this many places are free
    (or the whole queue fits): fewer, larger prefill forwards, each of which has a fixed cost on a CPU (1 = admit
    at every step, the lowest latency). ``step`` and ``generate`` are not to be called while ``start``'s thread
    runs.
    """

    IDLE_RELEASE_S = 10.0  # run()/start(): seconds without work before the scratch buffers are freed

    def __init__(self, model, tokenizer=None, *, eos_token_ids: list[int] | None = None, pad_id: int = 0,
                 kv_tokens: int = 16384, block_size: int = 8, max_running: int = 32, prefill_chunk: int = 512,
                 min_admit: int = 1):
        if block_size < 1 or kv_tokens < block_size or max_running < 1 or prefill_chunk < 1:
            raise ValueError(f"need block_size >= 1, kv_tokens >= block_size, max_running >= 1 and prefill_chunk"
                             f" >= 1, got {block_size}, {kv_tokens}, {max_running}, {prefill_chunk}")
        self.model, self.tokenizer, self.pad_id = model, tokenizer, pad_id
        self.max_running, self.prefill_chunk, self.block_size = max_running, prefill_chunk, block_size
        self.min_admit = min_admit
        w = model.lm_head.weight
        self.device, self.dtype = w.device, w.dtype
        self.pool = PagedKVPool(model.config, kv_tokens // block_size, block_size, self.device, self.dtype)
        self.blocks = BlockAllocator(self.pool.num_blocks)
        self.stop_ids = set(_eos_ids(tokenizer) if eos_token_ids is None else eos_token_ids)
        self.packed = PackedDecodeStep(model, max_running) if packable(model, max_running) else None
        self.head = self.packed.head if self.packed is not None else packed_head(model, max_running)
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.decoding: list[Sequence] = []
        self.requests: list[Request] = []
        self.mirror: DecodeMirror | None = None
        self.scratch = ScratchKV()
        self._intake: list[Request] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._order = itertools.count()
        self.counts = dict(generated_tokens=0, preemptions=0, prefix_blocks_reused=0, steps=0,
                           mirror_rebuilds=0, kv_blocks_peak=0)

    # ---- the public interface ----

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               on_token: Callable[[int, int], None] | None = None) -> Request:
        """Queue a prompt (thread-safe). on_token(sample_index, token_id) runs on the scheduler's thread; an
        exception in it cancels this request only."""
        self.check(prompt_ids, params)
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()))
        return self._enqueue(list(prompt_ids), params, row_streams([list(prompt_ids)], params.n, seed), on_token)

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 on_token: Callable[[int, int], None] | None = None) -> list[list[Completion]]:
        """generation.generate's contract: completions[prompt][sample], on_token(prompt * n + sample, token)."""
        if not prompts:
            raise ValueError("every prompt needs at least one token (add a bos token to empty prompts)")
        for prompt in prompts:
            self.check(prompt, params)
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()))
        streams, n = row_streams(prompts, params.n, seed), params.n
        requests = []
        for i, prompt in enumerate(prompts):
            callback = (lambda j, t, base=i * n: on_token(base + j, t)) if on_token is not None else None
            requests.append(self._enqueue(list(prompt), params, streams[i * n:(i + 1) * n], callback, True))
        while self.step():
            pass
        return [r.completions for r in requests]

    def step(self) -> bool:
        """One iteration: admit, one decode token per running row, prefill chunk(s), sample. False when idle."""
        with torch.inference_mode():
            self._take_intake()
            self._drop_cancelled()
            self._admit()
            decode, chunks = self._decode_batch(), self._prefill_batch()
            hidden = self._forward([b for b in (decode, chunks) if b is not None])
            rows, logits = self._decode(decode, hidden.pop(0) if decode is not None else None)
            ready, ready_logits = self._prefill(chunks, hidden.pop(0) if chunks is not None else None)
            if ready:
                rows, logits = rows + ready, ready_logits if logits is None else torch.cat((logits, ready_logits))
            if rows:
                self._sample(rows, logits)
            self.counts["steps"] += 1
            self.counts["kv_blocks_peak"] = max(self.counts["kv_blocks_peak"], self.blocks.used)
            return bool(rows or self.waiting or self.prefilling or self.decoding or self._intake)

    def start(self) -> None:
        """A background thread that steps while there is work and sleeps until a submit when there is none.

        On CPU a step runs slower there than on the main thread (SmolLM2-135M batch 1: ~48 against ~33 ms;
        bench/bench_serve_overhead.py): libgomp sees more OpenMP threads than cores once a second thread has its
        own team (the main thread's stays), so its workers sleep between the ~600 small parallel regions of a
        step instead of spinning. `lmforge serve` therefore calls ``run`` on its main thread instead."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="lmforge-scheduler", daemon=True)
        self._thread.start()

    def run(self) -> None:
        """``start``'s loop on the calling thread, until ``stop()`` from another thread (or KeyboardInterrupt)."""
        self._stopping = False
        self._loop()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def stats(self) -> dict:
        # running: sequences admitted and not finished, those being sampled this very step included (a stats()
        # from another thread, e.g. serve's /metrics, may come while the step hands out their tokens)
        running = sum(q.state in ("prefill", "ready", "decode") for r in list(self.requests) for q in list(r.sequences))
        return dict(queued=len(self.waiting) + len(self._intake), running=running,
                    kv_blocks_used=self.blocks.used, kv_blocks_total=self.blocks.total,
                    block_size=self.block_size, **self.counts)

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """ValueError naming what is wrong with a request (generation.generate's checks, and the KV budget)."""
        params.validate()
        vocab = self.model.config.vocab_size
        if len(prompt_ids) == 0:
            raise ValueError("every prompt needs at least one token (add a bos token to empty prompts)")
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab}) (the model's vocab_size)")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer to decode with")
        if params.forces_thinking and self.tokenizer is None:
            raise ValueError("a thinking budget needs a tokenizer (to find <think> and </think>)")
        need = -(-(len(prompt_ids) + params.max_new_tokens) // self.block_size) + params.n - 1
        if need > self.blocks.total:
            raise ValueError(f"a prompt of {len(prompt_ids)} tokens + max_new_tokens={params.max_new_tokens} "
                             f"(n={params.n}) needs {need} KV blocks of {self.block_size} tokens; the pool has "
                             f"{self.blocks.total} (raise kv_tokens)")

    # ---- intake, cancellation, admission, preemption ----

    def _enqueue(self, prompt, params, streams, on_token, raise_errors: bool = False) -> Request:
        stop_ids = set(params.stop_token_ids) | self.stop_ids
        think = think_states(self.tokenizer, [prompt], [0] * params.n, params)
        request = Request(prompt, params, streams, stop_ids, on_token, think)
        request.raise_callback_errors = raise_errors
        request.sequences = [Sequence(request, 0, list(prompt), params.n)]
        with self._wake:
            self._intake.append(request)
            self._wake.notify()
        return request

    def _take_intake(self) -> None:
        with self._wake:
            intake, self._intake = self._intake, []
        for request in intake:
            self.requests.append(request)
            self.waiting.append(request.sequences[0])

    def _drop_cancelled(self) -> None:
        cancelled = [r for r in self.requests if r._cancel]
        for request in cancelled:
            for seq in request.sequences:
                self._free(seq)
                seq.state = "done"
            self.waiting = deque(s for s in self.waiting if s.request is not request)
            self.requests.remove(request)
            request.cancelled = True
            request._finish()

    def _running(self) -> int:
        return len(self.prefilling) + len(self.decoding)

    def _admit(self) -> None:
        """Admit queued sequences in order while their prompt blocks are free and the batch has room."""
        bs = self.block_size
        free = self.max_running - self._running()
        if self.decoding and self.waiting and free < min(self.min_admit, sum(s.fan for s in self.waiting)):
            return
        while self.waiting:
            seq = self.waiting[0]
            if self._running() and self._running() + seq.fan > self.max_running:
                return
            matched, hashes = self._match_prefix(seq.tokens)
            partial = seq.fan - 1 if len(seq.tokens) % bs else 0
            need = -(-len(seq.tokens) // bs) - len(matched) + partial
            if need > len(self.blocks.free):
                return
            self.waiting.popleft()
            seq.table = [self.blocks.share(b) for b in matched] + [self.blocks.allocate() for _ in
                                                                  range(need - partial)]
            seq.reserved = [self.blocks.allocate() for _ in range(partial)]
            seq.hashes, seq.computed = hashes, len(matched) * bs
            seq.state, seq.order = "prefill", next(self._order)
            self.counts["prefix_blocks_reused"] += len(matched)
            self.prefilling.append(seq)

    def _match_prefix(self, tokens: list[int]) -> tuple[list[int], list[int]]:
        """Registered blocks holding a prefix of ``tokens`` (never the last token: its logits are needed)."""
        matched, hashes, parent, bs = [], [], 0, self.block_size
        for i in range((len(tokens) - 1) // bs):
            key = (parent, tuple(tokens[i * bs:(i + 1) * bs]))
            block = self.blocks.by_key.get(key)
            if block is None:
                break
            parent = hash(key)
            matched.append(block)
            hashes.append(parent)
        return matched, hashes

    def _register_full_blocks(self, seq: Sequence) -> None:
        bs = self.block_size
        for i in range(len(seq.hashes), seq.computed // bs):
            key = (seq.hashes[-1] if seq.hashes else 0, tuple(seq.tokens[i * bs:(i + 1) * bs]))
            self.blocks.register(key, seq.table[i])
            seq.hashes.append(hash(key))

    def _free(self, seq: Sequence) -> None:
        self.blocks.release(seq.table + seq.reserved)
        seq.table, seq.reserved, seq.hashes, seq.computed, seq.pooled = [], [], [], 0, 0
        if seq.state == "prefill":
            self.prefilling.remove(seq)
        elif seq.state == "decode":
            self.decoding.remove(seq)

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and queue it first: it is recomputed from its tokens when readmitted."""
        self._free(seq)
        seq.state = "waiting"
        self.waiting.appendleft(seq)
        self.counts["preemptions"] += 1

    def _grow_tables(self) -> None:
        """Give every decoding row the block its next position needs, preempting the latest admitted when full."""
        bs = self.block_size
        for seq in list(self.decoding):
            while seq.state == "decode" and seq.computed // bs >= len(seq.table):
                block = self.blocks.allocate()
                if block is not None:
                    seq.table.append(block)
                else:
                    self._preempt(max(self.prefilling + self.decoding, key=lambda s: s.order))

    # ---- prefill ----

    def _forward(self, batches: list[StepBatch]) -> list[torch.Tensor]:
        """The step's forward: the hidden states of each batch's last tokens. Through
        the packed step, the decoding rows and the prefill chunks together, so a step with prefill passes over
        the weights once (bench/bench_prefill_pass.py, SmolLM2 bf16, 15 rows decoding + 1 prompt joining: 45.5
        against 58.8 ms a step; 12 + 4: 94.0 against 112.3; fp32 15 + 1: 104.6 against 125.3); else the model's
        forward per batch."""
        if not batches:
            return []
        if self.packed is not None:
            return self.packed.forward_groups([b[:4] for b in batches])
        return [self.model(b.tokens if b.tokens.dim() == 2 else b.tokens[:, None], attention_mask=b.key_mask,
                           position_ids=b.position, cache=b.cache, return_hidden=True)[:, -1] for b in batches]

    def _prefill_batch(self) -> StepBatch | None:
        """Up to prefill_chunk tokens of the admitted sequences as one batch (``_chunk_batch``), or None."""
        work, budget = [], self.prefill_chunk
        for seq in self.prefilling:
            if budget <= 0:
                break
            chunk = min(len(seq.tokens) - seq.computed, budget)
            work.append((seq, chunk))
            budget -= chunk
        return self._chunk_batch(work) if work else None

    def _prefill(self, batch: StepBatch | None,
                 hidden: torch.Tensor | None) -> tuple[list[Sequence], torch.Tensor | None]:
        """After the forward of a prefill batch: its keys and values into the pool; the rows whose prompt is
        now complete, forked into their samples, with their next-token logits."""
        if batch is None:
            return [], None
        work = batch.members
        self._write_chunks(batch)
        rows, index = [], []
        for i, (seq, _) in enumerate(work):
            self._register_full_blocks(seq)
            if seq.computed == len(seq.tokens):
                self.prefilling.remove(seq)
                samples = self._fork(seq) if seq.fan > 1 else [seq]
                for sample in samples:
                    sample.state = "ready"  # sampled this step, then decoding
                rows += samples
                index += [i] * len(samples)
        if not rows:
            return [], None
        logits = self.head(hidden[torch.tensor(index, device=self.device)])
        return rows, logits

    def _chunk_batch(self, work: list[tuple[Sequence, int]]) -> StepBatch:
        """The batch of a forward over each sequence's next ``chunk`` tokens,
        attending to its positions already in the pool; rows right-aligned (past in [P - computed, P), chunk in
        [P + T - chunk, P + T)), padding masked, the past gathered from the pool into the cache."""
        B, P, T = len(work), max(s.computed for s, _ in work), max(c for _, c in work)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        mask, positions = torch.zeros(B, P + T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
        past = torch.full((B, P), self.pool.zero_slot, dtype=torch.long)  # pool slots of the past keys
        for i, (seq, c) in enumerate(work):
            ids[i, T - c:] = torch.tensor(seq.tokens[seq.computed:seq.computed + c])
            positions[i, T - c:] = torch.arange(seq.computed, seq.computed + c)
            mask[i, P - seq.computed:P] = 1
            mask[i, P + T - c:] = 1
            if seq.computed:
                past[i, P - seq.computed:] = torch.tensor(self.pool.slots(seq.table, 0, seq.computed))
        cfg = self.model.config
        cache = KVCache(cfg, 0, 0, device=self.device, dtype=self.dtype)
        # uninitialised: the past is gathered into [0, P) for every row (padding from the zero slot), the forward
        # writes [P, P + T)
        cache.k, cache.v = self.scratch.take("prefill", (cfg.num_hidden_layers, B, cfg.num_key_value_heads, P + T,
                                                         cfg.resolved_head_dim), self.device, self.dtype)
        if P:
            cache.k[:, :, :, :P], cache.v[:, :, :, :P] = self.pool.gather(past.to(self.device))
            cache.length = P
        ragged = any(s.computed != P or c != T for s, c in work)
        mask, positions = (mask.to(self.device), positions.to(self.device)) if ragged else (None, None)
        return StepBatch(ids.to(self.device), mask, positions, cache, work)

    def _write_chunks(self, batch: StepBatch) -> None:
        """The keys and values a chunk batch's forward wrote, from its cache into each sequence's blocks."""
        cache, work, T = batch.cache, batch.members, batch.tokens.shape[1]
        P = cache.length - T  # the forward advanced the cache's length past the chunk
        rows, cols, slots = [], [], []
        for i, (seq, c) in enumerate(work):
            rows += [i] * c
            cols += range(P + T - c, P + T)
            slots += self.pool.slots(seq.table, seq.computed, seq.computed + c)
            seq.computed += c
            seq.pooled = seq.computed
        r, c = torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device)
        self.pool.write(torch.tensor(slots, device=self.device), cache.k[:, r, :, c].transpose(0, 1),
                        cache.v[:, r, :, c].transpose(0, 1))

    def _fork(self, leader: Sequence) -> list[Sequence]:
        """The n samples of a prefilled prompt: full blocks shared, the partial last block copied per sample."""
        full, rest = divmod(leader.computed, self.block_size)
        samples = [leader]
        for j in range(1, leader.fan):
            seq = Sequence(leader.request, j, list(leader.tokens))
            seq.table = [self.blocks.share(b) for b in leader.table[:full]]
            if rest:
                block = leader.reserved.pop()
                self.pool.copy_block(leader.table[full], block, rest)
                seq.table.append(block)
            seq.hashes, seq.computed, seq.pooled, seq.order = (list(leader.hashes), leader.computed,
                                                                leader.computed, leader.order)
            samples.append(seq)
        leader.fan = 1
        leader.request.sequences = samples
        return samples

    # ---- decode ----

    def _decode_batch(self) -> StepBatch | None:
        """Every decoding row's last token over the mirror (members: the rows), or None."""
        self._grow_tables()
        if not self.decoding:
            self.mirror = None
            return None
        mirror = self._sync_mirror()
        rows = list(mirror.rows)
        tokens = torch.tensor([s.tokens[-1] for s in rows], device=self.device)
        mask, position = mirror.inputs()
        return StepBatch(tokens, mask, position, mirror.cache, rows)

    def _decode(self, batch: StepBatch | None,
                hidden: torch.Tensor | None) -> tuple[list[Sequence], torch.Tensor | None]:
        """After the decode batch's forward: (rows, their next-token logits)."""
        if batch is None:
            return [], None
        rows = batch.members
        logits = self.head(hidden)
        for seq in rows:
            seq.computed += 1
        self.mirror.position[:len(rows)] += 1
        return rows, logits

    def _sync_mirror(self) -> DecodeMirror:
        """Make the mirror hold exactly the decoding rows (drop those that left, add those that joined)."""
        mirror = self.mirror
        current = {id(s) for s in self.decoding}
        if mirror is not None:
            mirror.drop({id(s) for s in mirror.rows} - current)
            held = {id(s) for s in mirror.rows}
            joining = [s for s in self.decoding if id(s) not in held]
            if mirror.fits(joining):
                if joining:
                    mirror.add(joining, self.pool)
                return mirror
            mirror.flush(self.pool)
        W = max(s.computed for s in self.decoding)
        room = max(1, min(1024, max(s.request.params.max_new_tokens - len(s.generated) for s in self.decoding)))
        self.mirror = DecodeMirror(self.model.config, max(self.max_running, len(self.decoding)), W, room,
                                   self.device, self.dtype, self.scratch)
        self.mirror.add(list(self.decoding), self.pool)
        self.counts["mirror_rebuilds"] += 1
        return self.mirror

    # ---- sampling and finishing ----

    def _sample(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        """One token per row, each request's sampling parameters on its rows (rows sharing params together)."""
        groups: dict[int, list[int]] = {}
        for i, seq in enumerate(rows):
            groups.setdefault(id(seq.request.params), []).append(i)
        for idx in groups.values():
            seqs = [rows[i] for i in idx]
            sub = logits if len(idx) == len(rows) else logits[torch.tensor(idx, device=self.device)]
            params = seqs[0].request.params
            picked = sample_tokens(self._penalised(sub, seqs, params), params,
                                   lambda r, seqs=seqs: torch.tensor([seqs[j].stream.random() for j in
                                                                      (range(len(seqs)) if r is None else r)],
                                                                     device=self.device))
            if seqs[0].think is not None:
                picked = force_thinking(picked, range(len(seqs)), [s.think for s in seqs])
            lps = [None] * len(seqs)
            if params.return_logprobs:
                scaled = sub / params.logprobs_temperature if params.logprobs_temperature != 1.0 else sub
                lps = (scaled.gather(-1, picked[:, None]).squeeze(-1) - scaled.logsumexp(-1)).tolist()
            for seq, token, lp in zip(seqs, picked.tolist(), lps):
                self._emit(seq, token, lp)
            self.counts["generated_tokens"] += len(seqs)

    def _penalised(self, logits: torch.Tensor, seqs: list[Sequence], params: SamplingParams) -> torch.Tensor:
        if params.repetition_penalty == 1.0:
            return logits
        for seq in seqs:
            if seq.seen is None:
                seq.seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=self.device)
                seq.seen[torch.tensor(seq.tokens, device=self.device)] = True
        return apply_repetition_penalty(logits, torch.stack([s.seen for s in seqs]), params.repetition_penalty)

    def _emit(self, seq: Sequence, token: int, logprob: float | None) -> None:
        request = seq.request
        seq.tokens.append(token)
        seq.generated.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        if seq.seen is not None:
            seq.seen[token] = True
        if request.on_token is not None:
            try:
                request.on_token(seq.sample, token)
            except Exception:
                if request.raise_callback_errors:
                    raise
                request.cancel()  # a client that went away: dropped at the next step
        if token in request.stop_ids:
            self._finish(seq, "stop")
        elif request.window and (cut := _stop_string_cut(self.tokenizer, seq.generated, request.params,
                                                          request.window)):
            self._finish(seq, "stop", cut[0])
        elif len(seq.generated) == request.params.max_new_tokens:
            self._finish(seq, "length")
        elif seq.state != "decode":
            seq.state = "decode"
            self.decoding.append(seq)

    def _finish(self, seq: Sequence, reason: str, text: str | None = None) -> None:
        self._free(seq)
        seq.state, seq.finish, seq.text = "done", reason, text
        request = seq.request
        if all(s.state == "done" for s in request.sequences) and len(request.sequences) == request.params.n:
            self.requests.remove(request)
            request._finish([self._completion(s) for s in request.sequences])

    def _completion(self, seq: Sequence) -> Completion:
        text = seq.text
        if self.tokenizer is not None and text is None:
            ids = seq.generated[:-1] if seq.finish == "stop" else seq.generated  # the stop token is not text
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
        state = seq.think
        return Completion(seq.generated, seq.finish, text, seq.logprobs if seq.request.params.return_logprobs
                          else None, state.thinking_tokens if state else None, bool(state and state.forced_close),
                          state.waits if state else 0)

    # ---- the background thread ----

    def _loop(self) -> None:
        idle_since = None
        while not self._stopping:
            try:
                busy = self.step()
            except BaseException as error:  # noqa: BLE001  (every waiting client gets the error, not a hang)
                self._fail_all(error)
                if not isinstance(error, Exception):  # Ctrl-C or exit on the thread that runs the loop: stop
                    raise
                busy = False
            if busy:
                idle_since = None
                continue
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > self.IDLE_RELEASE_S:
                self.scratch.clear()  # a server without work gives its cache buffers back
            with self._wake:
                if not self._intake and not self._stopping:
                    self._wake.wait(0.5)

    def _fail_all(self, error: BaseException) -> None:
        for request in self.requests:
            for seq in request.sequences:
                self._free(seq)
                seq.state = "done"
            request._finish(error=error)
        self.requests, self.waiting, self.mirror = [], deque(), None
        self.scratch.clear()
