"""The sampling engine against plain full forwards, batching invariance, and the sampling filters' kept sets."""

import json

import pytest
import torch

from lmforge.cli import main
from lmforge.generation import (
    SamplingParams,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    filter_logits,
    generate,
    sample_tokens,
)
from lmforge.model import ModelConfig, Transformer
from lmforge.modelio import save_model_dir
from lmforge.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


PROMPTS = [[5, 9, 13], [7, 2, 30, 41, 8, 11, 3], [60]]


def reference_greedy(model, prompt, steps):
    """Argmax of a full forward over the whole sequence at every step (no cache)."""
    ids, logps = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids]))[0, -1]
            ids.append(int(logits.argmax()))
            logps.append(float(logits.log_softmax(-1)[ids[-1]]))
    return ids[len(prompt):], logps


def full_forward_logprobs(model, prompt, completion):
    with torch.no_grad():
        logp = model(torch.tensor([prompt + completion]))[0].log_softmax(-1)
    return [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(completion)]


def test_greedy_equals_full_forward_argmax_and_batching_changes_nothing(model):
    params = SamplingParams(max_new_tokens=10, temperature=0, return_logprobs=True)
    batched = generate(model, PROMPTS, params, eos_token_ids=[])
    for prompt, (completion,) in zip(PROMPTS, batched):
        tokens, logps = reference_greedy(model, prompt, 10)
        assert completion.token_ids == tokens and completion.finish_reason == "length"
        assert completion.logprobs == pytest.approx(logps, abs=1e-4)
        (alone,) = generate(model, [prompt], params, eos_token_ids=[])[0]
        assert alone.token_ids == tokens


def test_seeded_sampling_is_batch_invariant_and_logprobs_are_the_raw_models(model):
    params = SamplingParams(max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.9, n=2, seed=7,
                            return_logprobs=True)
    batched = generate(model, PROMPTS, params, eos_token_ids=[])
    for i, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], params, eos_token_ids=[])[0]
        assert [c.token_ids for c in alone] == [c.token_ids for c in batched[i]]
        for c in batched[i]:  # pi(a|s) at temperature 1, whatever the sampling settings
            assert c.logprobs == pytest.approx(full_forward_logprobs(model, prompt, c.token_ids), abs=1e-4)
    reordered = generate(model, PROMPTS[::-1], params, eos_token_ids=[])
    assert [[c.token_ids for c in row] for row in reordered[::-1]] == [[c.token_ids for c in row] for row in batched]


def test_repeated_prompts_get_different_samples(model):
    out = generate(model, [PROMPTS[0], PROMPTS[0]], SamplingParams(max_new_tokens=8, seed=1), eos_token_ids=[])
    assert out[0][0].token_ids != out[1][0].token_ids


def test_stop_tokens_end_a_sequence_and_finished_rows_leave_the_batch(model):
    tokens, _ = reference_greedy(model, PROMPTS[1], 10)
    stop = tokens[3]
    params = SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=[stop])
    rows = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    out = generate(model, PROMPTS, params, eos_token_ids=[])
    hook.remove()
    assert out[1][0].token_ids == tokens[:tokens.index(stop) + 1] and out[1][0].finish_reason == "stop"
    for prompt, (c,) in zip(PROMPTS, out):
        expected, _ = reference_greedy(model, prompt, len(c.token_ids))
        assert c.token_ids == expected  # the others keep going, unaffected by the row that left
    lengths = [len(row[0].token_ids) for row in out]
    # decode call k computes token k for the rows still running: the batch shrinks as rows stop
    assert rows[1:] == [sum(n > k for n in lengths) for k in range(1, max(lengths))] and min(rows) < 3


def test_n_samples_share_prefill_and_are_reproducible(model):
    params = SamplingParams(max_new_tokens=8, temperature=1.0, n=4, seed=123)
    a = generate(model, PROMPTS, params, eos_token_ids=[])
    b = generate(model, PROMPTS, params, eos_token_ids=[])
    assert [[c.token_ids for c in row] for row in a] == [[c.token_ids for c in row] for row in b]
    assert all(len(row) == 4 for row in a)
    assert len({tuple(c.token_ids) for c in a[0]}) > 1  # the samples differ from each other
    c = generate(model, PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.0, n=4, seed=124), eos_token_ids=[])
    assert [[x.token_ids for x in row] for row in a] != [[x.token_ids for x in row] for row in c]
    calls = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: calls.append(i[0].numel()))
    generate(model, PROMPTS, SamplingParams(max_new_tokens=3, temperature=1.0, n=4, seed=0), eos_token_ids=[])
    hook.remove()
    assert calls == [3 * 7, 12, 12]  # one prefill of the 3 distinct prompts (7 wide), then 12 rows decode


