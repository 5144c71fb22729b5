"""Evaluation metrics against hand-computed values on tiny models, and `lmforge eval` end to end."""

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge import evaluation as ev
from lmforge.cli import main
from lmforge.data.chat import tokenize_prompt_completion
from lmforge.data.shards import TokenDataset, build_shards
from lmforge.errors import DataError
from lmforge.generation import Completion
from lmforge.model import ModelConfig, Transformer
from lmforge.modelio import save_model_dir
from lmforge.scoring import completion_logprobs
from lmforge.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TEXTS = [f"What is {a} + {b}? The answer is {a + b}." for a in range(0, 60, 7) for b in range(3, 40, 9)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS * 3, vocab_size=300)


def tiny(tok, seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=128, **kw)).eval()


# ---- statistics ----

def test_bootstrap_ci_contains_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (20, 200, 2000):
        x = (rng.random(n) < 0.3).astype(float)
        value, low, high = ev.bootstrap_ci(x, n_boot=500, seed=1)
        assert value == pytest.approx(x.mean()) and low <= value <= high
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2] > 0
    # about 1.96 standard errors each side for a mean
    assert widths[2] == pytest.approx(2 * 1.96 * math.sqrt(0.3 * 0.7 / 2000), rel=0.2)
    assert ev.bootstrap_ci(x, seed=3) == ev.bootstrap_ci(x, seed=3)  # seeded: reproducible
    median, lo, hi = ev.bootstrap_ci([1, 2, 3, 4, 100], stat=np.median, n_boot=200)
    assert median == 3 and lo <= 3 <= hi
    assert ev.bootstrap_ci([1.0, 1.0]) == (1.0, 1.0, 1.0)
    assert all(math.isnan(v) for v in ev.bootstrap_ci([]))


def test_repetition_rate_and_hacking_probes():
    assert ev.repetition_rate([1, 2, 1, 2, 1, 2], n=2) == pytest.approx(1 - 2 / 5)
    assert ev.repetition_rate([1, 2, 3, 4, 5], n=2) == 0.0 and ev.repetition_rate([1, 2], n=4) == 0.0
    policy = [Completion([1, 2, 3, 4], "stop"), Completion([5] * 8, "length")]
    reference = [Completion([1, 2], "stop"), Completion([3, 4], "stop")]
    probes = ev.hacking_probes(policy, reference)
    assert probes["mean_length"] == 6 and probes["reference_mean_length"] == 2 and probes["length_ratio"] == 3
    assert probes["truncated_rate"] == 0.5
    assert probes["repetition_rate_4gram"] == pytest.approx((0 + (1 - 1 / 5)) / 2)


# ---- task accuracy ----

def test_task_accuracy_with_scripted_answers(tok, monkeypatch):
    rows = [{"prompt": "What is 2 + 3?", "answer": "5"},
            {"prompt": "What is 4 + 3?", "answer": 7},
            {"messages": [{"role": "user", "content": "What is 1 + 1?"}], "answer": "2"},
            {"prompt": "What is 9 + 3?", "answer": "12"}]
    script = {"What is 2 + 3?": ("The answer is 5.", 3, "stop"), "What is 4 + 3?": ("The answer is 8.", 5, "stop"),
              "What is 1 + 1?": ("I do not know", 4, "length"), "What is 9 + 3?": ("so #### 12", 2, "stop")}
    seen = []

    def fake_generate(model, prompts, params, tokenizer=None, pad_id=0, **kw):
        out = []
        for ids in prompts:
            seen.append(ids)
            text = tok.decode(ids)
            question = next(q for q in script if q in text)
            answer, length, finish = script[question]
            out.append([Completion([7] * length, finish, answer)])
        return out

    monkeypatch.setattr(ev, "generate", fake_generate)
    res = ev.task_accuracy(tiny(tok), tok, rows, max_new_tokens=5, batch_size=3)
    assert res["accuracy"]["value"] == 0.5 and res["accuracy"]["n"] == 4  # 5 and 12 right, 8 wrong, none
    assert res["format_rate"]["value"] == 0.75
    assert res["mean_response_tokens"] == (3 + 5 + 4 + 2) / 4 and res["truncated_rate"] == 0.25
    assert [r["correct"] for r in res["records"]] == [True, False, False, True]
    assert res["records"][1] | {} == {"prompt": "What is 4 + 3?", "response": "The answer is 8.", "answer": "7",
                                      "predicted": "8", "correct": False, "tokens": 5, "thinking_tokens": 0,
                                      "finish_reason": "stop"}
    assert res["records"][2]["prompt"] == "What is 1 + 1?" and res["records"][2]["predicted"] is None
    # chat prompts: bos, then the template up to the assistant header
    assert all(ids[0] == tok.bos_id and tok.decode(ids).endswith("<|im_start|>assistant\n") for ids in seen)
    seen.clear()
    ev.task_accuracy(tiny(tok), tok, rows[:1], chat=False)
    assert seen[0] == tok.encode("What is 2 + 3?", add_bos=True)


