"""Model and batch -> per-row numbers: the forwards that stages, engines and evaluation read a model through.

    forward_hidden        final hidden states of a right-, left- or un-padded batch (the fast causal kernel
                          whenever padding sits at the end)
    sequence_rewards      (N,) the ``score`` head at each row's last real token: what a reward model trains on
    reward_scores         THE reward-model scorer: (prompt ids, completion ids) pairs -> one float each
                          (RL rewards, evaluation, best-of-N and ``lmforge reward score`` all call it)
    completion_logps      (N,) summed log pi of each row's completion tokens (labels != -100), and lengths
    completion_logprobs   per-token log pi of each (prompt ids, completion ids) pair; sequence_logprobs: the sums
    precompute_reference  one no-grad pass of a reference model that stores its completion log-probs in the items
    evaluate_pairs        pair-weighted means of a loss function's loss and metrics over held-out pairs (eval_*)
    token_kl              exact KL(pi || pi_ref) over the vocabulary at every completion position

Log-probs only ever go through the lm_head at the positions that are scored, a chunk at a time
(objectives.lm.chunked_token_logprobs), so no (tokens x vocab) logits are held.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from rich.progress import Progress

from lmforge.data.preference import in_batches
from lmforge.model import unwrap
from lmforge.objectives.lm import chunked_token_logprobs

# ---------------------------------------------------------------------------------------------- batches


def to_device(batch, device: torch.device):
    """Tensors in a (nested) tuple/list/dict moved to ``device``; anything else passed through."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(input_ids, attention_mask or None when no row is padded, position_ids) for a left-padded batch."""
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lengths.max())
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
    offsets = torch.arange(width, device=device)[None] - (width - lengths)[:, None]
    mask = (offsets >= 0).long() if bool((lengths != width).any()) else None
    return input_ids, mask, offsets.clamp(min=0)


def last_token_index(attention_mask):
    """Index of the last real (mask = 1) token of each row: right, left or no padding."""
    T = attention_mask.shape[1]
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return (positions * attention_mask.bool()).amax(dim=1)


def is_right_padded(attention_mask) -> bool:
    """True when every row's padding sits at its end, so plain causal attention already ignores it."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


# ---------------------------------------------------------------------------------------------- forwards


def forward_hidden(model, input_ids, attention_mask=None):
    """Final hidden states; with left (or inner) padding the mask and shifted positions are passed, with right
    padding neither is needed (causal attention never looks right) and the fast causal kernel runs."""
    if attention_mask is None or is_right_padded(attention_mask):
        return model(input_ids, return_hidden=True)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids, attention_mask=attention_mask, position_ids=positions, return_hidden=True)


def sequence_rewards(model, input_ids, attention_mask=None):
    """(N,) fp32 rewards: the ``score`` head on the hidden state of each row's last non-pad token."""
    hidden = forward_hidden(model, input_ids, attention_mask)
    if attention_mask is None:
        last = hidden[:, -1]
    else:
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
    return unwrap(model).score(last)[:, 0].float()


@torch.inference_mode()
def reward_scores(reward_model, pairs: list[tuple[list[int], list[int]]], pad_id: int = 0,
                  batch_size: int = 16) -> list[float]:
    """The reward model's scalar (its ``score`` head at the last token of prompt + completion) for each
    (prompt ids, completion ids) pair, in left-padded batches of ``batch_size``."""
    if getattr(reward_model, "score", None) is None:
        raise ValueError("the reward model has no score head (load it with num_labels=1)")
    out = []
    for start in range(0, len(pairs), batch_size):
        ids, mask, pos = left_pad([p + c for p, c in pairs[start:start + batch_size]], pad_id,
                                  reward_model.score.weight.device)
        hidden = reward_model(ids, attention_mask=mask, position_ids=pos, return_hidden=True)[:, -1]
        out += reward_model.score(hidden)[:, 0].float().tolist()
    return out


# ---------------------------------------------------------------------------------------------- log-probs


def completion_logps(model, batch: dict, chunk_size: int = 1024):
    """(N,) fp32 sum of log pi(completion token | prefix) per row, and (N,) completion lengths.

    ``batch`` as ``data.preference.collate_sequences`` makes it. Log-probs are computed only at the positions
    whose label is a completion token, from hidden states and the lm_head in chunks (chunked_token_logprobs).
    """
    labels = batch["labels"]
    hidden = forward_hidden(model, batch["input_ids"], batch.get("attention_mask"))
    keep = labels != -100
    rows = keep.nonzero()[:, 0]
    token_logps = chunked_token_logprobs(hidden[keep], unwrap(model).lm_head.weight, labels[keep], chunk_size)
    logps = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device).index_add(0, rows, token_logps)
    return logps, keep.sum(-1).float()


