"""Constitutional AI and RLAIF: critique -> revision SFT data, and AI-judged soft preference labels.

constitution.py  principles (critique request, revision request, choice prompt) and the prompts built from them
judges.py        local model and OpenAI-compatible endpoint behind one interface (chat, choose)
cache.py         on-disk answer cache (resume without re-asking)
prompts.py       prompt readers (jsonl, HH-RLHF, AdvBench, XSTest, built-in sets): prompts only
revise.py        the critique/revision loop (SL-CAI)
label.py         pairwise judging into soft-labelled preference pairs (RL-CAI / RLAIF)
evaluate.py      harmlessness, over-refusal and helpfulness before/after
"""