def test_task_accuracy_n_samples_gives_pass_at_n(tok, monkeypatch):
    answers = iter(["The answer is 1.", "The answer is 5.", "The answer is 3.", "The answer is 4."])
    monkeypatch.setattr(ev, "generate", lambda model, prompts, params, **kw: [
        [Completion([1], "stop", next(answers)) for _ in range(params.n)] for _ in prompts])
    res = ev.task_accuracy(tiny(tok), tok, [{"prompt": "a", "answer": "5"}, {"prompt": "b", "answer": "9"}], n=2)
    assert res["accuracy"]["value"] == 0.25 and res["pass_at_n"]["value"] == 0.5
    assert [r["sample"] for r in res["records"]] == [0, 1, 0, 1]


def test_task_accuracy_runs_the_real_engine(tok):
    rows = [{"prompt": "What is 2 + 3?", "answer": "5"}, {"prompt": "What is 14 + 3?", "answer": "17"}]
    res = ev.task_accuracy(tiny(tok), tok, rows, max_new_tokens=6)
    assert len(res["records"]) == 2 and all(0 < r["tokens"] <= 6 for r in res["records"])
    assert 0 <= res["accuracy"]["value"] <= 1


# ---- reward models, KL, perplexity ----

def test_preference_accuracy_with_a_hand_set_head(tok):
    rm = tiny(tok, num_labels=1)
    pairs = [{"prompt": f"What is {a} + 1?", "chosen": f"The answer is {a + 1}.", "rejected": f"It is {a}{a}."}
             for a in range(6)]

    def by_hand(w):  # one unpadded forward per sequence, the head's dot product at its last token
        with torch.no_grad():
            rm.score.weight.copy_(w)
            out = []
            for p in pairs:
                r = []
                for answer in (p["chosen"], p["rejected"]):
                    prompt_ids, completion_ids = tokenize_prompt_completion(tok, p["prompt"], answer)
                    hidden = rm(torch.tensor([prompt_ids + completion_ids]), return_hidden=True)[0, -1]
                    r.append(float(hidden @ w[0]))
                out.append(r[0] > r[1])
        return sum(out) / len(out)

    torch.manual_seed(1)
    w = torch.randn(1, 32)
    expected = by_hand(w)
    res = ev.preference_accuracy(rm, tok, pairs, batch_size=4, n_boot=100)
    assert res["accuracy"]["value"] == pytest.approx(expected) and res["accuracy"]["n"] == 6
    chosen_wins = [r["chosen_reward"] > r["rejected_reward"] for r in res["records"]]
    assert sum(chosen_wins) / 6 == pytest.approx(expected)
    by_hand(-w)
    flipped = ev.preference_accuracy(rm, tok, pairs, n_boot=100)["accuracy"]["value"]
    assert flipped == pytest.approx(1 - expected)  # no ties: the opposite head is right exactly when w is wrong
    by_hand(torch.zeros(1, 32))
    assert ev.preference_accuracy(rm, tok, pairs, n_boot=100)["accuracy"]["value"] == 0.5  # all ties count half


def test_kl_is_zero_for_the_reference_itself_and_positive_otherwise(tok):
    policy, other = tiny(tok, seed=0), tiny(tok, seed=1)
    prompts = [tok.encode(t, add_bos=True) for t in ("What is 1", "The answer", "What is 22 + 9?")]
    same = ev.kl_to_reference(policy, policy, prompts, n=2, max_new_tokens=6, tokenizer=tok, n_boot=50)
    assert same["kl_k1_per_token"] == 0 and same["kl_k3_per_token"] == 0
    assert same["kl_k1_per_sequence"]["value"] == 0 and same["sequences"] == 6
    diff = ev.kl_to_reference(policy, other, prompts, n=4, max_new_tokens=6, tokenizer=tok, n_boot=50)
    assert diff["kl_k3_per_token"] > 0 and diff["kl_k1_per_token"] != 0


def test_completion_logprobs_match_unpadded_forwards(tok):
    model = tiny(tok)
    pairs = [([1, 5, 9], [20, 21]), ([4], [7, 8, 9, 10]), ([3, 3, 3, 3, 3], [11])]
    got = completion_logprobs(model, pairs, pad_id=tok.pad_id, batch_size=2)
    for (p, c), lp in zip(pairs, got):
        with torch.no_grad():
            full = model(torch.tensor([p + c]))[0].log_softmax(-1)
        expected = torch.tensor([full[len(p) - 1 + i, t] for i, t in enumerate(c)])
        assert torch.allclose(lp, expected, atol=1e-5)


