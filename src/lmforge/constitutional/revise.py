"""Supervised constitutional AI (Bai et al. 2022, SL-CAI): answer, critique against a principle, revise; k rounds.

For each prompt x the policy samples an answer y_0; then for rounds r = 1..k a principle c_r is drawn at random
from the constitution and the critic (by default the policy itself) is asked, in the same chat,

    [few-shot rounds] x, y_{r-1}, "Critique request: <c_r.critique_request>"   -> critique_r
    ... critique_r, "Revision request: <c_r.revision_request>"                  -> y_r

The trace keeps everything; the SFT row is (x, y_k). A principle is drawn from a stream keyed by (seed, prompt
id, round), so a prompt gets the same principles whatever batch it is in, and a resumed run repeats itself.
"""

from __future__ import annotations

import random
import re

from lmforge.constitutional.cache import collect
from lmforge.constitutional.constitution import Constitution, critique_turn, few_shot_messages, revision_turn
from lmforge.constitutional.judges import ChatParams

_LEADING_LABEL = re.compile(r"^\s*(revision|revised (answer|response)|assistant)\s*:\s*", re.IGNORECASE)


def clean_revision(text: str) -> str:
    """Drop a leading 'Revision:' style label some models echo back."""
    return _LEADING_LABEL.sub("", text).strip()


def revise(policy, critic, prompts: list[dict], constitution: Constitution, rounds: int, params: ChatParams,
           critic_params: ChatParams, few_shot: int = 0, seed: int = 0) -> list[dict]:
    """Traces for a batch of prompts ({"id", "messages"}): initial answer, each round's critique and revision."""
    conversations = [p["messages"] for p in prompts]
    current = [texts[0] for texts in collect(policy.chat(conversations, params), len(prompts))]
    traces = [{"id": p["id"], "prompt": p["messages"], "source": p.get("source"), "initial_response": y,
               "rounds": []} for p, y in zip(prompts, current)]
    shots = few_shot_messages(constitution.examples[:few_shot]) if few_shot else []
    for r in range(rounds):
        principles = [constitution.draw(random.Random(f"{seed}/{p['id']}/{r}")) for p in prompts]
        ask_critique = [shots + conv + [{"role": "assistant", "content": y},
                                        {"role": "user", "content": critique_turn(c)}]
                        for conv, y, c in zip(conversations, current, principles)]
        critiques = [t[0] for t in collect(critic.chat(ask_critique, critic_params), len(prompts))]
        ask_revision = [m + [{"role": "assistant", "content": crit}, {"role": "user", "content": revision_turn(c)}]
                        for m, crit, c in zip(ask_critique, critiques, principles)]
        revisions = [clean_revision(t[0]) for t in collect(critic.chat(ask_revision, critic_params), len(prompts))]
        for i, (c, crit, rev) in enumerate(zip(principles, critiques, revisions)):
            traces[i]["rounds"].append({"principle": c.name, "critique_request": c.critique_request,
                                        "critique": crit, "revision_request": c.revision_request,
                                        "revision": rev, "kept": bool(rev)})
            if rev:  # an empty revision keeps the previous answer
                current[i] = rev
    for trace, y in zip(traces, current):
        trace["final_response"] = y
    return traces


def sft_row(trace: dict, fmt: str = "messages") -> dict:
    """TRL's conversational SFT formats: {"messages"} or {"prompt", "completion"}."""
    answer = [{"role": "assistant", "content": trace["final_response"]}]
    if fmt == "messages":
        return {"messages": trace["prompt"] + answer}
    return {"prompt": trace["prompt"], "completion": answer}
