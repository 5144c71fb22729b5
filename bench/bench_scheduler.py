"""The continuous-batching scheduler vs the static batch, on the shapes lmforge generates.

    python bench/bench_scheduler.py [--models tiny smollm2] [--smollm2 /tmp/smollm2] [--repeats 2] [--threads 1]

Both sides run in this process, alternating, best wall time of --repeats runs after a warm-up; each side is
lmforge.generation.generate with SCHEDULED_BY_DEFAULT False (the static batch: left-pad, one prefill, rows
leaving) or True (lmforge.scheduler), unless said otherwise:

- decode:   16 rows, 64-token prompts, 128 new tokens, no stop: the packed CPU decode step's speed (tokens/s)
            (plus the scheduler with the mirror rebuilt from the pool every step: a paged gather per step)
- uneven:   16 rows, 24-token prompts, sampled, up to 128 new tokens; ~1/40 of the vocabulary ends a row, so
            lengths are uneven (both sides drop a finished row at once)
- arrivals: 48 requests arriving 4 at a time every 0.15 s (uneven as above): the static side serves what has
            arrived as one batch when it is free (dynamic batching); the scheduler admits each request at the next
            step. Mean latency (arrival to last token) and total time.
- eval:     the tiny pipeline's eval shape: 200 greedy prompts of 12-30 tokens, 48 new tokens, ~1/40 of the vocab
            ends a row; static = evaluation.generate_all's batches of 32, scheduler = 32 rows running, refilled as
            rows finish.
- rollout:  GRPO's rollout shape: 8 prompts x n=8, temperature 1, 64 new tokens, log-probs, seeded.

A second table compares two settings of the default (scheduled) path:

- batch-1 decode: one 64-token prompt, 128 new tokens, greedy, through the model's forward (column-major weights,
            what batch-1 generate did before) vs the packed CPU decode step (what it does now).
- eval rows: the eval shape above (200 prompts), 64 vs 256 rows running at once (the pipeline's eval batch was 64,
            now 256).

Every case checks that both sides produced the same tokens (greedy and seeded sampling), and says so.
A random model does not write the task's answers, so these are shapes and timings, not accuracies; with
``--run-dir runs/tiny`` (a finished `lmforge pipeline`) the SFT model runs the pipeline's own eval
(evaluation.task_accuracy on the 200 held-out problems, 48 new tokens, greedy, batch 32) and a GRPO rollout
(8 tinyworld/rl prompts x 8 samples, temperature 1, 64 new tokens, log-probs, seed 0; the share of correct
answers is its math reward), both ways, with the accuracies.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import torch

from lmforge import generation, scheduler
from lmforge.answers import is_correct
from lmforge.data import tinyworld
from lmforge.data.chat import encode_prompt
from lmforge.evaluation import load_task, task_accuracy
from lmforge.generation import SamplingParams, batch_scheduler, generate
from lmforge.model import ModelConfig, Transformer
from lmforge.modelio import load_model_and_tokenizer, load_model_dir
from lmforge.scheduler import DecodeMirror


def tiny_model() -> Transformer:
    """The tiny recipe's model shape (src/lmforge/recipes/tiny.yaml), random weights."""
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=2048, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                                   num_attention_heads=6, num_key_value_heads=2,
                                   max_position_embeddings=256)).eval()


def prompts_of(vocab: int, count: int, low: int, high: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (count,), generator=g).tolist()
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def enders(vocab: int) -> list[int]:
    return list(range(3, vocab, 40))  # ~1/40 of the vocabulary ends a row


def run(model, prompts, params, eos, scheduled: bool, **sched):
    generation.SCHEDULED_BY_DEFAULT = scheduled
    if scheduled and sched:
        with torch.inference_mode():
            return batch_scheduler(model, prompts, params, eos_token_ids=eos, **sched).generate(prompts, params)
    return generate(model, prompts, params, eos_token_ids=eos)


def gather_every_step(model, prompts, params, eos):
    """The scheduler with its decode mirror rebuilt from the paged pool at every step."""
    fits, DecodeMirror.fits = DecodeMirror.fits, lambda self, joining: False
    try:
        return run(model, prompts, params, eos, True)
    finally:
        DecodeMirror.fits = fits


@contextmanager
def without_packed_step():
    """generate and the scheduler as if PackedDecodeStep did not apply: the model's forward decodes."""
    saved = generation.packable, scheduler.packable
    generation.packable = scheduler.packable = lambda model, rows: False
    try:
        yield
    finally:
        generation.packable, scheduler.packable = saved


def forward_decode(model, prompts, params, eos):
    with without_packed_step():
        return run(model, prompts, params, eos, True)


def static_eval(model, prompts, params, eos):
    generation.SCHEDULED_BY_DEFAULT = False
    out = []
    for start in range(0, len(prompts), 32):
        out += generate(model, prompts[start:start + 32], params, eos_token_ids=eos)
    return out


def timed(fns: dict, repeats: int) -> tuple[dict, dict]:
    outs = {name: fn() for name, fn in fns.items()}  # warm-up, and the outputs compared
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best, outs