def test_perplexity_is_exp_of_mean_cross_entropy(tok):
    model = tiny(tok)
    texts = TEXTS[:5]

    def by_hand(seq_len):
        nll, n = 0.0, 0
        with torch.no_grad():
            for t in texts:
                ids = tok.encode(t, add_bos=True)
                for s in range(0, len(ids) - 1, seq_len):
                    w = torch.tensor(ids[s:s + seq_len + 1])
                    nll += float(F.cross_entropy(model(w[None, :-1])[0], w[1:], reduction="sum"))
                    n += len(w) - 1
        return nll / n, n

    for seq_len in (128, 5):
        loss, n = by_hand(seq_len)
        res = ev.perplexity(model, tok, texts, seq_len=seq_len, batch_size=3)
        assert res["tokens"] == n and res["loss"] == pytest.approx(loss, rel=1e-5)
        assert res["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_perplexity_on_token_shards(tok, tmp_path):
    build_shards(TEXTS, tok, tmp_path, val_fraction=0.3, seed=0)
    tokens = TokenDataset(tmp_path, "val").tokens().tolist()
    model = tiny(tok)
    with torch.no_grad():
        windows = [torch.tensor(tokens[s:s + 17]) for s in range(0, len(tokens) - 1, 16)]
        nll = sum(float(F.cross_entropy(model(w[None, :-1])[0], w[1:], reduction="sum")) for w in windows)
    res = ev.perplexity(model, tok, tmp_path, seq_len=16, batch_size=4)
    assert res["tokens"] == len(tokens) - 1 and res["loss"] == pytest.approx(nll / (len(tokens) - 1), rel=1e-5)


def test_win_rate_of_a_model_against_itself_is_all_ties(tok):
    model = tiny(tok)
    judge = tiny(tok, seed=3, num_labels=1)
    res = ev.win_rate(model, model, judge, tok, ["What is 1 + 2?", "What is 3 + 4?"], max_new_tokens=4, n_boot=50)
    assert (res["wins"], res["ties"], res["losses"]) == (0, 2, 0) and res["win_rate"]["value"] == 0.5
    assert res["records"][0]["response_a"] == res["records"][0]["response_b"]


# ---- benchmark data ----

def test_load_task_reads_each_benchmark_format(tmp_path):
    gsm = tmp_path / "gsm.jsonl.gz"
    with gzip.open(gsm, "wt") as f:
        f.write(json.dumps({"question": "Q1?", "answer": "2 + 2 = <<2+2=4>>4\n#### 1,004"}) + "\n\n")
        f.write(json.dumps({"question": "Q2?", "answer": "#### 7"}) + "\n")
    assert ev.load_task("gsm8k", str(gsm)) == [{"prompt": "Q1?", "answer": "1004", "id": 0},
                                                {"prompt": "Q2?", "answer": "7", "id": 1}]
    svamp = tmp_path / "svamp.jsonl"
    svamp.write_text(json.dumps({"Body": "Tom has 3 apples. ", "Question": "How many?", "Answer": 145.0}) + "\n")
    assert ev.load_task("svamp", str(svamp)) == [{"prompt": "Tom has 3 apples. How many?", "answer": "145", "id": 0}]
    math500 = tmp_path / "m.jsonl"
    math500.write_text(json.dumps({"problem": "x?", "answer": "\\frac{1}{2}", "level": 2}) + "\n")
    assert ev.load_task("math500", str(math500))[0]["answer"] == "\\frac{1}{2}"
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"p{i}", "answer": i}) + "\n" for i in range(5)))
    assert [r["answer"] for r in ev.load_task("jsonl", str(rows), limit=3)] == ["0", "1", "2"]
    tiny_world = ev.load_task("tinyworld", limit=4)
    assert len(tiny_world) == 4 and all(r["answer"].isdigit() for r in tiny_world)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Q?", "answer": "4"}) + "\n" + json.dumps({"question": "Q?"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'answer' has no '#### N'"):
        ev.load_task("gsm8k", str(bad))
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'prompt' missing"):
        ev.load_task("jsonl", str(bad))
    with pytest.raises(ValueError, match="task=svamp needs data=PATH"):
        ev.load_task("svamp")


@pytest.mark.parametrize("task,name", [("gsm8k", "gsm8k/test.jsonl.gz"), ("svamp", "svamp/test.jsonl"),
                                       ("math500", "math500/test.jsonl.gz")])
def test_load_task_reads_the_real_benchmark_files(task, name):
    path = Path("/work/shared/data") / name
    if not path.exists():
        pytest.skip(f"{path} is not on this machine")
    rows = ev.load_task(task, str(path), limit=20)
    assert len(rows) == 20 and all(r["prompt"] and r["answer"] for r in rows)


