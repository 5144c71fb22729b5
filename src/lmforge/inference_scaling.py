"""Inference-time scaling: buy accuracy with samples ("thinking tokens") instead of parameters.

    best_of_n         sample n, keep the completion a scorer likes best (reward model, DPO implicit reward)
    self_consistency  sample n, majority vote over their final answers (Wang et al. 2022)
    adaptive_budget   sample in rounds; stop a problem once its top answer holds threshold of the votes
    accuracy_vs_samples   the sweep: accuracy and tokens spent for N = 1, 2, 4, ... (+ a plot)
    overoptimisation  best-of-N's proxy and gold rewards against sqrt(KL) (Gao et al. 2022); rl_overoptimisation
                      the same read from an RL run's metrics (PPO against the reward model); plot_overoptimisation

Answers come from ``extract(text)`` (default ``answers.extract_answer``). Without a tokenizer a completion's
text is its token ids joined by spaces, which lets tests script answers on tiny random models.
A scorer is ``scorer(prompt_ids, completion_ids) -> float``; one may carry ``score_batch(pairs) -> list[float]``
to score many at once (the model-based scorers here do).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lmforge.answers import answers_match, extract_answer, is_correct
from lmforge.evaluation import rate
from lmforge.figures import save_figure
from lmforge.generation import Completion, SamplingParams, generate
from lmforge.scoring import reward_scores, sequence_logprobs

Scorer = Callable[[list[int], list[int]], float]
Extract = Callable[[str], "str | None"]


@dataclass
class Pick:
    """best_of_n's result for one prompt."""
    completion: Completion
    score: float
    scores: list[float]
    completions: list[Completion]
    tokens: int  # tokens generated for this prompt


@dataclass
class Vote:
    """self_consistency's / adaptive_budget's result for one prompt."""
    answer: str | None  # the most voted answer; None when no completion had one
    share: float  # its votes / completions sampled
    votes: dict[str, int]
    completions: list[Completion]
    tokens: int  # tokens generated for this prompt


def completion_text(c: Completion) -> str:
    return c.text if c.text is not None else " ".join(map(str, c.token_ids))