CRAFTED = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]]))


def test_top_k_top_p_min_p_keep_exactly_the_right_sets():
    kept = lambda logits: torch.isfinite(logits).tolist()
    assert kept(apply_top_k(CRAFTED, 2)) == [[True, True, False, False, False]]
    assert kept(apply_top_p(CRAFTED, 0.7)) == [[True, True, False, False, False]]
    assert kept(apply_top_p(CRAFTED, 0.75)) == [[True, True, False, False, False]]
    assert kept(apply_top_p(CRAFTED, 0.76)) == [[True, True, True, False, False]]
    assert kept(apply_top_p(CRAFTED, 0.1)) == [[True, False, False, False, False]]  # never empty
    assert kept(apply_min_p(CRAFTED, 0.2)) == [[True, True, True, False, False]]
    shuffled = CRAFTED[:, [3, 0, 4, 2, 1]]  # order in the vocabulary does not matter
    assert kept(apply_top_p(shuffled, 0.76)) == [[False, True, False, True, True]]
    assert kept(apply_top_k(shuffled, 3)) == [[False, True, False, True, True]]


@pytest.mark.parametrize("settings", [
    dict(top_k=2), dict(top_p=0.76), dict(top_p=0.3), dict(min_p=0.2), dict(top_k=4, top_p=0.8),
    dict(top_p=0.9, min_p=0.4), dict(top_k=3, min_p=0.5), dict(temperature=0.5, top_p=0.8), dict(),
])
def test_sampling_draws_from_exactly_the_filtered_distribution(settings):
    params = SamplingParams(**settings)
    rows = 20000
    logits = CRAFTED[:, [3, 0, 4, 2, 1]].expand(rows, 5)
    gen = torch.Generator().manual_seed(0)
    tokens = sample_tokens(logits.clone(), params, lambda r: torch.rand(rows if r is None else len(r), generator=gen))
    target = filter_logits(logits[:1], params).softmax(-1)[0]
    freq = torch.bincount(tokens, minlength=5).float() / rows
    assert (freq[target == 0] == 0).all()  # never a token outside the kept set
    assert torch.allclose(freq, target, atol=0.015)  # and the kept ones in the right proportions


def test_inverse_cdf_never_draws_a_zero_weight_even_at_the_ends():
    weights = torch.tensor([[0.0, 0.2, 0.0, 0.8, 0.0, 0.0]] * 3)
    draws = {0.0: 1, 0.1: 1, 0.5: 3, 1.0: 3}  # u = 1 can come out of float rounding: the last weighted token, not past it
    for u, expected in draws.items():
        assert sample_tokens(weights.log(), SamplingParams(), lambda rows, u=u: torch.full((3,), u)).tolist() == [
            expected] * 3


def test_repetition_penalty_and_greedy():
    logits = torch.tensor([[2.0, -1.0, 1.5]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -2.0, 1.5]]
    params = SamplingParams(temperature=0)
    assert sample_tokens(apply_repetition_penalty(logits, seen, 2.0), params, None).tolist() == [2]


def test_repetition_penalty_changes_greedy_output(model):
    plain = generate(model, PROMPTS, SamplingParams(max_new_tokens=12, temperature=0), eos_token_ids=[])
    penalised = generate(model, PROMPTS, SamplingParams(max_new_tokens=12, temperature=0, repetition_penalty=5.0),
                         eos_token_ids=[])
    for prompt, (c,) in zip(PROMPTS, penalised):
        assert len(set(c.token_ids)) >= len(set(plain[PROMPTS.index(prompt)][0].token_ids))
    assert [row[0].token_ids for row in plain] != [row[0].token_ids for row in penalised]


@pytest.fixture(scope="module")
def tok_model():
    tok = train_tokenizer(["abc def ghi, jkl. " * 10, "mno pqr\nstu vwx"], vocab_size=300)
    torch.manual_seed(1)
    m = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).eval()
    return tok, m


