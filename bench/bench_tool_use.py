"""Tool use on the tiny world's hardest problems: models answering alone vs models with the calculator tool.

    python bench/bench_tool_use.py --no-tool runs/tiny/grpo/model --tool runs/tool/grpo/model [--n 200]

Every model answers the same held-out problems (builtin:tinyworld/eval_hard: operands of up to 3 digits,
distinct, never trained on), greedily, 64 tokens. A ``--no-tool`` model generates its answer in one turn; a
``--tool`` model runs episodes in environments.Calculator (its ``<calc>...</calc>`` calls answered by the tool,
lmforge.rollout.sample_trajectories). Prints each model's accuracy on all problems and on those with a 3-digit
operand, and each tool model's paired gain over each no-tool model on the same problems, with 95% bootstrap
intervals (evaluation.rate).
"""

from __future__ import annotations

import argparse

import torch

from lmforge.answers import is_correct
from lmforge.data.prompts import render_prompt
from lmforge.data.tinyworld import eval_rows
from lmforge.environments import Calculator
from lmforge.evaluation import rate
from lmforge.generation import SamplingParams
from lmforge.modelio import load_model_and_tokenizer
from lmforge.rollout import sample_and_score, sample_trajectories


def no_reward(inp):
    zeros = torch.zeros(len(inp.completions))
    return zeros, {}


def answers(model_dir: str, rows: list[dict], tool: bool, max_new_tokens: int) -> list[bool]:
    model, tok = load_model_and_tokenizer(model_dir, "cpu")
    ids = [render_prompt(tok, r["prompt"]) for r in rows]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    correct = []
    for s in range(0, len(rows), 50):
        batch, batch_ids = rows[s:s + 50], ids[s:s + 50]
        samples = sample_trajectories(model, tok, batch, batch_ids, params, Calculator, "calculator") if tool \
            else sample_and_score(model, tok, batch, batch_ids, params, no_reward)
        correct += [is_correct(text, r["answer"]) for text, r in zip(samples.texts, batch)]
    return correct


def show(name: str, correct: list[bool], hard: list[bool]) -> None:
    overall, on_hard = rate([float(c) for c in correct]), rate([float(c) for c, h in zip(correct, hard) if h])
    print(f"  {name:50s} all {interval(overall)}   3-digit {interval(on_hard)} (n={on_hard['n']})")


def interval(x: dict) -> str:
    return f"{x['value']:+.3f} [{x['ci'][0]:+.3f}, {x['ci'][1]:+.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-tool", nargs="*", default=[], help="model directories answering alone")
    ap.add_argument("--tool", nargs="*", default=[], help="model directories answering with the calculator")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = eval_rows(args.n, max_digits=3)
    hard = [max(len(w) for w in r["question"].removesuffix("?").split()[2::2]) == 3 for r in rows]
    results = {}
    for tool, dirs in ((False, args.no_tool), (True, args.tool)):
        for d in dirs:
            results[(tool, d)] = answers(d, rows, tool, args.max_new_tokens)
    print(f"{len(rows)} held-out problems, {sum(hard)} with a 3-digit operand; greedy, {args.max_new_tokens} tokens")
    for (tool, d), correct in results.items():
        show(f"{'tool   ' if tool else 'no tool'} {d}", correct, hard)
    for t in args.tool:
        for n in args.no_tool:
            a, b = results[(True, t)], results[(False, n)]
            gain = rate([float(x) - float(y) for x, y, h in zip(a, b, hard) if h])
            print(f"  3-digit gain, {t} (tool) - {n} (no tool): {interval(gain)} paired")


if __name__ == "__main__":
    main()