def same(a, b) -> bool:
    return all(x.token_ids == y.token_ids for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def tokens(out) -> int:
    return sum(len(c.token_ids) for row in out for c in row)


def arrivals(model, vocab: int, scheduled: bool, waves: int = 12, per_wave: int = 4, gap: float = 0.15):
    """Mean latency and total time of requests arriving ``per_wave`` at a time every ``gap`` seconds."""
    prompts = prompts_of(vocab, waves * per_wave, 16, 32, seed=1)
    params = SamplingParams(max_new_tokens=96, seed=0)
    due = [start for start in (w * gap for w in range(waves)) for _ in range(per_wave)]
    t0, latency, nxt = time.perf_counter(), [], 0
    if scheduled:
        with torch.inference_mode():
            sched = batch_scheduler(model, prompts, params, max_running=32, eos_token_ids=enders(vocab))
        sched.prefill_chunk = 256
        live = []
        while nxt < len(prompts) or live:
            now = time.perf_counter() - t0
            while nxt < len(prompts) and due[nxt] <= now:
                live.append((sched.submit(prompts[nxt], params), due[nxt]))
                nxt += 1
            if not sched.step() and nxt < len(prompts):
                time.sleep(max(0.0, due[nxt] - (time.perf_counter() - t0)))
            for _request, arrived in [x for x in live if x[0].done]:
                latency.append(time.perf_counter() - t0 - arrived)
            live = [x for x in live if not x[0].done]
        return statistics.mean(latency), time.perf_counter() - t0
    generation.SCHEDULED_BY_DEFAULT = False
    while nxt < len(prompts):
        now = time.perf_counter() - t0
        if due[nxt] > now:
            time.sleep(due[nxt] - now)
            continue
        batch = [i for i in range(nxt, len(prompts)) if due[i] <= now]
        generate(model, [prompts[i] for i in batch], params, eos_token_ids=enders(vocab))
        latency += [time.perf_counter() - t0 - due[i] for i in batch]
        nxt = batch[-1] + 1
    return statistics.mean(latency), time.perf_counter() - t0


def bench_model(name: str, model, repeats: int) -> list[tuple]:
    vocab, rows = model.config.vocab_size, []
    eos = enders(vocab)
    cases = {
        "decode": (prompts_of(vocab, 16, 64, 64), SamplingParams(max_new_tokens=128, temperature=0), []),
        "uneven": (prompts_of(vocab, 16, 24, 24), SamplingParams(max_new_tokens=128, seed=0), eos),
        "rollout": (prompts_of(vocab, 8, 12, 30), SamplingParams(max_new_tokens=64, n=8, seed=0,
                                                                  return_logprobs=True), eos),
    }
    for case, (prompts, params, stop) in cases.items():
        fns = {"static": lambda p=prompts, q=params, s=stop: run(model, p, q, s, False),
               "scheduler": lambda p=prompts, q=params, s=stop: run(model, p, q, s, True)}
        if case == "decode":
            fns["gather"] = lambda p=prompts, q=params, s=stop: gather_every_step(model, p, q, s)
        best, outs = timed(fns, repeats)
        n_tok = tokens(outs["static"])
        rows.append((name, case, best["static"], best["scheduler"], n_tok, same(outs["static"], outs["scheduler"])))
        if case == "decode":
            rows.append((name, "decode, paged gather every step", best["static"], best["gather"], n_tok,
                         same(outs["static"], outs["gather"])))
    prompts, params = prompts_of(vocab, 200, 12, 30, seed=2), SamplingParams(max_new_tokens=48, temperature=0)
    fns = {"static": lambda: static_eval(model, prompts, params, eos),
           "scheduler": lambda: run(model, prompts, params, eos, True, max_running=32)}
    best, outs = timed(fns, repeats)
    rows.append((name, "eval", best["static"], best["scheduler"], tokens(outs["static"]),
                 same(outs["static"], outs["scheduler"])))
    (lat_s, tot_s), (lat_c, tot_c) = arrivals(model, vocab, False), arrivals(model, vocab, True)
    rows.append((name, "arrivals", tot_s, tot_c, None, f"mean latency {lat_s:.2f} s vs {lat_c:.2f} s"))
    generation.SCHEDULED_BY_DEFAULT = True
    return rows


def second_table(name: str, model, repeats: int) -> list[tuple]:
    """The A-vs-B rows (model, comparison, A s, B s, new tokens, same tokens): eval with 64 vs 256 rows running,
    batch-1 decode through the forward vs the packed step."""
    vocab, eos, rows = model.config.vocab_size, enders(model.config.vocab_size), []
    generation.SCHEDULED_BY_DEFAULT = True
    prompts, params = prompts_of(vocab, 200, 12, 30, seed=2), SamplingParams(max_new_tokens=48, temperature=0)
    fns = {"64": lambda: run(model, prompts, params, eos, True, max_running=64),
           "256": lambda: run(model, prompts, params, eos, True, max_running=256)}
    best, outs = timed(fns, repeats)
    rows.append((name, "eval (200 prompts): 64 vs 256 rows at once", best["64"], best["256"],
                 tokens(outs["64"]), same(outs["64"], outs["256"])))
    prompt, params = prompts_of(vocab, 1, 64, 64, seed=3), SamplingParams(max_new_tokens=128, temperature=0)
    fns = {"forward": lambda: forward_decode(model, prompt, params, []),
           "packed": lambda: run(model, prompt, params, [], True)}
    best, outs = timed(fns, repeats)
    rows.append((name, "batch-1 decode: model forward vs packed step", best["forward"], best["packed"],
                 tokens(outs["forward"]), same(outs["forward"], outs["packed"])))
    return rows


def bench_pipeline(run_dir: str, repeats: int) -> tuple[list[tuple], list[tuple]]:
    """The tiny pipeline's SFT model: its eval and a GRPO rollout, static vs scheduler, with the numbers out
    (the first table's rows), and its eval with 64 vs 256 rows at once (the second's)."""
    model, tok = load_model_and_tokenizer(f"{run_dir}/sft/model", "cpu")
    model.eval()
    rows_eval = load_task("tinyworld", limit=200)
    rl = tinyworld.rl_rows(8)
    ids = [encode_prompt(tok, r["prompt"], True) for r in rl]
    params = SamplingParams(max_new_tokens=64, n=8, seed=0, return_logprobs=True)

    def evaluate(scheduled: bool):
        generation.SCHEDULED_BY_DEFAULT = scheduled
        return task_accuracy(model, tok, rows_eval, max_new_tokens=48, batch_size=32, n_boot=10)

    def rollout(scheduled: bool):
        generation.SCHEDULED_BY_DEFAULT = scheduled
        return generate(model, ids, params, tokenizer=tok, pad_id=tok.pad_id)

    out = []
    best, outs = timed({"static": lambda: evaluate(False), "scheduler": lambda: evaluate(True)}, repeats)
    acc = [outs[k]["accuracy"]["value"] for k in ("static", "scheduler")]
    n_tok = sum(len(c.token_ids) for row in outs["static"]["completions"] for c in row)
    out.append(("tiny SFT", "eval (200 problems)", best["static"], best["scheduler"], n_tok,
                f"{same(outs['static']['completions'], outs['scheduler']['completions'])}; accuracy "
                f"{acc[0]:.3f} vs {acc[1]:.3f}"))
    generation.SCHEDULED_BY_DEFAULT = True
    best, outs = timed({b: lambda b=b: task_accuracy(model, tok, rows_eval, max_new_tokens=48, batch_size=b,
                                                     n_boot=10) for b in (64, 256)}, repeats)
    acc = [outs[b]["accuracy"]["value"] for b in (64, 256)]
    other = [("tiny SFT", "eval (200 problems): 64 vs 256 rows at once", best[64], best[256],
              sum(len(c.token_ids) for row in outs[64]["completions"] for c in row),
              f"{same(outs[64]['completions'], outs[256]['completions'])}; accuracy {acc[0]:.3f} vs {acc[1]:.3f}")]
    best, outs = timed({"static": lambda: rollout(False), "scheduler": lambda: rollout(True)}, repeats)
    reward = [sum(is_correct(c.text, r["answer"]) for r, row in zip(rl, outs[k]) for c in row) / 64
              for k in ("static", "scheduler")]
    out.append(("tiny SFT", "GRPO rollout (8 x 8)", best["static"], best["scheduler"], tokens(outs["static"]),
                f"{same(outs['static'], outs['scheduler'])}; math reward {reward[0]:.3f} vs {reward[1]:.3f}"))
    generation.SCHEDULED_BY_DEFAULT = True
    return out, other


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["tiny", "smollm2"])
    ap.add_argument("--smollm2", default="/tmp/smollm2", help="a dir from `lmforge import smollm2 out_dir=...`")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--run-dir", default="", help="a finished tiny pipeline's run dir (its sft/model is used)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--second-table-only", action="store_true", help="only the A-vs-B settings of the scheduler")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows, other = [], []
    for name in args.models:
        model = tiny_model() if name == "tiny" else load_model_dir(args.smollm2).eval()
        if not args.second_table_only:
            rows += bench_model(name, model, args.repeats)
        other += second_table(name, model, args.repeats)
    if args.run_dir:
        first, second = bench_pipeline(args.run_dir, args.repeats)
        rows, other = rows + first, other + second
    if rows:
        table(rows, "case", "static s", "scheduler s")
        print()
    table(other, "comparison (A vs B)", "A s", "B s")


def table(rows: list[tuple], case: str, a_name: str, b_name: str) -> None:
    print(f"| model | {case} | {a_name} | {b_name} | speed-up | new tokens | same tokens |")
    print("|---|---|---:|---:|---:|---:|---|")
    for name, label, a, b, n, ok in rows:
        extra = f"{n} ({n / a:.0f} vs {n / b:.0f} tok/s)" if n else ""
        print(f"| {name} | {label} | {a:.2f} | {b:.2f} | {a / b:.2f}x | {extra} | {ok} |")


if __name__ == "__main__":
    main()
