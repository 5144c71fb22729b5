"""Evaluation: the numbers that say how good a checkpoint is, every rate with a bootstrap confidence interval.

    perplexity           validation loss (nats/token) and exp(loss) on texts or a token-shards directory
    task_accuracy        greedy answers to problems with gold answers (answers.py checks them): accuracy, format
                         rate, response length, and per-row records for the report
    preference_accuracy  how often a reward model scores the chosen answer above the rejected one
    win_rate             generate from two models, let a reward model judge each pair: win / tie / loss
    kl_to_reference      how far a tuned policy drifted from its reference, on the policy's own samples
    hacking_probes       cheap reward-hacking signs: length vs the reference, share that hit max_new_tokens,
                         repeated n-grams
    bootstrap_ci         (value, low, high) percentile bootstrap, used on every rate above
    load_task            benchmark rows {"prompt", "answer"}: tinyworld, GSM8K, SVAMP, MATH-500 or any jsonl

Prompts are strings or message lists. With ``chat=True`` a string becomes one user turn and is rendered with the
tokenizer's chat template up to the assistant header, bos first (as SFT trains); ``chat=False`` encodes the raw
text after bos (how a base model is probed); both by data.chat.encode_prompt, as every stage's prompts are.
Generation is greedy unless ``temperature`` says otherwise.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from lmforge.answers import extract_answer, is_correct, normalize_answer
from lmforge.data import thinkworld, tinyworld
from lmforge.data.chat import (
    check_messages,
    encode_prompt,  # the one prompt encoder (SFT's bos rule); eval.py uses it
)
from lmforge.data.preference import PreferenceDataConfig, pair_from_row, read_pairs, tokenize_pairs
from lmforge.data.rows import json_rows
from lmforge.data.shards import TokenDataset
from lmforge.data.tinyworld import Problem, is_formatted
from lmforge.errors import DataError
from lmforge.generation import Completion, SamplingParams, generate
from lmforge.objectives.rl import kl_estimate
from lmforge.scoring import completion_logprobs, reward_scores

TASKS = ("tinyworld", "thinkworld", "gsm8k", "svamp", "math500", "jsonl")


# ---- statistics ----

def bootstrap_ci(values: Sequence[float], stat: Callable | None = None, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float, float]:
    """(stat(values), low, high): the percentile bootstrap's 1 - alpha interval (Efron 1979).

    Resamples the values with replacement ``n_boot`` times and takes the alpha/2 and 1 - alpha/2 quantiles of
    the statistic (default: the mean). The interval always contains the value. At a rate of exactly 0 or 1
    every resample agrees and the interval collapses to a point: that says "more rows", not "certain".
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    value = float(np.mean(x) if stat is None else stat(x))
    if n_boot <= 0:  # no interval asked for
        return value, value, value
    rng = np.random.default_rng(seed)
    boots = []
    for start in range(0, n_boot, 256):  # chunks bound memory at 256 x len(values) indices
        idx = rng.integers(0, len(x), size=(min(256, n_boot - start), len(x)))
        boots += list(x[idx].mean(axis=1)) if stat is None else [float(stat(x[i])) for i in idx]
    low, high = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return value, float(min(low, value)), float(max(high, value))


def rate(values: Sequence[float], n_boot: int = 1000, seed: int = 0) -> dict:
    """{"value", "ci": [low, high], "n"} of a list of 0/1 (or fractional) outcomes."""
    value, low, high = bootstrap_ci(values, n_boot=n_boot, seed=seed)
    return {"value": value, "ci": [low, high], "n": len(values)}