# ---- the CLI ----

@pytest.fixture(scope="module")
def checkpoints(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    save_model_dir(root / "policy" / "model", tiny(tok, seed=0), tok)
    save_model_dir(root / "rm", tiny(tok, seed=2, num_labels=1), tok)
    task = root / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"What is {a} + 2?", "answer": a + 2}) + "\n" for a in range(4)))
    (root / "heldout.txt").write_text("\n\n".join(TEXTS[:6]))
    prefs = root / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"What is {a} + 2?", "chosen": f"The answer is {a + 2}.",
                                         "rejected": "No."}) + "\n" for a in range(4)))
    return root


def test_eval_cli_end_to_end(checkpoints, capsys):
    c = checkpoints
    model = c / "policy" / "model"
    rc = main(["eval", f"model={model}", "task=jsonl", f"data={c / 'task.jsonl'}", f"reference={model}",
               f"reward_model={c / 'rm'}", f"prefs={c / 'prefs.jsonl'}", f"compare={model}", "limit=3",
               "max_new_tokens=5", "n_boot=50", f"perplexity={c / 'heldout.txt'}", "seq_len=16"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "win rate vs compare" in out and "95% CI" in out
    summary = json.loads((c / "policy" / "eval" / "eval.json").read_text())  # default out_dir: beside model/
    assert summary["problems"] == 3 and summary["accuracy"]["n"] == 3 and len(summary["accuracy"]["ci"]) == 2
    assert summary["kl"] == 0 and summary["length_ratio"] == 1  # the reference is the model itself
    assert (summary["wins"], summary["ties"], summary["losses"]) == (0, 3, 0)
    assert summary["preference_accuracy"]["n"] == 3 and "reward" in summary and summary["perplexity"] > 1
    assert summary["reference_accuracy"] == summary["accuracy"] and len(summary["samples"]) == 3
    assert summary["accuracy_gain"] == {"value": 0.0, "ci": [0.0, 0.0], "n": 3}  # paired: itself vs itself
    kinds = [json.loads(line)["kind"] for line in (c / "policy" / "eval" / "records.jsonl").read_text().splitlines()]
    assert kinds.count("task") == 3 and kinds.count("preference") == 3 and kinds.count("win_rate") == 3


def test_eval_cli_errors_are_one_line(checkpoints, tmp_path, capsys):
    c = checkpoints
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "answer": 1}\n{"prompt": "y"}\n')
    assert main(["eval", f"model={c / 'policy' / 'model'}", "task=jsonl", f"data={bad}"]) == 2
    assert "bad.jsonl:2: field 'answer' missing" in capsys.readouterr().err
    assert main(["eval", f"model={c / 'policy' / 'model'}", "task=jsonl", f"data={c / 'task.jsonl'}",
                 f"reward_model={c / 'policy' / 'model'}"]) == 2
    assert "has no score head" in capsys.readouterr().err
    assert main(["eval", f"model={c / 'policy' / 'model'}", "task=gsm8k"]) == 2
    assert "task=gsm8k needs data=PATH" in capsys.readouterr().err


def test_accuracy_gain_is_paired_over_problems():
    """model - reference per problem: a model right on exactly the problems its reference got right plus two
    more gains +2/n, and the paired interval is tighter than either accuracy's own."""
    ref = [1.0] * 10 + [0.0] * 10
    new = [1.0] * 12 + [0.0] * 8
    gain = ev.rate([a - b for a, b in zip(new, ref)], n_boot=500)
    assert gain["value"] == pytest.approx(0.1) and gain["ci"][0] >= 0.0
    acc = ev.rate(new, n_boot=500)
    assert gain["ci"][1] - gain["ci"][0] < acc["ci"][1] - acc["ci"][0]


def test_token_perplexity_reads_windows_of_the_context():
    """Within the context: exp of one forward's mean loss. Longer: consecutive windows, every token after a
    window's first predicted, the mean weighted by tokens (import and quantize report this number)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8)).eval()
    ids = torch.randint(0, 32, (20,)).tolist()
    with torch.no_grad():
        one = math.exp(float(model(torch.tensor([ids[:8]])[:, :-1], labels=torch.tensor([ids[1:8]]))))
        assert ev.token_perplexity(model, ids[:8]) == pytest.approx(one, rel=1e-6)
        losses = [(float(model(torch.tensor([w[:-1]]), labels=torch.tensor([w[1:]]))), len(w) - 1)
                  for w in (ids[0:8], ids[8:16], ids[16:20])]
    expected = math.exp(sum(loss * n for loss, n in losses) / sum(n for _, n in losses))
    assert ev.token_perplexity(model, ids) == pytest.approx(expected, rel=1e-6)