def majority(answers: list[str | None]) -> tuple[str | None, float, dict[str, int]]:
    """(top answer, its share of all answers, counts); None answers count as samples but get no vote.
    Ties go to the answer seen first, so the result never depends on dict or hash order."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return None, 0.0, {}
    answer, count = votes.most_common(1)[0]
    return answer, count / len(answers), dict(votes)


def weighted_majority(answers: list[str | None], weights: list[float]) -> str | None:
    """The answer whose samples' weights sum highest: verifier-weighted voting (Li et al. 2023, "Making language
    models better reasoners with step-aware verifier"; Math-Shepherd's PRM-weighted self-consistency, Wang et al.
    2024). With equal weights it is majority voting; ties go to the answer seen first. None answers get no vote."""
    totals: dict[str, float] = {}
    for a, w in zip(answers, weights, strict=True):
        if a is not None:
            totals[a] = totals.get(a, 0.0) + float(w)
    return max(totals, key=totals.__getitem__) if totals else None


def score_pairs(scorer: Scorer, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
    batch = getattr(scorer, "score_batch", None)
    return list(batch(pairs)) if batch is not None else [float(scorer(p, c)) for p, c in pairs]


def best_of_n(model, prompts: list[list[int]], n: int, scorer: Scorer, params: SamplingParams | None = None,
              *, tokenizer=None) -> list[Pick]:
    """Sample n completions per prompt and keep the highest-scoring one (the first on ties)."""
    params = replace(params or SamplingParams(), n=n)
    results = generate(model, prompts, params, tokenizer=tokenizer)
    scores = score_pairs(scorer, [(p, c.token_ids) for p, row in zip(prompts, results) for c in row])
    picks = []
    for i, row in enumerate(results):
        s = scores[i * n:(i + 1) * n]
        best = max(range(n), key=lambda j: s[j])
        picks.append(Pick(row[best], s[best], s, row, sum(len(c.token_ids) for c in row)))
    return picks


def self_consistency(model, prompts: list[list[int]], n: int, extract: Extract = extract_answer,
                     params: SamplingParams | None = None, *, tokenizer=None) -> list[Vote]:
    """Sample n completions per prompt and majority-vote over their extracted answers."""
    params = replace(params or SamplingParams(), n=n)
    results = generate(model, prompts, params, tokenizer=tokenizer)
    return [_vote(row, extract) for row in results]


def _vote(completions: list[Completion], extract: Extract) -> Vote:
    answer, share, votes = majority([extract(completion_text(c)) for c in completions])
    return Vote(answer, share, votes, completions, sum(len(c.token_ids) for c in completions))


def adaptive_budget(model, prompts: list[list[int]], *, max_samples: int = 16, round_size: int = 4,
                    threshold: float = 0.75, extract: Extract = extract_answer,
                    params: SamplingParams | None = None, tokenizer=None) -> list[Vote]:
    """Self-consistency that stops early on easy problems.

    Every round samples ``round_size`` more completions for the problems still open; a problem closes once its
    top answer holds at least ``threshold`` of its samples, or at ``max_samples``. Problems the model is sure
    about cost one round; the budget goes to the ones it is unsure about. Returns Votes (``tokens`` = spent).
    """
    if round_size < 1 or max_samples < round_size:
        raise ValueError(f"need 1 <= round_size <= max_samples, got {round_size} and {max_samples}")
    params = params or SamplingParams()
    seed = params.seed if params.seed is not None else int(torch.randint(0, 2**31, ()))
    sampled: list[list[Completion]] = [[] for _ in prompts]
    open_ = list(range(len(prompts)))
    for r in range(-(-max_samples // round_size)):
        size = min(round_size, max_samples - r * round_size)
        rows = generate(model, [prompts[i] for i in open_], replace(params, n=size, seed=seed * 1_000_003 + r),
                        tokenizer=tokenizer)
        for i, row in zip(open_, rows):
            sampled[i] += row
        open_ = [i for i in open_ if _keeps_going(sampled[i], extract, threshold, max_samples)]
        if not open_:
            break
    return [_vote(row, extract) for row in sampled]


def _keeps_going(completions: list[Completion], extract: Extract, threshold: float, max_samples: int) -> bool:
    answer, share, _ = majority([extract(completion_text(c)) for c in completions])
    return len(completions) < max_samples and (answer is None or share < threshold)


def adaptive_samples_used(answers: list[str | None], round_size: int, threshold: float) -> int:
    """How many of these (already drawn) samples adaptive_budget would have used: its stopping rule, replayed."""
    for used in range(round_size, len(answers) + round_size, round_size):
        answer, share, _ = majority(answers[:used])
        if answer is not None and share >= threshold:
            return min(used, len(answers))
    return len(answers)


def accuracy_vs_samples(model, prompts: list[list[int]], golds: list, ns=(1, 2, 4, 8, 16), *,
                        extract: Extract = extract_answer, params: SamplingParams | None = None, tokenizer=None,
                        scorer: Scorer | None = None, thresholds=(0.5, 0.75, 1.0), round_size: int = 2,
                        match: Callable[[str, str], bool] = answers_match) -> list[dict]:
    """Accuracy and mean generated tokens per problem for every N in ``ns``, one row per (method, N).

    Draws max(ns) samples per problem once; N uses the first N of them, so the curves are nested and cheap.
    Methods: "majority" (self-consistency), "best_of_n" (with a scorer), "pass@n" (an oracle that is right when
    any sample is: the ceiling for any selector), and "adaptive" at each vote-share threshold (its stopping
    rule replayed on the same samples, which is what running it live would draw).
    """
    if len(golds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(golds)} gold answers")
    ns = sorted(set(ns))
    top = ns[-1]
    results = generate(model, prompts, replace(params or SamplingParams(), n=top), tokenizer=tokenizer)
    answers = [[extract(completion_text(c)) for c in row] for row in results]
    lengths = [[len(c.token_ids) for c in row] for row in results]
    right = [[a is not None and match(a, str(g)) for a in row] for row, g in zip(answers, golds)]
    scores = None
    if scorer is not None:
        flat = score_pairs(scorer, [(p, c.token_ids) for p, row in zip(prompts, results) for c in row])
        scores = [flat[i * top:(i + 1) * top] for i in range(len(prompts))]

    def row(method: str, n: int, correct: list[bool], used: list[int]) -> dict:
        spent = [sum(lengths[i][:u]) for i, u in enumerate(used)]
        return {"method": method, "n": n, "accuracy": sum(correct) / len(correct),
                "mean_samples": sum(used) / len(used), "mean_tokens": sum(spent) / len(spent)}

    table = []
    for n in ns:
        used = [n] * len(prompts)
        votes = [majority(a[:n])[0] for a in answers]
        table.append(row("majority", n, [v is not None and match(v, str(g)) for v, g in zip(votes, golds)], used))
        if scores is not None:
            best = [max(range(n), key=lambda j, s=s: s[j]) for s in scores]
            table.append(row("best_of_n", n, [r[b] for r, b in zip(right, best)], used))
        table.append(row("pass@n", n, [any(r[:n]) for r in right], used))
    for t in thresholds:
        used = [adaptive_samples_used(a, round_size, t) for a in answers]
        votes = [majority(a[:u])[0] for a, u in zip(answers, used)]
        table.append(row(f"adaptive@{t:g}", top,
                         [v is not None and match(v, str(g)) for v, g in zip(votes, golds)], used))
    return table


def plot_accuracy(table: list[dict], path: str | Path, title: str = "inference-time scaling") -> Path:
    """Accuracy vs samples per problem and vs generated tokens per problem, one line per method (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_n, by_tokens) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for method in dict.fromkeys(r["method"] for r in table):
        rows = [r for r in table if r["method"] == method]
        style = dict(marker="o", linestyle="-" if len(rows) > 1 else "none", label=method)
        by_n.plot([r["mean_samples"] for r in rows], [r["accuracy"] for r in rows], **style)
        by_tokens.plot([max(r["mean_tokens"], 1e-9) for r in rows], [r["accuracy"] for r in rows], **style)
    by_n.set_xscale("log", base=2)
    by_n.set_xlabel("samples per problem")
    by_n.set_ylabel("accuracy")
    by_n.set_ylim(-0.02, 1.02)
    by_tokens.set_xscale("log")
    by_tokens.set_xlabel("generated (thinking) tokens per problem")
    by_tokens.legend(fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)