@torch.inference_mode()
def completion_logprobs(model, pairs: list[tuple[list[int], list[int]]], pad_id: int = 0,
                        batch_size: int = 16) -> list[torch.Tensor]:
    """log p(token | everything before it) for each completion token of each (prompt, completion), fp32 (len(c),).

    Left-padded batches; the lm_head is applied in chunks, so no (tokens x vocab) logits are held.
    """
    out = []
    device = model.lm_head.weight.device
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        ids, mask, pos = left_pad([p + c for p, c in chunk], pad_id, device)
        hidden = model(ids, attention_mask=mask, position_ids=pos, return_hidden=True)[:, :-1]
        labels = ids[:, 1:].clone()
        width = ids.shape[1]
        for i, (_, c) in enumerate(chunk):  # score only the completion's tokens
            labels[i, :width - 1 - len(c)] = -100
        logp = chunked_token_logprobs(hidden, model.lm_head.weight, labels).float()
        out += [logp[i, width - 1 - len(c):].cpu() for i, (_, c) in enumerate(chunk)]
    return out


def sequence_logprobs(model, pairs: list[tuple[list[int], list[int]]], pad_id: int = 0,
                      batch_size: int = 16) -> list[float]:
    """Sum of log p(completion token | everything before it) for each (prompt, completion)."""
    return [float(lp.sum()) for lp in completion_logprobs(model, pairs, pad_id, batch_size)]


def precompute_reference(model, items: list, collate, store, length, batch_size: int, device,
                         chunk_size: int = 1024, autocast=None, description: str = "reference log-probs") -> None:
    """One pass of ``model`` over ``items`` (length-sorted batches: little padding; ``length=None`` keeps the
    order, so batches are exactly those evaluate_pairs builds and step-0 rewards come out exactly 0).

    ``collate(chunk)`` builds a batch; its rows, and the rows of any "kl_"-prefixed sub-batch, are scored with
    ``completion_logps``; ``store(chunk, {"": logps, "kl_": logps})`` writes the values into the items.
    """
    order = sorted(range(len(items)), key=lambda i: length(items[i])) if length else list(range(len(items)))
    was_training = model.training
    model.eval()
    with torch.inference_mode(), autocast or contextlib.nullcontext(), Progress(transient=True) as bar:
        task = bar.add_task(description, total=len(items))
        for s in range(0, len(order), batch_size):
            chunk = [items[i] for i in order[s:s + batch_size]]
            batch = to_device(collate(chunk), device)
            values = {"": completion_logps(model, batch, chunk_size)[0].tolist()}
            if "kl_labels" in batch:
                sub = {k.removeprefix("kl_"): v for k, v in batch.items() if k.startswith("kl_")}
                values["kl_"] = completion_logps(model, sub, chunk_size)[0].tolist()
            store(chunk, values)
            bar.advance(task, len(chunk))
    model.train(was_training)


def store_pair_logps(chunk: list, values: dict) -> None:
    """precompute_reference's ``store`` for TokenPairs: chosen rows come first, then rejected rows (collate_pairs)."""
    for j, pair in enumerate(chunk):
        pair.ref_chosen, pair.ref_rejected = values[""][j], values[""][len(chunk) + j]


# ---------------------------------------------------------------------------------------------- pairs and KL


def evaluate_pairs(model, loss_fn, pairs, collate, batch_size: int, device, limit_batches: int = 0) -> dict:
    """Pair-weighted means of loss_fn's loss and metrics over held-out pairs, named eval_*."""
    sums: dict[str, float] = {}
    n = 0
    for i, chunk in enumerate(in_batches(pairs, batch_size)):
        if limit_batches and i >= limit_batches:
            break
        loss, metrics = loss_fn(model, to_device(collate(chunk), device))
        for k, v in {"loss": loss, **metrics}.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(chunk)
        n += len(chunk)
    return {f"eval_{k}": v / max(n, 1) for k, v in sums.items()}


def token_kl(policy, reference, batch: dict, chunk_size: int = 512):
    """(N,) sum and (N,) count over completion positions of KL(pi(.|prefix) || pi_ref(.|prefix)), exact over
    the vocabulary (teacher-forced on the given completions), computed a chunk of positions at a time."""
    keep = batch["labels"] != -100
    rows = keep.nonzero()[:, 0]
    h_pol = forward_hidden(policy, batch["input_ids"], batch.get("attention_mask"))[keep]
    h_ref = forward_hidden(reference, batch["input_ids"], batch.get("attention_mask"))[keep]
    kl = []
    for s in range(0, h_pol.shape[0], chunk_size):
        logp = F.log_softmax((h_pol[s:s + chunk_size] @ policy.lm_head.weight.T).float(), -1)
        logq = F.log_softmax((h_ref[s:s + chunk_size] @ reference.lm_head.weight.T).float(), -1)
        kl.append((logp.exp() * (logp - logq)).sum(-1))
    total = torch.zeros(keep.shape[0], device=rows.device).index_add(0, rows, torch.cat(kl) if kl else
                                                                   torch.zeros(0, device=rows.device))
    return total, keep.sum(-1).float()