def repetition_rate(token_ids: Sequence[int], n: int = 4) -> float:
    """Share of a response's n-grams that repeat an earlier n-gram of the same response: 1 - distinct / total.
    0 for varied text, near 1 for a loop ("the the the ..."); 0 for responses shorter than n tokens."""
    grams = [tuple(token_ids[i:i + n]) for i in range(len(token_ids) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def hacking_probes(completions: Sequence[Completion], reference: Sequence[Completion] | None = None,
                   n: int = 4) -> dict:
    """Cheap signs of reward hacking in a policy's responses (each a plain mean, documented in the keys).

    mean_length: tokens per response; length_ratio: that / the reference's mean length on the same prompts
    (RL that pays for length drifts up); truncated_rate: share that hit max_new_tokens instead of stopping;
    repetition_rate: mean share of repeated n-grams per response (degenerate loops).
    """
    lengths = [len(c.token_ids) for c in completions]
    out = {"mean_length": float(np.mean(lengths)) if lengths else math.nan,
           "truncated_rate": float(np.mean([c.finish_reason == "length" for c in completions])) if lengths else math.nan,
           f"repetition_rate_{n}gram": float(np.mean([repetition_rate(c.token_ids, n) for c in completions]))
           if lengths else math.nan}
    if reference:
        ref_mean = float(np.mean([len(c.token_ids) for c in reference]))
        out["reference_mean_length"] = ref_mean
        out["length_ratio"] = out["mean_length"] / ref_mean if ref_mean else math.nan
    return out


# ---- helpers ----

@contextmanager
def progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """A transient rich progress bar on stderr (none when stderr is not a terminal); yields advance(k)."""
    console = Console(stderr=True)
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console,
                  transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(label, total=total)
        yield lambda k=1: bar.advance(task, k)


def prompt_text(prompt) -> str:
    """What a person reads as the prompt: the string, or the last user message."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1] if users else json.dumps(prompt, ensure_ascii=False)


def generate_all(model, prompts: list[list[int]], params: SamplingParams, tokenizer=None, batch_size: int = 32,
                 label: str = "generate") -> list[list[Completion]]:
    """``generate`` with at most ``batch_size`` prompts' rows running at once (continuous batching: the next
    prompt takes a finished row's place), with a progress bar; completions[prompt][sample]. The bar moves every
    4 x batch_size prompts (one generate call each)."""
    out: list[list[Completion]] = []
    pad_id = tokenizer.pad_id if tokenizer is not None else 0
    with progress(label, len(prompts)) as advance:
        for start in range(0, len(prompts), 4 * batch_size):
            chunk = prompts[start:start + 4 * batch_size]
            out += generate(model, chunk, params, tokenizer=tokenizer, pad_id=pad_id,
                            max_running=batch_size * params.n)
            advance(len(chunk))
    return out


# ---- metrics ----

HELDOUT_TEXT = "heldout_english.txt"  # lmforge/assets: a paragraph no built-in model trained on (CC0)


def heldout_text() -> str:
    """The held-out English paragraph that ships with lmforge: import, quantize and export measure perplexity on it."""
    return (resources.files("lmforge") / "assets" / HELDOUT_TEXT).read_text(encoding="utf-8")


def decode_speed(model, prompt: list[int], new_tokens: int, batch_size: int = 1, repeats: int = 2) -> float:
    """Greedy new tokens per second (all rows together, end-of-sequence ignored), best of ``repeats`` runs
    after a short warm-up."""
    prompts = [list(prompt)] * batch_size
    generate(model, prompts, SamplingParams(max_new_tokens=2, temperature=0.0), eos_token_ids=[])
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate(model, prompts, SamplingParams(max_new_tokens=new_tokens, temperature=0.0), eos_token_ids=[])
        best = min(best, time.perf_counter() - t0)
    return batch_size * new_tokens / best


@torch.inference_mode()
def token_perplexity(model, ids: list[int]) -> float:
    """exp(mean next-token loss) over the token list ``ids``, read in consecutive windows no longer than the
    model's context (max_position_embeddings); every token after a window's first is predicted."""
    window = model.config.max_position_embeddings
    total = count = 0.0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, window):
            x = torch.tensor([ids[start:start + window]], device=model.lm_head.weight.device)
            if x.shape[1] < 2:
                break
            n = x.shape[1] - 1
            total += float(model(x[:, :-1], labels=x[:, 1:])) * n
            count += n
    return math.exp(total / count)


@torch.inference_mode()
def perplexity(model, tokenizer, data, seq_len: int = 256, batch_size: int = 8, max_batches: int = 0,
               split: str = "val") -> dict:
    """Mean next-token cross-entropy (nats/token) and perplexity exp(loss) = exp(-1/N sum_i log p(x_i | x_<i)).

    data: a list of texts (each encoded after bos, split into windows of seq_len + 1 tokens that overlap by one,
    so every token after the first is predicted exactly once, with at most seq_len tokens of context), or a
    token-shards directory (meta.json; ``split`` picks train/val) read the same way as one stream.
    Returns {"loss", "perplexity", "tokens"}.
    """
    windows, total = _windows(tokenizer, data, seq_len, split)
    if max_batches:
        total = min(total, max_batches * batch_size)
    device = model.lm_head.weight.device
    nll, count, batch = 0.0, 0, []
    with progress("perplexity", total) as advance:
        for i, w in enumerate(windows):
            if i == total:
                break
            batch.append(w)
            if len(batch) == batch_size or i == total - 1:
                width = max(len(b) for b in batch) - 1
                x = torch.zeros(len(batch), width, dtype=torch.long)
                y = torch.full((len(batch), width), -100, dtype=torch.long)
                for r, b in enumerate(batch):  # right padding: causal attention keeps it out of real tokens
                    x[r, :len(b) - 1], y[r, :len(b) - 1] = torch.tensor(b[:-1]), torch.tensor(b[1:])
                n = int((y != -100).sum())
                nll += float(model(x.to(device), labels=y.to(device))) * n
                count += n
                advance(len(batch))
                batch = []
    if count == 0:
        raise ValueError(f"perplexity: no token windows (need texts of at least 2 tokens; seq_len={seq_len})")
    loss = nll / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}


def _windows(tokenizer, data, seq_len: int, split: str) -> tuple[Iterator[list[int]], int]:
    if isinstance(data, (str, Path)):
        ds = TokenDataset(data, split)
        total = -(-max(len(ds) - 1, 0) // seq_len)  # ceil: a short last window counts too
        gen = (ds.read(s, min(seq_len + 1, len(ds) - s)).tolist() for s in range(0, len(ds) - 1, seq_len))
        return gen, total
    docs = [tokenizer.encode(t, add_bos=True) for t in data]
    windows = [ids[s:s + seq_len + 1] for ids in docs for s in range(0, len(ids) - 1, seq_len)]
    return iter(windows), len(windows)


def task_accuracy(model, tokenizer, rows: Sequence[dict], *, chat: bool = True, max_new_tokens: int = 256,
                  n: int = 1, temperature: float | None = None, batch_size: int = 32, seed: int = 0,
                  n_boot: int = 1000, format_check: Callable[[str], bool] | None = None,
                  thinking_budget: int | None = None, min_thinking_tokens: int = 0, num_waits: int = 0) -> dict:
    """Answer every row ({"prompt" or "messages", "answer"}) and check it with answers.is_correct.

    n samples per row (greedy when n = 1; temperature 1 by default when n > 1). Returns:
    accuracy, format_rate (share of responses with an extractable answer, or that pass ``format_check``, a task's
    stricter rule such as tinyworld.is_formatted): {"value", "ci", "n"}, bootstrapped
    over rows (a row's n samples count as one mean, so the interval is not fooled by correlated samples);
    pass_at_n when n > 1; mean_response_tokens, mean_thinking_tokens (inside the think block; the rest is the
    answer); hacking_probes' keys; records: one per (row, sample) with prompt, response, answer, predicted,
    correct, tokens, thinking_tokens, finish_reason; ``completions`` (the engine's objects, for callers that
    score them further); and, when rows carry a "level", ``by_level``: {level: {"accuracy", "mean_thinking_tokens",
    "mean_response_tokens"}}. thinking_budget / min_thinking_tokens / num_waits: budget forcing
    (generation.SamplingParams).
    """
    if not rows:
        raise ValueError("task_accuracy needs at least one row")
    prompts = [row["messages"] if "messages" in row else row["prompt"] for row in rows]
    ids = [encode_prompt(tokenizer, p, chat) for p in prompts]
    temp = (0.0 if n == 1 else 1.0) if temperature is None else temperature
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temp, n=n, seed=seed,
                            thinking_budget=thinking_budget, min_thinking_tokens=min_thinking_tokens,
                            num_waits=num_waits)
    was_training = model.training
    results = generate_all(model.eval(), ids, params, tokenizer, batch_size, label="answers")
    model.train(was_training)
    records, correct_rows, formatted_rows = [], [], []
    for prompt, row, samples in zip(prompts, rows, results):
        gold = str(row["answer"])
        oks, fmts = [], []
        for j, c in enumerate(samples):
            text = c.text if c.text is not None else tokenizer.decode(c.token_ids, skip_special_tokens=True)
            predicted = extract_answer(text)
            ok = predicted is not None and is_correct(text, gold)
            oks.append(ok)
            fmts.append(format_check(text) if format_check is not None else predicted is not None)
            records.append({"prompt": prompt_text(prompt), "response": text, "answer": gold, "predicted": predicted,
                            "correct": ok, "tokens": len(c.token_ids), "thinking_tokens": c.thinking_tokens or 0,
                            "finish_reason": c.finish_reason, **({"sample": j} if n > 1 else {}),
                            **({"level": row["level"]} if "level" in row else {})})
        correct_rows.append(oks)
        formatted_rows.append(fmts)
    flat = [c for row in results for c in row]
    out = {"accuracy": rate([np.mean(r) for r in correct_rows], n_boot, seed),
           "format_rate": rate([np.mean(r) for r in formatted_rows], n_boot, seed),
           "mean_response_tokens": float(np.mean([len(c.token_ids) for c in flat])),
           "mean_thinking_tokens": float(np.mean([c.thinking_tokens or 0 for c in flat])),
           **hacking_probes(flat), "records": records, "completions": results,
           "per_problem": [float(np.mean(r)) for r in correct_rows]}
    if n > 1:
        out["pass_at_n"] = rate([float(any(r)) for r in correct_rows], n_boot, seed)
    if rows and all("level" in row for row in rows):
        out["by_level"] = by_level(rows, out["per_problem"], results, n_boot, seed)
    return out


def by_level(rows: Sequence[dict], per_problem: Sequence[float], results: Sequence[Sequence[Completion]],
             n_boot: int = 1000, seed: int = 0) -> dict:
    """Accuracy (with its interval) and mean thinking / response tokens of the rows of each difficulty level."""
    out = {}
    for level in sorted({row["level"] for row in rows}):
        idx = [i for i, row in enumerate(rows) if row["level"] == level]
        flat = [c for i in idx for c in results[i]]
        out[level] = {"accuracy": rate([per_problem[i] for i in idx], n_boot, seed),
                      "mean_thinking_tokens": float(np.mean([c.thinking_tokens or 0 for c in flat])),
                      "mean_response_tokens": float(np.mean([len(c.token_ids) for c in flat]))}
    return out


def evaluate_arithmetic(model, tokenizer, items, chat: bool = True, max_new_tokens: int = 64, batch_size: int = 64,
                        n_samples: int = 5) -> dict:
    """Greedy answers to arithmetic questions: {"accuracy", "format_rate", "samples"} (see is_formatted).

    items: Problems, or rows with "question" (or a one-message "prompt") and "answer". chat=True renders the
    question with the chat template and a generation prompt (a chat model's view); chat=False gives the raw
    question as text, which is how a base model is probed. samples: the first ``n_samples``
    {question, completion, answer, correct}. ``lmforge eval task=tinyworld`` gives the same numbers with CIs.
    """
    pairs = [_question_and_answer(item) for item in items]
    if not pairs:
        raise ValueError("evaluate_arithmetic needs at least one problem")
    res = task_accuracy(model, tokenizer, [{"prompt": q, "answer": a} for q, a in pairs], chat=chat,
                        max_new_tokens=max_new_tokens, batch_size=batch_size, format_check=is_formatted, n_boot=0)
    samples = [{"question": r["prompt"], "completion": r["response"], "answer": r["answer"], "correct": r["correct"]}
               for r in res["records"][:n_samples]]
    return {"accuracy": res["accuracy"]["value"], "format_rate": res["format_rate"]["value"], "samples": samples}


def _question_and_answer(item) -> tuple[str, str]:
    if isinstance(item, Problem):
        return item.question, str(item.answer)
    question = item.get("question")
    if question is None:
        prompt = item["prompt"]
        question = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    return question, str(item["answer"])


def preference_accuracy(reward_model, tokenizer, pairs, *, batch_size: int = 16, max_length: int = 1024,
                        n_boot: int = 1000, seed: int = 0) -> dict:
    """Share of held-out pairs where r(prompt, chosen) > r(prompt, rejected); a tie counts one half.

    pairs: a data spec (file / builtin / hf) or rows {"prompt", "chosen", "rejected"} in any of TRL's forms;
    tokenized exactly as the reward stage tokenizes them (data.preference, through the chat template).
    Returns accuracy {"value", "ci", "n"}, mean_margin (mean r_chosen - r_rejected), and records.
    """
    if isinstance(pairs, (str, Path)):
        parsed = read_pairs(str(pairs))
    else:
        parsed = [p for p in (pair_from_row(row, f"pairs[{i}]") for i, row in enumerate(pairs))
                  if not isinstance(p, str)]
    cfg = PreferenceDataConfig(max_length=max_length, max_prompt_length=max_length // 2)
    tokenized = tokenize_pairs(parsed, tokenizer, cfg)
    if not tokenized:
        raise ValueError("preference_accuracy: no usable pairs")
    flat = [(t.prompt_ids, t.chosen_ids) for t in tokenized] + [(t.prompt_ids, t.rejected_ids) for t in tokenized]
    with progress("reward pairs", 1) as advance:
        scores = reward_scores(reward_model, flat, tokenizer.pad_id, batch_size)
        advance(1)
    chosen, rejected = scores[:len(tokenized)], scores[len(tokenized):]
    outcome = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected)]
    records = [{"prompt": prompt_text(p.prompt), "chosen_reward": c, "rejected_reward": r, "correct": o == 1.0}
               for p, c, r, o in zip(parsed, chosen, rejected, outcome)] if len(parsed) == len(tokenized) else []
    return {"accuracy": rate(outcome, n_boot, seed), "mean_margin": float(np.mean(np.subtract(chosen, rejected))),
            "records": records}


def win_rate(model_a, model_b, judge, tokenizer, prompts: Sequence, *, chat: bool = True,
             max_new_tokens: int = 128, batch_size: int = 32, tie_tolerance: float = 1e-5, n_boot: int = 1000,
             seed: int = 0) -> dict:
    """Greedy responses from both models to each prompt, judged by a reward model: win / tie / loss for A.

    A tie is two identical responses, or rewards within ``tie_tolerance`` (the same text scored in another row
    of a batch can differ in the last float bits). win_rate = (wins + ties / 2) / prompts, bootstrapped over
    prompts. The three models share one tokenizer
    (as every stage of an lmforge run does). Returns wins, ties, losses, win_rate {"value", "ci", "n"},
    mean_reward_a / _b and records (prompt, response_a, response_b, reward_a, reward_b, outcome).
    """
    ids = [encode_prompt(tokenizer, p, chat) for p in prompts]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    a = [row[0] for row in generate_all(model_a.eval(), ids, params, tokenizer, batch_size, label="model A")]
    b = [row[0] for row in generate_all(model_b.eval(), ids, params, tokenizer, batch_size, label="model B")]
    scores = reward_scores(judge, [(p, c.token_ids) for p, c in zip(ids, a)]
                           + [(p, c.token_ids) for p, c in zip(ids, b)], tokenizer.pad_id, batch_size)
    ra, rb = scores[:len(ids)], scores[len(ids):]
    outcome = [0.5 if ca.token_ids == cb.token_ids or abs(x - y) <= tie_tolerance else float(x > y)
               for ca, cb, x, y in zip(a, b, ra, rb)]
    records = [{"prompt": prompt_text(p), "response_a": ca.text, "response_b": cb.text, "reward_a": x,
                "reward_b": y, "outcome": {1.0: "win", 0.5: "tie", 0.0: "loss"}[o]}
               for p, ca, cb, x, y, o in zip(prompts, a, b, ra, rb, outcome)]
    return {"wins": outcome.count(1.0), "ties": outcome.count(0.5), "losses": outcome.count(0.0),
            "win_rate": rate(outcome, n_boot, seed), "mean_reward_a": float(np.mean(ra)),
            "mean_reward_b": float(np.mean(rb)), "records": records}


def kl_to_reference(policy, reference, prompts: list[list[int]], *, completions: list[list[int]] | None = None,
                    n: int = 1, max_new_tokens: int = 64, seed: int = 0, tokenizer=None, batch_size: int = 16,
                    n_boot: int = 1000) -> dict:
    """KL(pi || pi_ref) estimated on responses sampled from the policy itself (temperature 1, no filters).

    For each sampled token, log r = log pi_ref - log pi; per token k1 = -log r (unbiased, can be negative) and
    k3 = r - 1 - log r (unbiased, >= 0), via objectives.rl.kl_estimate (Schulman 2020). Per sequence = the sum
    over its tokens, which estimates the sequence-level KL. ``completions`` (token ids) skips sampling.
    Returns kl_k1_per_token, kl_k3_per_token, kl_k1_per_sequence {"value", "ci", "n"}, kl_k3_per_sequence, tokens.
    """
    if policy.config.vocab_size != reference.config.vocab_size:
        raise ValueError(f"policy and reference vocabularies differ ({policy.config.vocab_size} vs "
                         f"{reference.config.vocab_size}): KL needs the same tokenizer")
    pad_id = tokenizer.pad_id if tokenizer is not None else 0
    if completions is None:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, n=n, seed=seed)
        sampled = generate_all(policy.eval(), prompts, params, tokenizer, batch_size, label="policy samples")
        pairs = [(p, c.token_ids) for p, row in zip(prompts, sampled) for c in row]
    else:
        pairs = list(zip(prompts, completions, strict=True))
    pairs = [(p, c) for p, c in pairs if c]
    if not pairs:
        raise ValueError("kl_to_reference: every completion is empty")
    logp = completion_logprobs(policy, pairs, pad_id, batch_size)
    ref = completion_logprobs(reference, pairs, pad_id, batch_size)
    k1 = [kl_estimate(a, b, "k1") for a, b in zip(logp, ref)]
    k3 = [kl_estimate(a, b, "k3") for a, b in zip(logp, ref)]
    tokens = sum(len(x) for x in k1)
    seq_k1 = [float(x.sum()) for x in k1]
    return {"kl_k1_per_token": sum(seq_k1) / tokens, "kl_k3_per_token": float(sum(x.sum() for x in k3)) / tokens,
            "kl_k1_per_sequence": {"value": float(np.mean(seq_k1)), "ci": list(bootstrap_ci(seq_k1, n_boot=n_boot,
                                                                                              seed=seed)[1:]),
                                   "n": len(seq_k1)},
            "kl_k3_per_sequence": float(np.mean([float(x.sum()) for x in k3])), "tokens": tokens,
            "sequences": len(pairs)}


# ---- benchmark data ----

def load_task(task: str, path: str = "", limit: int = 0, seed: int = 0) -> list[dict]:
    """Rows {"prompt", "answer", "id"} of a benchmark (the first ``limit``; 0 = all).

    tinyworld: held-out arithmetic problems (data.tinyworld.eval_rows; no path). From a .jsonl[.gz] path:
    gsm8k {"question", "answer": "... #### 72"}, svamp {"Body", "Question", "Answer"}, math500 {"problem",
    "answer"}, jsonl {"prompt" or "messages", "answer"}. The answer is reduced to its final, canonical form.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if task == "tinyworld":
        return [{"prompt": r["prompt"], "answer": r["answer"], "id": i}
                for i, r in enumerate(tinyworld.eval_rows(n=limit or 200, seed=seed))]
    if task == "thinkworld":  # limit = problems per difficulty level
        return [{"prompt": r["prompt"], "answer": r["answer"], "level": r["level"], "id": i}
                for i, r in enumerate(thinkworld.eval_rows(per_level=limit or 40, seed=seed))]
    if not path:
        raise ValueError(f"task={task} needs data=PATH (a .jsonl or .jsonl.gz file)")
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    for row, where in json_rows(Path(path)):
        rows.append({**_task_row(task, row, where), "id": len(rows)})
        if limit and len(rows) == limit:
            break
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _field(row: dict, name: str, where: str, kinds=(str,)):
    if name not in row:
        raise DataError(f"{where}: field {name!r} missing (fields: {', '.join(map(str, row)) or 'none'})")
    if not isinstance(row[name], kinds) or isinstance(row[name], bool):
        raise DataError(f"{where}: field {name!r} must be {' or '.join(k.__name__ for k in kinds)}, "
                        f"got {row[name]!r:.40}")
    return row[name]


def _task_row(task: str, row: dict, where: str) -> dict:
    if task == "gsm8k":
        solution = _field(row, "answer", where)
        if "####" not in solution:
            raise DataError(f"{where}: field 'answer' has no '#### N' final answer (is this GSM8K?)")
        return {"prompt": _field(row, "question", where), "answer": extract_answer(solution)}
    if task == "svamp":
        body, question = _field(row, "Body", where), _field(row, "Question", where)
        return {"prompt": f"{body.strip()} {question.strip()}",
                "answer": normalize_answer(str(_field(row, "Answer", where, (int, float, str))))}
    if task == "math500":
        return {"prompt": _field(row, "problem", where), "answer": _field(row, "answer", where)}
    answer = str(_field(row, "answer", where, (str, int, float)))
    if "messages" in row:
        return {"prompt": check_messages(row["messages"], where, need_assistant=False), "answer": answer}
    prompt = _field(row, "prompt", where, (str, list))
    if isinstance(prompt, list):
        prompt = check_messages(prompt, where, "prompt", need_assistant=False)
    return {"prompt": prompt, "answer": answer}