# ---- scorers ----

def reward_model_scorer(reward_model, pad_id: int = 0, batch_size: int = 16) -> Scorer:
    """A reward model's scalar (its ``score`` head at the last token of prompt + completion), scoring.reward_scores,
    as a scorer."""
    if getattr(reward_model, "score", None) is None:
        raise ValueError("the reward model has no score head (load it with num_labels=1)")

    def score_batch(pairs):
        return reward_scores(reward_model, pairs, pad_id, batch_size)

    def scorer(prompt_ids, completion_ids):
        return score_batch([(prompt_ids, completion_ids)])[0]

    scorer.score_batch = score_batch
    return scorer


def dpo_reward_scorer(policy, reference, beta: float = 0.1, pad_id: int = 0, batch_size: int = 16) -> Scorer:
    """DPO's implicit reward beta * (log pi(y|x) - log pi_ref(y|x)) (Rafailov et al. 2023) as a scorer."""
    def score_batch(pairs):
        lp = sequence_logprobs(policy, pairs, pad_id, batch_size)
        ref = sequence_logprobs(reference, pairs, pad_id, batch_size)
        return [beta * (a - b) for a, b in zip(lp, ref)]

    def scorer(prompt_ids, completion_ids):
        return score_batch([(prompt_ids, completion_ids)])[0]

    scorer.score_batch = score_batch
    return scorer


def overoptimisation(proxy: torch.Tensor, gold: torch.Tensor, ns: list[int]) -> list[dict]:
    """Best-of-N against a proxy reward, judged by a gold one (Gao et al. 2022, "Scaling Laws for Reward Model
    Overoptimization"). ``proxy``, ``gold``: (prompts, max N) rewards of the same samples. Per N: the pick among
    each prompt's first N samples that the proxy scores highest; its mean proxy and gold rewards (with 95%
    bootstrap intervals, evaluation.rate) and sqrt(KL), KL(best-of-N || policy) = log N - (N - 1) / N."""
    rows = []
    for n in ns:
        pick = proxy[:, :n].argmax(1, keepdim=True)
        rows.append({"n": n, "sqrt_kl": math.sqrt(math.log(n) - (n - 1) / n),
                     "proxy": rate(proxy.gather(1, pick)[:, 0].tolist()),
                     "gold": rate(gold.gather(1, pick)[:, 0].tolist())})
    return rows


