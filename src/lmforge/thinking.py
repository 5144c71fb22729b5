"""Thinking budgets: a per-row state machine the sampling loop consults once per generated token.

A model with a think block writes ``<think> ... </think>`` and then its answer. Budget forcing (Muennighoff et
al. 2025, "s1: Simple test-time scaling") controls how long it thinks, with no training:

    max_tokens   when the thinking reaches the budget, the close tag is forced and the model must answer
    min_tokens   when the model closes its thinking earlier, the close is replaced by "Wait" and it goes on
    num_waits    the model's first ``num_waits`` closes are replaced by "Wait", however long it has thought
                 (s1's "ignore the end of thinking N times": one more look at its own work per Wait)

Thinking tokens are those strictly between the open and the close tag (a forced "Wait" counts; the tags do not),
so a row never thinks more than ``max_tokens`` tokens. The machine sees only token ids: ``step(sampled)`` takes
the token the sampler drew and returns the token to emit (the sampled one, or a forced one), which keeps it
independent of how the engine batches rows. Tags are token-id sequences, matched on the row's generated tail;
for the "Wait" extension the close tag should be one token (it is in lmforge's thinking tokenizer, Qwen3 and
DeepSeek-R1): with a multi-token close the tokens before its last are already out when the close is seen.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE, WAIT = "<think>", "</think>", "Wait"


def split_steps(text: str) -> list[str]:
    """A completion as a PRM reads it: each non-empty line of the think block, then ``</think>`` + newline + the
    answer as one last step. Text without a close (thinking cut off, or no think block) is its non-empty lines."""
    if THINK_CLOSE in text:
        thinking, answer = text.split(THINK_CLOSE, 1)
        return _lines(thinking) + [THINK_CLOSE + "\n" + answer.strip()]
    return _lines(text)


def _lines(text: str) -> list[str]:
    return [line for line in text.split(THINK_OPEN, 1)[-1].split("\n") if line.strip()]


@dataclass(frozen=True)
class ThinkTags:
    """The token ids of the open tag, the close tag and the text a "Wait" extension inserts."""
    open: tuple[int, ...]
    close: tuple[int, ...]
    wait: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer, open_tag: str = THINK_OPEN, close_tag: str = THINK_CLOSE,
                       wait: str = WAIT) -> ThinkTags:
        encode = tokenizer.encode
        tags = cls(tuple(encode(open_tag)), tuple(encode(close_tag)), tuple(encode(wait)))
        if not (tags.open and tags.close and tags.wait):
            raise ValueError(f"the tokenizer encodes {open_tag!r}, {close_tag!r} or {wait!r} to no tokens")
        return tags


def _ends_with(ids: list[int], tag: tuple[int, ...]) -> bool:
    return len(ids) >= len(tag) and ids[-1] == tag[-1] and tuple(ids[-len(tag):]) == tag


def _completes(ids: list[int], token: int, tag: tuple[int, ...]) -> bool:
    """Would ``token`` after ``ids`` end with ``tag``?"""
    n = len(tag)
    return token == tag[-1] and len(ids) >= n - 1 and tuple(ids[len(ids) - n + 1:]) == tag[:-1]


def _last_index(ids: list[int], tag: tuple[int, ...]) -> int:
    """Start of the last occurrence of ``tag`` in ``ids``, -1 when absent."""
    n = len(tag)
    for i in range(len(ids) - n, -1, -1):
        if tuple(ids[i:i + n]) == tag:
            return i
    return -1


def opened_in_prompt(prompt_ids: list[int], tags: ThinkTags) -> bool:
    """Does the prompt end inside a think block (a template that opens it for the model)?"""
    return _last_index(prompt_ids, tags.open) > _last_index(prompt_ids, tags.close)


@dataclass
class ThinkState:
    """One row's thinking: phase "before" (no think block yet), "thinking" or "answer"."""
    tags: ThinkTags
    max_tokens: int | None = None  # None: no budget
    min_tokens: int = 0
    num_waits: int = 0  # the first num_waits closes become "Wait"
    phase: str = "before"
    thinking_tokens: int = 0
    forced_close: bool = False  # the budget closed the block
    waits: int = 0  # "Wait" extensions inserted
    emitted: list[int] = field(default_factory=list)
    queue: deque = field(default_factory=deque)

    def __post_init__(self):
        if self.max_tokens is not None and self.max_tokens < 0:
            raise ValueError(f"thinking budget must be >= 0, got {self.max_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min thinking tokens ({self.min_tokens}) above the budget ({self.max_tokens})")
        if self.num_waits < 0:
            raise ValueError(f"num_waits must be >= 0, got {self.num_waits}")
        if self.phase == "thinking":
            self._check_budget()

    def step(self, sampled: int) -> int:
        """The token to emit instead of (or as) ``sampled``, and the state after emitting it."""
        forced = bool(self.queue)
        token = self.queue.popleft() if forced else sampled
        if self.phase == "thinking" and not forced and _completes(self.emitted, token, self.tags.close):
            if self._real_thinking(len(self.tags.close)) < self.min_tokens or self.waits < self.num_waits:
                token = self._wait_instead()
        self.emitted.append(token)
        if self.phase == "before":
            if _ends_with(self.emitted, self.tags.open):
                self.phase = "thinking"
                self._check_budget()
        elif self.phase == "thinking":
            if _ends_with(self.emitted, self.tags.close) and (not forced or not self.queue):
                self.thinking_tokens = self._real_thinking(len(self.tags.close))
                self.phase = "answer"
            elif not (forced and self.forced_close):
                self.thinking_tokens += 1
                self._check_budget()
        return token

    def _real_thinking(self, close_len: int) -> int:
        """Thinking tokens once a close of ``close_len`` tokens has just been emitted: its earlier tokens were
        counted as thinking while they came out."""
        return self.thinking_tokens - (close_len - 1) if not self.forced_close else self.thinking_tokens

    def _wait_instead(self) -> int:
        """Replace a close below the minimum by the first "Wait" token; queue the rest of "Wait"."""
        self.waits += 1
        self.queue.extend(self.tags.wait[1:])
        return self.tags.wait[0]

    def _check_budget(self) -> None:
        if self.max_tokens is None or self.thinking_tokens < self.max_tokens or self.forced_close:
            return
        self.forced_close = True
        self.queue.clear()  # a "Wait" still queued gives way to the close
        done = next((k for k in range(len(self.tags.close) - 1, 0, -1)
                     if _ends_with(self.emitted, self.tags.close[:k])), 0)  # a close already begun
        self.queue.extend(self.tags.close[done:])


def new_state(tags: ThinkTags, prompt_ids: list[int], max_tokens: int | None, min_tokens: int = 0,
              num_waits: int = 0) -> ThinkState:
    """A row's machine, starting inside the block when the prompt opened it."""
    phase = "thinking" if opened_in_prompt(prompt_ids, tags) else "before"
    return ThinkState(tags, max_tokens, min_tokens, num_waits, phase=phase)


def count_thinking(token_ids: list[int], tags: ThinkTags, started_inside: bool = False) -> int:
    """Thinking tokens in a finished completion: strictly between the open (or the start, when the prompt
    opened the block) and the close; an unclosed block counts to the end."""
    state = ThinkState(tags, phase="thinking" if started_inside else "before")
    for t in token_ids:
        state.step(t)
    return state.thinking_tokens
