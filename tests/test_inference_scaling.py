"""Best-of-N, majority votes, adaptive budgets and the sweep, on a tiny random model with scripted answers."""

import json
import math
from collections import Counter
from dataclasses import replace

import pytest
import torch

from lmforge import inference_scaling
from lmforge.cli import main
from lmforge.generation import SamplingParams, generate
from lmforge.inference_scaling import (
    accuracy_vs_samples,
    adaptive_budget,
    adaptive_samples_used,
    best_of_n,
    dpo_reward_scorer,
    majority,
    overoptimisation,
    plot_accuracy,
    reward_model_scorer,
    rl_overoptimisation,
    self_consistency,
    weighted_majority,
)
from lmforge.model import ModelConfig, Transformer
from lmforge.modelio import load_model_and_tokenizer, save_model_dir
from lmforge.scoring import sequence_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, **kw)).eval()


PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
PARAMS = SamplingParams(max_new_tokens=4, temperature=1.0, seed=0)
first_token_mod_3 = lambda text: str(int(text.split()[0]) % 3)  # a scripted "answer": first token id mod 3


def test_majority_counts_and_breaks_ties_by_first_seen():
    assert majority(["4", None, "5", "4"]) == ("4", 0.5, {"4": 2, "5": 1})
    assert majority(["7", "5", "5", "7"])[0] == "7"
    assert majority([None, None]) == (None, 0.0, {})


def test_weighted_majority_sums_each_answers_weights():
    # "5" has fewer votes than "4" (1 vs 2) but more weight (0.9 vs 0.3 + 0.4): the verifier overrules the count
    assert weighted_majority(["4", "5", None, "4"], [0.3, 0.9, 5.0, 0.4]) == "5"
    assert weighted_majority(["4", "5", "4"], [1.0, 1.0, 1.0]) == majority(["4", "5", "4"])[0]  # equal weights
    assert weighted_majority(["7", "5"], [0.5, 0.5]) == "7"  # a tie goes to the first seen
    assert weighted_majority([None], [1.0]) is None
    with pytest.raises(ValueError):
        weighted_majority(["4"], [0.1, 0.2])


def test_self_consistency_picks_the_most_frequent_extracted_answer():
    votes = self_consistency(tiny(), PROMPTS, 8, extract=first_token_mod_3, params=PARAMS)
    for v in votes:
        counts = Counter(first_token_mod_3(" ".join(map(str, c.token_ids))) for c in v.completions)
        assert len(v.completions) == 8 and v.votes == dict(counts)
        assert counts[v.answer] == max(counts.values()) and v.share == counts[v.answer] / 8
        assert v.tokens == sum(len(c.token_ids) for c in v.completions)


def test_best_of_n_picks_the_max_scoring_completion():
    scorer = lambda prompt, completion: -abs(completion[0] - 10) + 0.01 * len(prompt)
    picks = best_of_n(tiny(), PROMPTS, 6, scorer, params=PARAMS)
    for prompt, pick in zip(PROMPTS, picks):
        assert pick.scores == [scorer(prompt, c.token_ids) for c in pick.completions]
        assert pick.score == max(pick.scores) and pick.completion is pick.completions[pick.scores.index(pick.score)]


def test_adaptive_stops_early_when_samples_agree_and_spends_the_budget_when_not(monkeypatch):
    model = tiny()
    calls = []

    def counted(model, prompts, params, **kw):
        calls.append((len(prompts), params.n))
        return generate(model, prompts, params, **kw)

    monkeypatch.setattr(inference_scaling, "generate", counted)
    agreed = adaptive_budget(model, PROMPTS, max_samples=12, round_size=3, extract=lambda text: "42",
                             params=PARAMS)
    monkeypatch.undo()
    assert all(len(v.completions) == 3 and v.answer == "42" and v.share == 1.0 for v in agreed)
    assert calls == [(3, 3)]  # one round: 3 prompts x 3 samples
    torn = adaptive_budget(model, PROMPTS, max_samples=12, round_size=3, extract=lambda text: text,
                           params=SamplingParams(max_new_tokens=6, seed=0))
    assert all(len(v.completions) == 12 for v in torn)  # every sample differs: never confident
    assert sum(v.tokens for v in torn) > 3 * sum(v.tokens for v in agreed)
    # the rounds draw fresh samples, not the same ones again
    assert len({tuple(c.token_ids) for c in torn[0].completions}) == 12


