"""Stepwise (process-supervision) data in TRL's format, tokenized with a label on every step separator.

    {"prompt": "What is 57 + 68?", "completions": ["c1 7+8=15 5", "c2 5+6+1=12 125"], "labels": [true, true]}

``prompt`` is a string (one user turn of the chat template, or raw text with ``chat=False``) or a message list;
``completions`` the steps (strings), ``labels`` one boolean per step (is the step right, given the ones before).
A row whose completions and labels differ in length, or whose labels are not booleans (1/0 are refused: they are
how hard and soft labels get mixed up), is one DataError naming file:line and the field; no row is dropped.

Tokens are those of ``prompt_ids + prefix + step_1 + sep + step_2 + sep + ...``, as TRL's PRMTrainer builds them
(steps joined by ``separator``, default "\\n"), and the label of step k sits on the LAST token of its separator:
the position where the model has read the whole step and nothing after it. With the thinking world the prefix is
``<think>\\n`` and the separator is the newline that ends each line, so a PRM reads exactly the token stream the
policy writes inside its think block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmforge.data.chat import encode_prompt, prompt_messages
from lmforge.data.rows import read_rows
from lmforge.errors import DataError


@dataclass
class StepRow:
    prompt: object  # a string or a message list
    steps: list[str]
    labels: list[bool] | None  # None for unlabelled traces (scoring)
    where: str = ""


def check_stepwise_row(row: dict, where: str) -> StepRow:
    """A validated TRL stepwise row; any problem is one DataError naming ``where`` and the field."""
    for name in ("prompt", "completions", "labels"):
        if name not in row:
            raise DataError(f"{where}: field {name!r} missing (a stepwise row has 'prompt', 'completions' and "
                            f"'labels'; fields: {', '.join(map(str, row)) or 'none'})")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: field 'prompt' is empty")
    else:
        prompt = prompt_messages(prompt, where, "prompt")
    steps, labels = row["completions"], row["labels"]
    if not isinstance(steps, list) or not steps:
        raise DataError(f"{where}: field 'completions' must be a non-empty list of step strings, got {steps!r:.60}")
    for i, s in enumerate(steps):
        if not isinstance(s, str):
            raise DataError(f"{where}: field 'completions'[{i}] must be a string, got {s!r:.60}")
    if not isinstance(labels, list):
        raise DataError(f"{where}: field 'labels' must be a list of booleans, got {labels!r:.60}")
    if len(labels) != len(steps):
        raise DataError(f"{where}: field 'labels' has {len(labels)} labels for {len(steps)} completions "
                        "(one boolean per step)")
    for i, label in enumerate(labels):
        if not isinstance(label, bool):
            raise DataError(f"{where}: field 'labels'[{i}] must be a boolean (true/false), got {label!r:.40}")
    return StepRow(prompt, list(steps), list(labels), where)


def read_stepwise(spec: str, limit: int = 0) -> list[StepRow]:
    """Every row of a stepwise dataset (jsonl / json / parquet / builtin:tinyworld/... / hf:), checked."""
    rows = []
    for row, where in read_rows(spec):
        rows.append(check_stepwise_row(row, where))
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise DataError(f"{spec}: no stepwise rows")
    return rows


@dataclass
class StepExample:
    input_ids: list[int]
    label_positions: list[int]  # index of each step's separator (last token) in input_ids
    labels: list[float]  # one per position (-1 when unlabelled)


def prompt_ids_of(tokenizer, prompt, chat: bool = True, prefix: str = "") -> list[int]:
    """What a PRM reads before the first step: the prompt as the policy saw it, then ``prefix``."""
    ids = encode_prompt(tokenizer, prompt, chat=chat)
    return ids + tokenizer.encode(prefix) if prefix else ids


def tokenize_steps(tokenizer, prompt_ids: list[int], steps: Sequence[str], labels: Sequence[bool] | None = None,
                   separator: str = "\n") -> StepExample:
    """prompt_ids + step_1 + sep + step_2 + sep ...; each label on the last token of its step's separator."""
    sep = tokenizer.encode(separator)
    if not sep:
        raise ValueError(f"the separator {separator!r} encodes to no tokens")
    ids, positions = list(prompt_ids), []
    for step in steps:
        ids += tokenizer.encode(step) + sep
        positions.append(len(ids) - 1)
    values = [float(x) for x in labels] if labels is not None else [-1.0] * len(steps)
    return StepExample(ids, positions, values)


def tokenize_rows(tokenizer, rows: Sequence[StepRow], chat: bool = True, prefix: str = "", separator: str = "\n",
                  max_length: int = 0) -> tuple[list[StepExample], int]:
    """Examples for every row, and how many were cut to ``max_length`` (steps past it lose their labels)."""
    out, cut = [], 0
    for row in rows:
        ex = tokenize_steps(tokenizer, prompt_ids_of(tokenizer, row.prompt, chat, prefix), row.steps, row.labels,
                            separator)
        if max_length and len(ex.input_ids) > max_length:
            keep = [k for k, p in enumerate(ex.label_positions) if p < max_length]
            ex = StepExample(ex.input_ids[:max_length], [ex.label_positions[k] for k in keep],
                             [ex.labels[k] for k in keep])
            cut += 1
        if ex.label_positions:
            out.append(ex)
    return out, cut


def collate_steps(examples: Sequence[StepExample], pad_id: int, packed: bool = False,
                  seq_len: int = 0) -> dict:
    """A batch: input_ids (B, T), labels (B, T) with -100 where no step ends, and document_ids when packed.

    packed: examples are laid end to end in as few rows of ``seq_len`` tokens as a greedy fill gives, each with its
    own document id, so attention and positions never cross examples (the model's document masking); the labels
    are then the same tokens, scored by the same positions, as unpacked.
    """
    if not examples:
        raise ValueError("collate_steps needs at least one example")
    rows: list[list[int]] = []  # example indices per row
    if packed:
        width = seq_len or max(len(e.input_ids) for e in examples)
        fill = 0
        for i, e in enumerate(examples):
            if not rows or fill + len(e.input_ids) > width:
                rows.append([])
                fill = 0
            rows[-1].append(i)
            fill += len(e.input_ids)
    else:
        rows = [[i] for i in range(len(examples))]
    T = max(sum(len(examples[i].input_ids) for i in r) for r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), -100.0)
    docs = torch.full((len(rows), T), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        at = 0
        for doc, i in enumerate(r):
            e = examples[i]
            input_ids[b, at:at + len(e.input_ids)] = torch.tensor(e.input_ids)
            docs[b, at:at + len(e.input_ids)] = doc
            for pos, y in zip(e.label_positions, e.labels):
                labels[b, at + pos] = y
            at += len(e.input_ids)
    batch = {"input_ids": input_ids, "labels": labels}
    if packed:
        batch["document_ids"] = docs
    return batch