def test_stop_strings_cut_text_and_tokens_consistently(tok_model):
    tok, m = tok_model
    prompt = tok.encode("abc", add_bos=True)
    (first,) = generate(m, [prompt], SamplingParams(max_new_tokens=16, temperature=0), tokenizer=tok,
                        eos_token_ids=[])[0]
    text = first.text
    assert len(text) >= 6, text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    (cut,) = generate(m, [prompt], SamplingParams(max_new_tokens=16, temperature=0, stop_strings=["zzz", stop],
                                                  return_logprobs=True), tokenizer=tok, eos_token_ids=[])[0]
    assert cut.finish_reason == "stop" and cut.text == text[:text.find(stop)]
    # the tokens run through the one that completed the stop string, no further
    full = tok.decode(cut.token_ids, skip_special_tokens=True)
    assert full.startswith(cut.text + stop) and stop not in tok.decode(cut.token_ids[:-1], skip_special_tokens=True)
    assert cut.token_ids == first.token_ids[:len(cut.token_ids)] and len(cut.logprobs) == len(cut.token_ids)


def test_tokenizer_eos_stops_by_default_and_text_skips_it(tok_model):
    tok, m = tok_model
    prompt = tok.encode("abc", add_bos=True)
    (first,) = generate(m, [prompt], SamplingParams(max_new_tokens=6, temperature=0), tokenizer=tok,
                        eos_token_ids=[])[0]
    stop = first.token_ids[2]
    (c,) = generate(m, [prompt], SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=[stop]),
                    tokenizer=tok)[0]
    assert c.token_ids[-1] == stop and c.finish_reason == "stop"
    assert c.text == tok.decode(c.token_ids[:-1], skip_special_tokens=True)


def test_generate_leaves_the_weights_as_it_found_them(model):
    before = {name: (p.data_ptr(), p.stride(), p.clone()) for name, p in model.named_parameters()}
    generate(model, PROMPTS, SamplingParams(max_new_tokens=3), eos_token_ids=[])
    for name, p in model.named_parameters():
        assert (p.data_ptr(), p.stride()) == before[name][:2] and torch.equal(p, before[name][2]), name
    model(torch.tensor(PROMPTS[:1]), labels=torch.tensor(PROMPTS[:1])).backward()  # still trainable
    model.zero_grad(set_to_none=True)


def test_bad_arguments_fail_clearly(model):
    with pytest.raises(ValueError, match="top_p"):
        generate(model, PROMPTS, SamplingParams(top_p=0))
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], SamplingParams())
    with pytest.raises(ValueError, match="vocab_size"):
        generate(model, [[64]], SamplingParams())
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, PROMPTS, SamplingParams(stop_strings=["x"]))


def test_generate_cli_jsonl_in_jsonl_out(tok_model, tmp_path, capsys):
    tok, m = tok_model
    save_model_dir(tmp_path / "model", m, tok)
    rows = [{"prompt": "abc", "id": 1}, {"messages": [{"role": "user", "content": "def"}], "id": 2}]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    args = [f"model={tmp_path / 'model'}", f"input={tmp_path / 'in.jsonl'}", f"output={tmp_path / 'out.jsonl'}",
            "max_new_tokens=5", "n=2", "batch_size=1", "logprobs=true", "temperature=0.7", "device=cpu"]
    assert main(["generate", *args]) == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in out] == [1, 2] and all(len(r["completions"]) == 2 for r in out)
    c = out[0]["completions"][0]
    assert set(c) == {"text", "tokens", "finish_reason", "token_ids", "logprobs"} and c["tokens"] <= 5
    assert len(c["logprobs"]) == c["tokens"] and c["text"] == tok.decode(
        c["token_ids"][:-1] if c["finish_reason"] == "stop" else c["token_ids"], skip_special_tokens=True)

    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"messages": [{"role": "user"}]}\n')
    assert main(["generate", *args[:1], f"input={tmp_path / 'bad.jsonl'}", *args[2:]]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2: field 'messages'[0]: 'content' must be a string" in err
    (tmp_path / "bad.jsonl").write_text('{"text": "wrong field"}\n')
    assert main(["generate", *args[:1], f"input={tmp_path / 'bad.jsonl'}", *args[2:]]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_sample_cli_streams_one_and_prints_n(tok_model, tmp_path, capsys):
    tok, m = tok_model
    save_model_dir(tmp_path / "model", m, tok)
    base = ["sample", f"model={tmp_path / 'model'}", "prompt=abc", "max_new_tokens=6", "device=cpu"]
    assert main([*base, "temperature=0"]) == 0
    streamed = capsys.readouterr().out
    (greedy,) = generate(m, [tok.encode("abc", add_bos=True)], SamplingParams(max_new_tokens=6, temperature=0),
                         tokenizer=tok)[0]
    assert streamed == "abc" + greedy.text + "\n"
    assert main([*base, "n=3", "seed=5"]) == 0
    assert capsys.readouterr().out.count("--- sample") == 3
