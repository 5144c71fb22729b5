"""Reward-model over-optimisation with best-of-N (Gao et al. 2022, "Scaling Laws for Reward Model
Overoptimization"): the proxy (a learned reward model) against the gold reward (the tiny world's verifier).

    python bench/study_overoptimisation.py --policy runs/tiny/sft/model --reward-model runs/tiny/reward/model
                                           [--prompts 64] [--max-n 32] [--plot overopt.png]

For each held-out problem (builtin:tinyworld/eval) the policy samples max-n answers at temperature 1, once; best-of-N
for N = 1, 2, 4, ... max-n picks, among the first N, the answer the reward model scores highest. Printed per N:
the mean proxy score and the gold accuracy (answers.is_correct) of the picked answers, with a 95% bootstrap
interval, against sqrt(KL), KL(best-of-N || policy) = log N - (N - 1) / N (the analytic value Gao et al. use).
Gold peaking and falling while the proxy keeps rising is over-optimisation; both rising means this proxy has not
been over-optimised at that KL.
"""

from __future__ import annotations

import argparse
import math

import torch

from lmforge.answers import is_correct
from lmforge.data.prompts import render_prompt
from lmforge.data.tinyworld import eval_rows
from lmforge.generation import SamplingParams, generate
from lmforge.inference_scaling import overoptimisation
from lmforge.modelio import load_model_and_tokenizer
from lmforge.scoring import reward_scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", required=True)
    ap.add_argument("--reward-model", required=True)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-n", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    policy, tok = load_model_and_tokenizer(args.policy, "cpu")
    rm = load_model_and_tokenizer(args.reward_model, "cpu")[0]
    rows = eval_rows(args.prompts)
    prompts = [render_prompt(tok, r["prompt"]) for r in rows]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, n=args.max_n, seed=0)
    outs = generate(policy.eval(), prompts, params, tokenizer=tok, pad_id=tok.pad_id)
    with torch.no_grad():
        scores = reward_scores(rm.eval(), [(p, c.token_ids) for p, cs in zip(prompts, outs) for c in cs], tok.pad_id)
    proxy = torch.tensor(scores).view(len(rows), args.max_n)
    gold = torch.tensor([[float(is_correct(c.text, r["answer"])) for c in cs] for r, cs in zip(rows, outs)])
    ns = [2 ** k for k in range(int(math.log2(args.max_n)) + 1)]
    curve = overoptimisation(proxy, gold, ns)
    print(f"best-of-N, {len(rows)} held-out problems x {args.max_n} samples (temperature 1)")
    print(f"{'N':>4} {'sqrt KL':>8} {'proxy (RM score)':>28} {'gold (accuracy)':>28}")
    def cell(x):
        return f"{x['value']:7.3f} [{x['ci'][0]:6.3f}, {x['ci'][1]:6.3f}]"
    for r in curve:
        print(f"{r['n']:>4} {r['sqrt_kl']:>8.3f} {cell(r['proxy']):>28} {cell(r['gold']):>28}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        x = [r["sqrt_kl"] for r in curve]
        ax.plot(x, [r["gold"]["value"] for r in curve], marker="o", label="gold (verifier accuracy)")
        ax2 = ax.twinx()
        ax2.plot(x, [r["proxy"]["value"] for r in curve], marker="s", color="C1", label="proxy (RM score)")
        ax.set_xlabel("sqrt KL(best-of-N || policy)")
        ax.set_ylabel("gold")
        ax2.set_ylabel("proxy")
        fig.legend(loc="upper center", ncol=2)
        fig.tight_layout(rect=(0, 0, 1, 0.9))
        fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