def test_adaptive_replay_matches_the_rule():
    assert adaptive_samples_used(["1", "1", "2", "2", "2", "2"], round_size=2, threshold=0.75) == 2
    assert adaptive_samples_used(["1", "2", "2", "2", "2", "3"], round_size=2, threshold=0.75) == 4
    assert adaptive_samples_used(["1", "2", "3", "4", "5"], round_size=2, threshold=0.75) == 5


def test_sweep_table_and_plot(tmp_path):
    model = tiny()
    golds = ["0", "1", "2"]
    table = accuracy_vs_samples(model, PROMPTS, golds, ns=(1, 2, 4, 8), extract=first_token_mod_3, params=PARAMS,
                                scorer=lambda p, c: float(c[0]), thresholds=(0.6,))
    majority_rows = [r for r in table if r["method"] == "majority"]
    assert [r["n"] for r in majority_rows] == [1, 2, 4, 8]
    tokens = [r["mean_tokens"] for r in majority_rows]
    assert tokens == sorted(tokens) and tokens[-1] == pytest.approx(8 * tokens[0], rel=0.5)
    passes = [r["accuracy"] for r in table if r["method"] == "pass@n"]
    assert passes == sorted(passes)  # the oracle only improves with more samples
    for r in table:  # no selector beats the oracle at the same N
        oracle = next(o for o in table if o["method"] == "pass@n" and o["n"] == r["n"])
        assert r["accuracy"] <= oracle["accuracy"] + 1e-9
    assert {r["method"] for r in table} == {"majority", "best_of_n", "pass@n", "adaptive@0.6"}
    # all answers identical -> accuracy 1 everywhere, and adaptive stops after one round
    sure = accuracy_vs_samples(model, PROMPTS, ["7"] * 3, ns=(1, 4), extract=lambda t: "7", params=PARAMS,
                               thresholds=(1.0,), round_size=2)
    assert all(r["accuracy"] == 1.0 for r in sure)
    assert next(r for r in sure if r["method"].startswith("adaptive"))["mean_samples"] == 2
    png = plot_accuracy(table, tmp_path / "plot.png")
    assert png.stat().st_size > 1000


def test_sequence_logprobs_match_the_engine_and_dpo_reward_is_zero_against_itself():
    model = tiny()
    rows = generate(model, PROMPTS, SamplingParams(max_new_tokens=5, n=2, seed=3, return_logprobs=True))
    pairs = [(p, c.token_ids) for p, row in zip(PROMPTS, rows) for c in row]
    expected = [sum(c.logprobs) for row in rows for c in row]
    assert sequence_logprobs(model, pairs, batch_size=4) == pytest.approx(expected, abs=1e-4)
    assert dpo_reward_scorer(model, model).score_batch(pairs) == pytest.approx([0.0] * len(pairs), abs=1e-6)
    other = tiny(seed=1)
    scorer = dpo_reward_scorer(model, other, beta=0.5)
    ref = sequence_logprobs(other, pairs)
    assert scorer(*pairs[0]) == pytest.approx(0.5 * (expected[0] - ref[0]), abs=1e-4)


def test_reward_model_scorer_reads_the_last_token_and_ignores_padding():
    rm = tiny(num_labels=1)
    torch.nn.init.normal_(rm.score.weight)
    scorer = reward_model_scorer(rm)
    pairs = [([1, 2, 3], [4]), ([5], [6, 7, 8, 9, 10])]
    with torch.no_grad():
        alone = [float(rm.score(rm(torch.tensor([p + c]), return_hidden=True)[:, -1])[0, 0]) for p, c in pairs]
    assert scorer.score_batch(pairs) == pytest.approx(alone, abs=1e-5)
    assert scorer(*pairs[1]) == pytest.approx(alone[1], abs=1e-5)
    with pytest.raises(ValueError, match="score head"):
        reward_model_scorer(tiny())


