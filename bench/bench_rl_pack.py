"""Packed vs padded RL micro-batches: the policy's training forward + backward over one rollout buffer.

    python bench/bench_rl_pack.py [--rounds 5] [--threads 1] [--rows 64] [--micro 32]

One rollout buffer of ``rows`` sequences with uneven lengths (prompts 8-40 tokens, responses 1-160 tokens,
uniform; ``--even`` makes every response ``--max-response`` long), a random model of the tiny recipe's shape
(hidden 192, 4 layers, 6 heads, 2 kv heads, vocab 2048), fp32. Each round trains the buffer once in
micro-batches of ``micro`` rows, padded (:func:`lmforge.rollout.micro_batch`: trimmed to the micro-batch's
longest prompt and response) and packed (``packed=True``: sequences best-fit into rows as wide as the longest),
taking turns in one process so that other load hits both alike; the first round is warm-up. Prints the median
seconds per pass, the tokens each side's forward computes (real + padding), and the largest log-prob difference
between the two paths.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.rollout import (
    epoch_micro_batches,
    micro_batch,
    pack_rollout,
    policy_logprobs,
    policy_scores,
    score_buffer,
)


def make_buffer(rows: int, max_response: int, even: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    prompts, completions = [], []
    for _ in range(rows):
        p = int(torch.randint(8, 41, (), generator=g))
        r = max_response if even else int(torch.randint(1, max_response + 1, (), generator=g))
        prompts.append(torch.randint(2, 2048, (p,), generator=g).tolist())
        completions.append(torch.randint(2, 2048, (r,), generator=g).tolist())
    return pack_rollout(prompts, completions, pad_id=1)


def train_pass(model, buffer: dict, plan, packed: bool) -> None:
    for idx in plan:
        batch = micro_batch(buffer, idx, packed)
        logp = policy_logprobs(model, batch)
        (-(logp * batch["response_mask"]).sum() / batch["response_mask"].sum()).backward()
    model.zero_grad(set_to_none=True)


def computed_tokens(buffer: dict, plan, packed: bool) -> int:
    return sum(micro_batch(buffer, idx, packed)["input_ids"].numel() for idx in plan)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--micro", type=int, default=32)
    ap.add_argument("--max-response", type=int, default=160)
    ap.add_argument("--even", action="store_true", help="every response max-response long (packing cannot help)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=2048, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                                    num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256))
    buffer = make_buffer(args.rows, args.max_response, args.even)
    plan = epoch_micro_batches(args.rows, args.micro, seed=0, iteration=0, epoch=0)
    model.eval()
    scores = {p: score_buffer(policy_scores(model), buffer, plan, "cpu", packed=p)["logprobs"] for p in (False, True)}
    model.train()
    times = {False: [], True: []}
    for i in range(args.rounds + 1):
        for packed in (False, True):
            t0 = time.perf_counter()
            train_pass(model, buffer, plan, packed)
            if i:
                times[packed].append(time.perf_counter() - t0)
    real = int(buffer["attention_mask"].sum())
    print(f"{args.rows} sequences, {real} real tokens, micro-batches of {args.micro}, {args.threads} thread(s)")
    for packed, name in ((False, "padded"), (True, "packed")):
        print(f"  {name:7s} {statistics.median(times[packed]):7.3f} s/pass   "
              f"{computed_tokens(buffer, plan, packed):6d} tokens computed")
    print(f"  packed speed-up: {statistics.median(times[False]) / statistics.median(times[True]):.2f}x   "
          f"max |log-prob difference|: {float((scores[True] - scores[False]).abs().max()):.2e}")


if __name__ == "__main__":
    main()
