"""A scheduler step where prompts join running rows: decode and prefill in one packed pass vs one pass each.

    python bench/bench_prefill_pass.py --model runs/smollm2 [--dtype bfloat16] [--joining 1,4] [--repeats 6]

``Scheduler._forward`` sends the decoding rows and the prefill chunks of a step through
``PackedDecodeStep.forward_groups`` together, so the weights are streamed once; the other side runs the same
batches through it one after the other (what the step did before). Both in this process, on one scheduler,
alternating: 16 - J chat requests keep decoding while J new ones join; the time of the step that prefills them
(median of --repeats), and whether both sides gave the same tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmforge.data.chat import encode_prompt
from lmforge.modelio import load_model_and_tokenizer
from lmforge.sampling import SamplingParams
from lmforge.scheduler import Scheduler

QUESTIONS = ["What is the capital of France?", "Name three colours.", "What is 12 + 30?", "Say hello in Spanish.",
             "Why is the sky blue?", "Write a haiku about rain.", "What is a prime number?", "Spell 'cat'."]
ONE_PASS = Scheduler._forward


def one_pass_each(self, batches):
    return [hidden for batch in batches for hidden in ONE_PASS(self, [batch])]


def joining_step(model, tokenizer, joining: int, repeats: int) -> dict:
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": QUESTIONS[i % 8] + " Please." * (i // 8)}])
               for i in range(16 + joining * repeats)]
    sched = Scheduler(model, tokenizer, max_running=32)
    running = [sched.submit(p, SamplingParams(max_new_tokens=4000, temperature=0)) for p in prompts[:16 - joining]]
    for _ in range(8):
        sched.step()
    times, tokens = {"two passes": [], "one pass": []}, {"two passes": [], "one pass": []}
    for k in range(repeats):
        joiners = prompts[16 + k * joining:16 + (k + 1) * joining]  # the same prompts join on both sides
        for name, forward in (("two passes", one_pass_each), ("one pass", ONE_PASS)):
            Scheduler._forward = forward
            new = [sched.submit(p, SamplingParams(max_new_tokens=3, temperature=0)) for p in joiners]
            start = time.perf_counter()
            sched.step()
            times[name].append(time.perf_counter() - start)
            Scheduler._forward = ONE_PASS
            while not all(r.done for r in new):
                sched.step()
            tokens[name].append([r.completions[0].token_ids for r in new])
    for r in running:
        r.cancel()
    return {name: statistics.median(v) for name, v in times.items()} | {
        "same": tokens["two passes"] == tokens["one pass"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--joining", default="1,4")
    ap.add_argument("--repeats", type=int, default=6)
    args = ap.parse_args()
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype)
    print("| dtype | decoding + joining | two passes | one pass | speed-up | same tokens |")
    print("|---|---|---:|---:|---:|---|")
    with torch.inference_mode():
        for joining in map(int, args.joining.split(",")):
            r = joining_step(model, tokenizer, joining, args.repeats)
            print(f"| {args.dtype} | {16 - joining} + {joining} | {1000 * r['two passes']:.1f} ms | "
                  f"{1000 * r['one pass']:.1f} ms | {r['two passes'] / r['one pass']:.2f}x | {r['same']} |")


if __name__ == "__main__":
    main()