def test_think_cli_sweep_and_methods(tiny_model_dir, tmp_path, capsys):
    model_dir = tiny_model_dir("think", text="1 + 2 = 3. The answer is 3.\n4 + 4 = 8. The answer is 8.\n")
    rows = [{"prompt": "1 + 2 =", "answer": 3}, {"messages": [{"role": "user", "content": "4 + 4"}], "answer": "8"}]
    (tmp_path / "p.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    base = ["think", f"model={model_dir}", f"input={tmp_path / 'p.jsonl'}", "max_new_tokens=6",
            "device=cpu", "n=4"]
    assert main([*base, f"out_dir={tmp_path / 'sweep'}"]) == 0
    table = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [r["n"] for r in table if r["method"] == "majority"] == [1, 2, 4]
    assert (tmp_path / "sweep" / "accuracy_vs_samples.png").exists()
    for method in ("adaptive", "self_consistency", "best_of_n"):
        out = tmp_path / method
        assert main([*base, f"method={method}", f"out_dir={out}", f"reference_model={model_dir}"]) == 0
        results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        assert len(results) == 2 and all({"predicted", "correct", "tokens"} <= set(r) for r in results)
    assert "accuracy" in capsys.readouterr().out
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1 + 2 ="}\n')
    assert main(["think", *base[1:2], f"input={tmp_path / 'bad.jsonl'}", *base[3:]]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_overoptimisation_picks_by_the_proxy_and_reports_the_gold_of_the_pick():
    proxy = torch.tensor([[0.1, 0.9, 0.5, 0.2], [0.3, 0.2, 0.1, 0.8]])
    gold = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    rows = overoptimisation(proxy, gold, [1, 2, 4])
    assert [r["n"] for r in rows] == [1, 2, 4]
    assert [r["proxy"]["value"] for r in rows] == pytest.approx([0.2, 0.6, 0.85])  # picks 0,0 / 1,0 / 1,3
    assert [r["gold"]["value"] for r in rows] == [0.5, 0.0, 0.5]  # the proxy rises, the gold dips
    assert rows[0]["sqrt_kl"] == 0.0 and rows[2]["sqrt_kl"] == pytest.approx(math.sqrt(math.log(4) - 0.75))


def test_rl_overoptimisation_pairs_each_evaluation_with_the_rollout_of_the_policy_it_evaluated():
    rows = [{"step": 0, "eval/accuracy": 0.5},
            {"step": 1, "objective/scores": 0.1, "objective/kl": 0.0, "loss": 1.0},
            {"step": 2, "objective/scores": 0.4, "objective/kl": 1.0},
            {"step": 2, "eval/accuracy": 0.75},
            {"step": 3, "objective/scores": 0.9, "objective/kl": 4.0},
            {"step": 3, "eval/accuracy": 0.25}]
    assert rl_overoptimisation(rows) == [
        {"step": 0, "kl": 0.0, "sqrt_kl": 0.0, "proxy": 0.1, "gold": 0.5},  # step 0's policy made step 1's rollout
        {"step": 2, "kl": 4.0, "sqrt_kl": 2.0, "proxy": 0.9, "gold": 0.75},
        {"step": 3, "kl": 4.0, "sqrt_kl": 2.0, "proxy": 0.9, "gold": 0.25}]  # the last: its own step's rollout
    assert rl_overoptimisation([{"step": 0, "eval/accuracy": 0.5}]) == []


def test_think_cli_overoptimisation_writes_both_curves_and_names_a_bad_rl_run(tiny_model_dir, tmp_path, capsys):
    model_dir = tiny_model_dir("oo", text="1 + 2 = 3. The answer is 3.\n4 + 4 = 8. The answer is 8.\n")
    policy, tok = load_model_and_tokenizer(str(model_dir), "cpu")
    torch.manual_seed(1)
    save_model_dir(tmp_path / "rm", Transformer(replace(policy.config, num_labels=1)), tok)
    ppo = tmp_path / "ppo"
    ppo.mkdir()
    (ppo / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 0, "eval/accuracy": 0.5}, {"step": 1, "objective/scores": 0.2, "objective/kl": 0.25},
        {"step": 1, "eval/accuracy": 0.4}]))
    rows = [{"prompt": "1 + 2 =", "answer": 3}, {"messages": [{"role": "user", "content": "4 + 4"}], "answer": "8"}]
    (tmp_path / "p.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    base = ["think", "method=overoptimisation", f"model={model_dir}", f"input={tmp_path / 'p.jsonl'}",
            "max_new_tokens=6", "device=cpu", "n=4", f"reward_model={tmp_path / 'rm'}", f"out_dir={tmp_path / 'o'}"]
    assert main([*base, f"rl_run={ppo}"]) == 0
    result = json.loads((tmp_path / "o" / "overoptimisation.json").read_text())
    assert [r["n"] for r in result["best_of_n"]] == [1, 2, 4] and result["problems"] == 2
    assert [(r["step"], r["gold"]) for r in result["rl"]] == [(0, 0.5), (1, 0.4)]
    assert (tmp_path / "o" / "overoptimisation.png").stat().st_size > 0
    assert len(json.loads((tmp_path / "o" / "tables.json").read_text())) == 2
    assert "best-of-N against the reward model" in capsys.readouterr().out
    assert main([*base, f"rl_run={tmp_path}"]) == 2  # no metrics.jsonl there
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert main(base[:-2] + [f"out_dir={tmp_path / 'x'}"]) == 2  # no proxy: reward_model is required
