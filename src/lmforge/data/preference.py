"""Preference data: reading, validating and tokenizing pairs (reward model, DPO family) and unpaired rows (KTO).

Rows, in TRL's field names (jsonl / json / parquet / ``hf:NAME[:CONFIG][@SPLIT]`` / ``builtin:NAME``):

    {"prompt": "2+2?", "chosen": "4", "rejected": "5"}                      strings: one user + one assistant turn
    {"prompt": [messages], "chosen": [assistant messages], "rejected": [...]}            conversational
    {"chosen": [full conversation], "rejected": [full conversation]}        implicit prompt: the shared prefix
    {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}        implicit, Anthropic HH text dialogues
    {"prompt": ..., "completion": ..., "label": true}                       unpaired (KTO)

A malformed row (missing field, wrong type) is one DataError naming file:line and the field. A well-formed
row that cannot teach a preference is dropped and counted by reason, never silently:

    identical          chosen == rejected
    no_shared_prompt   implicit form, but chosen and rejected share no prompt prefix
    prompt_not_prefix  explicit prompt, but a full conversation in chosen/rejected does not start with it
    tie                chosen_score <= rejected_score (when score fields are configured)
    empty_answer       chosen or rejected is empty (real datasets have a few)

Tokenizing goes through ``data.chat.tokenize_prompt_completion``, so prompts end with the assistant header and
completions run through the end-of-turn marker, exactly what the generation engine produces and scores.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from lmforge.data.chat import check_messages, tokenize_prompt_completion
from lmforge.data.rows import read_rows
from lmforge.errors import DataError

ASSISTANT_MARKERS = ("\n\nAssistant:", "<|im_start|>assistant\n")


@dataclass
class PreferenceDataConfig:
    source: str = ""  # file, dir, glob, builtin:NAME or hf:NAME[:CONFIG][@SPLIT]
    eval_source: str = ""  # held-out pairs; empty: split eval_fraction off the training rows
    eval_fraction: float = 0.1
    max_rows: int = 0  # 0 = all
    max_length: int = 512  # prompt + completion tokens; longer rows are truncated (counted)
    max_prompt_length: int = 256  # prompts keep their last tokens
    chosen_score: str = ""  # dotted field with the chosen answer's score (e.g. metadata.score_chosen) ...
    rejected_score: str = ""  # ... and the rejected one's: ties are dropped; the difference is the RM margin

    def validate(self) -> None:
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_prompt_length < 1 or self.max_length <= self.max_prompt_length:
            raise ValueError(f"need 1 <= max_prompt_length < max_length, got {self.max_prompt_length} and "
                             f"{self.max_length}")
        if bool(self.chosen_score) != bool(self.rejected_score):
            raise ValueError("set both chosen_score and rejected_score, or neither")


@dataclass
class Pair:
    """One preference pair as text (prompt and answers: strings or message lists)."""
    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]
    where: str
    margin: float = 0.0  # score_chosen - score_rejected when scores are configured
    confidence: float = 1.0  # P(chosen is better): an AI judge's soft label (`label_confidence`), else 1


@dataclass
class TokenPair:
    """One tokenized pair; ref_* hold the reference model's log-probs once precomputed."""
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float = 0.0
    confidence: float = 1.0
    ref_chosen: float | None = None
    ref_rejected: float | None = None


@dataclass
class TokenExample:
    """One tokenized unpaired example (KTO): its completion, its label and a mismatched completion for the KL
    reference point (the prompt with another example's completion), with their reference log-probs."""
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    kl_completion_ids: list[int] = field(default_factory=list)
    ref: float | None = None
    ref_kl: float | None = None


# ------------------------------------------------------------------------------------------------ reading rows

def _dotted(row: dict, path: str, where: str) -> float:
    node = row
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise DataError(f"{where}: field {path!r} missing")
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise DataError(f"{where}: field {path!r} must be a number, got {node!r:.40}")
    value = float(node) if not isinstance(node, int) or abs(node) < 2 ** 1023 else math.inf
    if not math.isfinite(value):  # JSON's NaN and Infinity parse as floats; a NaN margin trains on NaN
        raise DataError(f"{where}: field {path!r} must be a finite number, got {str(node):.40}")
    return value


