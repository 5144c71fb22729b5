"""RLAIF preference labels (Bai et al. 2022, RL-CAI): two answers per prompt, a judge says which better follows
a principle, and its probabilities become a soft label.

For prompt x with sampled answers y_1, y_2 and a principle c drawn at random (among those with a choice
prompt), the judge is shown both answers and asked for one label. With p_A = P(judge answers A), normalised over
the two labels, and ``both_orders`` (the default, which cancels the judge's position bias),

    q = P(y_1 better) = ( p_A[y_1 as A, y_2 as B] + p_B[y_2 as A, y_1 as B] ) / 2

The row is chosen = the answer with q > 1/2, and ``label_confidence`` = max(q, 1 - q) in [0.5, 1], the judge's
probability that chosen is really the better answer. Training uses it as a soft label:

- DPO: per-pair ``label_smoothing`` eps = 1 - label_confidence in objectives.preference.dpo_loss ("sigmoid"/"cdpo"
  is then the expected DPO loss under the judge's label; "robust" needs eps < 1/2);
- reward model: L = -(c log sigma(r_w - r_l) + (1 - c) log sigma(r_l - r_w)), c = label_confidence.

Pairs whose answers are identical, or whose judgments are all unparsed, or whose confidence is exactly 1/2
(no preference) are skipped and counted.
"""

from __future__ import annotations

import random

from lmforge.constitutional.cache import collect
from lmforge.constitutional.constitution import Constitution, pairwise_messages
from lmforge.constitutional.judges import ChatParams


def sample_pairs(policy, prompts: list[dict], params: ChatParams) -> list[tuple[str, str]]:
    """Two sampled answers per prompt (params.n is forced to 2)."""
    two = ChatParams(**{**vars(params), "n": 2})
    return [tuple(texts) for texts in collect(policy.chat([p["messages"] for p in prompts], two), len(prompts))]


def label_pairs(judge, prompts: list[dict], answers: list[tuple[str, str]], constitution: Constitution,
                labels: tuple[str, str] = ("A", "B"), both_orders: bool = True, seed: int = 0) -> list[dict]:
    """One judgment record per prompt: both answers, the principle, q = P(first answer better), the methods.

    ``skipped`` is None, "identical" (nothing to compare) or "unparsed" (no judgment named a label).
    """
    records = [{"id": p["id"], "prompt": p["messages"], "answers": list(a), "principle": None, "p_first_better": None,
                "methods": [], "label_mass": [], "skipped": "identical" if a[0].strip() == a[1].strip() else None}
               for p, a in zip(prompts, answers)]
    work = [r for r in records if r["skipped"] is None]
    requests = []
    for r in work:
        c = constitution.draw(random.Random(f"{seed}/{r['id']}"), for_choice=True)
        r["principle"] = c.name
        y1, y2 = r["answers"]
        requests.append(pairwise_messages(r["prompt"], y1, y2, c, labels))
        if both_orders:
            requests.append(pairwise_messages(r["prompt"], y2, y1, c, labels))
    verdicts = collect(judge.choose(requests, labels), len(requests))
    per = 2 if both_orders else 1
    for k, r in enumerate(work):
        judged = verdicts[k * per:(k + 1) * per]
        r["methods"], r["label_mass"] = [v.method for v in judged], [v.mass for v in judged]
        if all(v.method == "unparsed" for v in judged):
            r["skipped"] = "unparsed"
            continue
        q = judged[0].probs[0] if not both_orders else (judged[0].probs[0] + judged[1].probs[1]) / 2
        r["p_first_better"] = round(q, 6)
    return records


def preference_row(record: dict, min_confidence: float = 0.5) -> dict | None:
    """TRL's conversational preference row plus ``label_confidence``; None when the record holds no preference."""
    q = record["p_first_better"]
    if record["skipped"] or q is None or q == 0.5 or max(q, 1 - q) < min_confidence:
        return None
    y1, y2 = record["answers"]
    chosen, rejected = (y1, y2) if q > 0.5 else (y2, y1)
    return {"prompt": record["prompt"], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "label_confidence": round(max(q, 1 - q), 6),
            "principle": record["principle"]}