def proxy_and_gold(model, prompts: list[list[int]], golds: list, n: int, scorer: Scorer,
                   params: SamplingParams | None = None, *, tokenizer=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples per prompt, sampled once: (proxy, gold), each (prompts, n): the scorer's reward of every
    sample and 1.0 where its final answer is right (answers.is_correct), 0.0 where not."""
    outs = generate(model, prompts, replace(params or SamplingParams(), n=n), tokenizer=tokenizer)
    pairs = [(p, c.token_ids) for p, cs in zip(prompts, outs) for c in cs]
    proxy = torch.tensor(score_pairs(scorer, pairs), dtype=torch.float64).view(len(prompts), n)
    gold = torch.tensor([[float(is_correct(completion_text(c), g)) for c in cs] for cs, g in zip(outs, golds)])
    return proxy, gold


def rl_overoptimisation(rows: list[dict], proxy_key: str = "objective/scores", kl_key: str = "objective/kl",
                        gold_key: str = "eval/accuracy") -> list[dict]:
    """An RL run trained against a proxy reward (PPO against the reward model), from its metrics.jsonl rows: at
    every evaluated step s, the gold reward (held-out accuracy of the policy after s updates) beside the proxy
    reward and the KL(pi || pi_ref) per sequence (sum over tokens) of the rollout that policy generated, i.e.
    the first logged step after s (the last evaluation, with no step after it, takes its own step's rollout).
    "kl" is the estimate as logged (k1: it can dip below 0 near the reference); sqrt_kl clips it at 0."""
    logged = [r for r in rows if isinstance(r.get(proxy_key), (int, float)) and isinstance(r.get(kl_key),
                                                                                          (int, float))]
    out = []
    for r in rows:
        if not isinstance(r.get(gold_key), (int, float)) or not logged:
            continue
        after = [x for x in logged if x["step"] > r["step"]] or [x for x in logged if x["step"] == r["step"]]
        if not after:
            continue
        rollout = after[0]
        out.append({"step": r["step"], "kl": rollout[kl_key], "sqrt_kl": math.sqrt(max(rollout[kl_key], 0.0)),
                    "proxy": rollout[proxy_key], "gold": r[gold_key]})
    return out


def plot_overoptimisation(best_of: list[dict], rl: list[dict], path: str | Path, title: str = "") -> Path:
    """Gold (left axis) and proxy (right axis) reward: best-of-N against sqrt(KL), the RL run (if given) against
    its training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # best-of-N against sqrt(KL), as Gao et al. plot it; the RL run against its step (a rollout's KL estimate is
    # noisy and need not grow step by step: the table beside the plot lists it)
    panels = [("best-of-N (KL = log N - (N-1)/N)", "sqrt KL", "sqrt_kl", best_of)]
    panels += [("PPO against the reward model", "training step", "step", rl)] if rl else []
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    lines = []
    for ax, (name, xlabel, xkey, rows) in zip(axes[0], panels):
        x = [r[xkey] for r in rows]
        gold = [r["gold"]["value"] if isinstance(r["gold"], dict) else r["gold"] for r in rows]
        proxy = [r["proxy"]["value"] if isinstance(r["proxy"], dict) else r["proxy"] for r in rows]
        twin = ax.twinx()
        lines = ax.plot(x, gold, marker="o", color="C0", label="gold: verifier accuracy") + \
            twin.plot(x, proxy, marker="s", color="C1", label="proxy: reward model score")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("gold", color="C0")
        twin.set_ylabel("proxy", color="C1")
        ax.set_title(name, fontsize=10)
    fig.legend(lines, [line.get_label() for line in lines], loc="lower center", ncol=2, fontsize=8)
    fig.suptitle(title or "reward-model over-optimisation (Gao et al. 2022)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return save_figure(fig, path)