def _check_answer(value, where: str, name: str):
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return check_messages(value, where, name, need_assistant=False)
    if value is None:
        raise DataError(f"{where}: field {name!r} missing")
    raise DataError(f"{where}: field {name!r} must be a string or a list of messages, got {value!r:.40}")


def _is_empty(answer) -> bool:
    if isinstance(answer, str):
        return not answer.strip()
    return isinstance(answer, list) and any(isinstance(m, dict) and m.get("role") == "assistant"
                                            and isinstance(m.get("content"), str) and not m["content"].strip()
                                            for m in answer)


def _common_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def parse_hh_dialogue(text: str) -> list[dict] | None:
    """Anthropic HH text ("\\n\\nHuman: ...\\n\\nAssistant: ...") -> messages; None if it is not in that form."""
    parts = re.split(r"\n\n(Human|Assistant): ?", text)
    if len(parts) < 3 or parts[0].strip():
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c} for r, c in zip(parts[1::2], parts[2::2])]


def split_implicit(chosen, rejected) -> tuple[object, object, object] | str:
    """(prompt, chosen answer, rejected answer) from two full conversations, or a drop reason.

    Message lists: the prompt is the longest shared run of messages, and what follows must be assistant turns.
    Strings: HH dialogues become messages; other text splits after the last assistant marker in the shared
    prefix, else at the last whitespace of it (TRL's rule: never split a word).
    """
    if isinstance(chosen, str) and isinstance(rejected, str):
        hh_c, hh_r = parse_hh_dialogue(chosen), parse_hh_dialogue(rejected)
        if hh_c and hh_r:
            chosen, rejected = hh_c, hh_r
        else:
            n = _common_prefix(chosen, rejected)
            if n == len(chosen) == len(rejected):
                return "identical"
            shared = chosen[:n]
            cut = max((shared.rfind(m) + len(m) for m in ASSISTANT_MARKERS if m in shared), default=-1)
            if cut < 0:
                cut = max(shared.rfind(" "), shared.rfind("\n"))
            if cut <= 0 or not shared[:cut].strip():
                return "no_shared_prompt"
            return chosen[:cut], chosen[cut:], rejected[cut:]
    if isinstance(chosen, str) or isinstance(rejected, str):
        return "no_shared_prompt"
    n = _common_prefix(chosen, rejected)
    if n == len(chosen) == len(rejected):
        return "identical"
    # the answers start at the first differing assistant turn: back up to the start of that turn's run
    while n > 0 and chosen[n - 1]["role"] == "assistant" and n - 1 < len(rejected) \
            and rejected[n - 1]["role"] == "assistant":
        n -= 1
    c_ans, r_ans = chosen[n:], rejected[n:]
    if n == 0 or not c_ans or not r_ans or any(m["role"] != "assistant" for m in c_ans + r_ans):
        return "no_shared_prompt"
    return chosen[:n], c_ans, r_ans


def _strip_prompt(prompt, answer):
    """An explicit prompt and an answer that may be the full conversation: the answer part, or None when the
    answer is a conversation that does not start with the prompt."""
    if not isinstance(answer, list) or not answer or answer[0]["role"] == "assistant":
        return answer
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if answer[:len(msgs)] != msgs:
        return None
    return answer[len(msgs):]


def pair_from_row(row: dict, where: str, cfg: PreferenceDataConfig | None = None) -> Pair | str:
    """One row -> a Pair, or the reason it is dropped. Malformed rows raise DataError."""
    for name in ("chosen", "rejected"):
        if name not in row:
            raise DataError(f"{where}: field {name!r} missing: a preference row needs 'chosen' and 'rejected' "
                            f"(and usually 'prompt'; fields: {', '.join(map(str, row)) or 'none'})")
    if _is_empty(row["chosen"]) or _is_empty(row["rejected"]):
        return "empty_answer"
    chosen = _check_answer(row["chosen"], where, "chosen")
    rejected = _check_answer(row["rejected"], where, "rejected")
    margin = 0.0
    if cfg is not None and cfg.chosen_score:
        margin = _dotted(row, cfg.chosen_score, where) - _dotted(row, cfg.rejected_score, where)
        if margin <= 0:
            return "tie"
    if row.get("prompt") is None:
        split = split_implicit(chosen, rejected)
        if isinstance(split, str):
            return split
        prompt, chosen, rejected = split
    else:
        prompt = _check_answer(row["prompt"], where, "prompt")
        chosen, rejected = _strip_prompt(prompt, chosen), _strip_prompt(prompt, rejected)
        if chosen is None or rejected is None:
            return "prompt_not_prefix"
    if chosen == rejected:
        return "identical"
    confidence = row.get("label_confidence", 1.0)
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.5 <= confidence <= 1:
        raise DataError(f"{where}: field 'label_confidence' must be a number in [0.5, 1] (the probability that "
                        f"chosen is better), got {confidence!r}")
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer or (isinstance(answer, str) and not answer.strip()):
            return "empty_answer"
        if isinstance(answer, list) and any(m["role"] != "assistant" for m in answer):
            raise DataError(f"{where}: field {name!r}: an answer may only hold assistant messages "
                            "(or be the full conversation that starts with the prompt)")
    return Pair(prompt, chosen, rejected, where, margin, float(confidence))


def read_pairs(spec: str, cfg: PreferenceDataConfig | None = None, stats: Counter | None = None) -> list[Pair]:
    """Every usable pair of a source; ``stats`` counts 'kept' and each drop reason."""
    stats = stats if stats is not None else Counter()
    out = []
    for row, where in read_rows(spec):
        pair = pair_from_row(row, where, cfg)
        if isinstance(pair, str):
            stats[pair] += 1
            continue
        stats["kept"] += 1
        out.append(pair)
        if cfg is not None and cfg.max_rows and len(out) >= cfg.max_rows:
            break
    if not out:
        raise DataError(f"{spec}: no usable preference pairs (dropped: {dict(stats) or 'no rows at all'})")
    return out


def read_unpaired(spec: str, stats: Counter | None = None) -> list[tuple[object, object, bool, str]]:
    """(prompt, completion, label, where) rows for KTO: {"prompt","completion","label"}, or paired rows
    unpaired (chosen -> label true, rejected -> false), as TRL's ``unpair_preference_dataset``."""
    stats = stats if stats is not None else Counter()
    out = []
    for row, where in read_rows(spec):
        if "chosen" in row or "rejected" in row:
            pair = pair_from_row(row, where)
            if isinstance(pair, str):
                stats[pair] += 1
                continue
            out += [(pair.prompt, pair.chosen, True, where), (pair.prompt, pair.rejected, False, where)]
            stats["kept"] += 1
            continue
        for name in ("prompt", "completion", "label"):
            if name not in row:
                raise DataError(f"{where}: field {name!r} missing: an unpaired row needs 'prompt', 'completion' "
                                f"and 'label' (fields: {', '.join(map(str, row)) or 'none'})")
        label = row["label"]
        if label not in (True, False, 0, 1) or isinstance(label, float):
            raise DataError(f"{where}: field 'label' must be true or false, got {label!r:.40}")
        out.append((_check_answer(row["prompt"], where, "prompt"), _check_answer(row["completion"], where,
                                                                                 "completion"), bool(label), where))
        stats["kept"] += 1
    if not out:
        raise DataError(f"{spec}: no usable rows (dropped: {dict(stats) or 'no rows at all'})")
    return out


# ---------------------------------------------------------------------------------------------------- tokenizing

def _truncate(prompt_ids: list[int], completion_ids: list[int], max_length: int, max_prompt_length: int):
    """Prompt keeps its last max_prompt_length tokens; completion its first max_length - len(prompt)."""
    if len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
    return prompt_ids, completion_ids[:max_length - len(prompt_ids)]


def tokenize_pairs(pairs: Iterable[Pair], tokenizer, cfg: PreferenceDataConfig,
                   stats: Counter | None = None) -> list[TokenPair]:
    """Pairs -> TokenPairs via the chat template; truncated pairs are counted under 'truncated'."""
    stats = stats if stats is not None else Counter()
    out = []
    for pair in pairs:
        try:
            prompt_ids, chosen_ids = tokenize_prompt_completion(tokenizer, pair.prompt, pair.chosen)
            prompt_r, rejected_ids = tokenize_prompt_completion(tokenizer, pair.prompt, pair.rejected)
        except (ValueError, DataError) as e:
            raise DataError(f"{pair.where}: {e}") from None
        if prompt_r != prompt_ids:  # templates that render the prompt differently per answer: split at the shared part
            n = _common_prefix(prompt_ids, prompt_r)
            chosen_ids, rejected_ids = prompt_ids[n:] + chosen_ids, prompt_r[n:] + rejected_ids
            prompt_ids = prompt_ids[:n]
        longest = len(prompt_ids) + max(len(chosen_ids), len(rejected_ids))
        if longest > cfg.max_length or len(prompt_ids) > cfg.max_prompt_length:
            stats["truncated"] += 1
        p, c = _truncate(prompt_ids, chosen_ids, cfg.max_length, cfg.max_prompt_length)
        _, r = _truncate(prompt_ids, rejected_ids, cfg.max_length, cfg.max_prompt_length)
        if c == r:
            stats["identical_after_truncation"] += 1
            continue
        out.append(TokenPair(p, c, r, pair.margin, pair.confidence))
    return out


def tokenize_unpaired(rows, tokenizer, cfg: PreferenceDataConfig, seed: int = 0,
                      stats: Counter | None = None) -> list[TokenExample]:
    """(prompt, completion, label, where) rows -> TokenExamples, each with a mismatched completion (another
    row's, from a fixed random derangement) for KTO's KL reference point."""
    stats = stats if stats is not None else Counter()
    out = []
    for prompt, completion, label, where in rows:
        try:
            p, c = tokenize_prompt_completion(tokenizer, prompt, completion)
        except (ValueError, DataError) as e:
            raise DataError(f"{where}: {e}") from None
        if len(p) + len(c) > cfg.max_length or len(p) > cfg.max_prompt_length:
            stats["truncated"] += 1
        p, c = _truncate(p, c, cfg.max_length, cfg.max_prompt_length)
        out.append(TokenExample(p, c, label))
    order = list(range(len(out)))
    random.Random(seed).shuffle(order)
    for a, b in zip(order, order[1:] + order[:1]):  # a cycle: nobody gets their own completion (if n > 1)
        out[a].kl_completion_ids = out[b].completion_ids[:cfg.max_length - len(out[a].prompt_ids)]
    return out


def split_eval(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval): a seeded random ``fraction`` held out (at least one item when fraction > 0)."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    k = min(max(1, round(fraction * len(items))), len(items) - 1)
    held = set(order[:k])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def load_preference_data(cfg: PreferenceDataConfig, tokenizer, seed: int = 0) -> tuple[list, list, dict]:
    """(train TokenPairs, eval TokenPairs, stats) from cfg.source (+ cfg.eval_source or a held-out split)."""
    if not cfg.source:
        raise DataError("data.source is empty: give a preference file (jsonl/parquet), hf:NAME or builtin:NAME")
    stats: Counter = Counter()
    train = tokenize_pairs(read_pairs(cfg.source, cfg, stats), tokenizer, cfg, stats)
    if cfg.eval_source:
        eval_stats: Counter = Counter()
        held = tokenize_pairs(read_pairs(cfg.eval_source, cfg, eval_stats), tokenizer, cfg, eval_stats)
        stats.update({f"eval_{k}": v for k, v in eval_stats.items()})
    else:
        train, held = split_eval(train, cfg.eval_fraction, seed)
    if not train:
        raise DataError(f"{cfg.source}: no training pairs left after validation and the eval split "
                        f"(counts: {dict(stats)})")
    return train, held, {**dict(stats), "train_pairs": len(train), "eval_pairs": len(held)}


# ------------------------------------------------------------------------------------------------------ batching

def pad_rows(rows: list[list[int]], pad_id: int, side: str = "right"):
    """(input_ids, attention_mask) LongTensors of ``rows`` padded to the longest, on the right or the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def collate_sequences(prompts: list[list[int]], completions: list[list[int]], pad_id: int,
                      side: str = "right") -> dict:
    """prompt + completion rows padded into one batch.

    input_ids, attention_mask: (N, T); labels: (N, T) the next token where it is a completion token, else -100
    (position t predicts token t + 1), so log p(completion) = sum of the per-token log-probs at labels != -100.
    """
    ids, mask = pad_rows([p + c for p, c in zip(prompts, completions)], pad_id, side)
    labels = torch.full_like(ids, -100)
    width = ids.shape[1]
    for i, (p, c) in enumerate(zip(prompts, completions)):
        start = (0 if side == "right" else width - len(p) - len(c)) + len(p)
        labels[i, start - 1:start - 1 + len(c)] = torch.tensor(c, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_pairs(pairs: list[TokenPair], pad_id: int, side: str = "right") -> dict:
    """Chosen rows then rejected rows, in ONE batch (2B rows) for one forward; plus margins and reference
    log-probs when they are known."""
    prompts = [p.prompt_ids for p in pairs] * 2
    batch = collate_sequences(prompts, [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs], pad_id,
                              side)
    batch["margin"] = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
    batch["confidence"] = torch.tensor([p.confidence for p in pairs], dtype=torch.float32)
    if all(p.ref_chosen is not None for p in pairs):
        batch["ref_logps"] = torch.tensor([p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs],
                                          dtype=torch.float32)
    return batch


def collate_examples(examples: list[TokenExample], pad_id: int) -> dict:
    """KTO: the examples' rows, and separately their mismatched (prompt, other completion) rows."""
    batch = collate_sequences([e.prompt_ids for e in examples], [e.completion_ids for e in examples], pad_id)
    kl = collate_sequences([e.prompt_ids for e in examples], [e.kl_completion_ids or e.completion_ids
                                                                for e in examples], pad_id)
    batch.update({f"kl_{k}": v for k, v in kl.items()})
    batch["label"] = torch.tensor([e.label for e in examples], dtype=torch.bool)
    if all(e.ref is not None for e in examples):
        batch["ref_logps"] = torch.tensor([e.ref for e in examples], dtype=torch.float32)
        batch["ref_kl_logps"] = torch.tensor([e.ref_kl for e in examples], dtype=torch.float32)
    return batch


class Batches:
    """Endless shuffled micro-batches over a list, epoch after epoch, with exact resume.

    Each epoch is a seeded shuffle; with ``group_by_length`` consecutive windows of 32 batches are sorted by
    length before cutting, so a batch pads to nearly its own length (minimal padding), and the batch order is
    shuffled again. Rank r of world_size takes every world_size-th batch. state_dict = (epoch, batch index).
    """

    def __init__(self, items: list, batch_size: int, collate, seed: int = 0, rank: int = 0, world_size: int = 1,
                 length=None, group_by_length: bool = True):
        if len(items) < batch_size * world_size:
            raise DataError(f"{len(items)} examples are fewer than one batch of {batch_size} x {world_size} "
                            "process(es): lower train.micro_batch_size or add data")
        self.items, self.batch_size, self.collate = items, batch_size, collate
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.length = length if group_by_length else None
        self.epoch, self.index = 0, 0
        self._order = self._epoch_batches()

    def _epoch_batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(range(len(self.items)))
        rng.shuffle(order)
        if self.length is not None:
            window = self.batch_size * 32
            order = [i for s in range(0, len(order), window)
                     for i in sorted(order[s:s + window], key=lambda i: self.length(self.items[i]))]
        n = len(order) // (self.batch_size * self.world_size) * self.world_size
        batches = [order[b * self.batch_size:(b + 1) * self.batch_size] for b in range(n)]
        if self.length is not None:
            rng.shuffle(batches)
        return batches[self.rank::self.world_size]

    def __iter__(self):
        return self

    def __next__(self):
        if self.index >= len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._epoch_batches()
        idx = self._order[self.index]
        self.index += 1
        return self.collate([self.items[i] for i in idx])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._epoch_batches()


def pair_length(p: TokenPair) -> int:
    return len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))


def example_length(e: TokenExample) -> int:
    return len(e.prompt_ids) + max(len(e.completion_ids), len(e.kl_completion_ids))


def in_batches(items: list, batch_size: int) -> Iterator[list]:
    for s in range(0, len(items), batch_size):
        yield items[s:s + batch_size]
