"""The sampling engine against plain full forwards, and the sampling filters' kept sets."""

import pytest
import torch

from lmforge.generation import SamplingParams, apply_min_p, apply_top_k, apply_top_p, generate
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()


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


def test_greedy_equals_full_forward_argmax_and_batching_changes_nothing(model):
    params = SamplingParams(max_new_tokens=10, temperature=0)
    batched = generate(model, PROMPTS, params, eos_token_ids=[])
    for prompt, (completion,) in zip(PROMPTS, batched):
        tokens, logps = reference_greedy(model, prompt, 10)
        assert completion.token_ids == tokens
        assert completion.logprobs == pytest.approx(logps, abs=1e-4)
        (alone,) = generate(model, [prompt], params, eos_token_ids=[])[0]
        assert alone.token_ids == tokens


def test_stop_tokens_end_a_sequence_and_finished_rows_leave(model):
    tokens, _ = reference_greedy(model, PROMPTS[1], 10)
    stop = tokens[3]
    params = SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=[stop])
    out = generate(model, PROMPTS, params, eos_token_ids=[])
    assert out[1][0].token_ids == tokens[:tokens.index(stop) + 1] and out[1][0].finish_reason == "stop"
    assert out[0][0].finish_reason in ("stop", "length")


def test_n_samples_share_prefill_and_are_reproducible(model):
    params = SamplingParams(max_new_tokens=8, temperature=1.0, n=4, seed=123)
    a = generate(model, PROMPTS, params, eos_token_ids=[])
    b = generate(model, PROMPTS, params, eos_token_ids=[])
    assert [[c.token_ids for c in row] for row in a] == [[c.token_ids for c in row] for row in b]
    assert all(len(row) == 4 for row in a)
    assert len({tuple(c.token_ids) for c in a[0]}) > 1  # the samples differ from each other
    calls = []
    hook = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    generate(model, PROMPTS, SamplingParams(max_new_tokens=3, temperature=1.0, n=4, seed=0), eos_token_ids=[])
    hook.remove()
    assert calls[0] == (3, 7)  # one prefill of the 3 distinct prompts, not 12 rows
    assert calls[1][0] == 12


def test_top_k_top_p_min_p_keep_exactly_the_right_sets():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]]))
    assert torch.isfinite(apply_top_k(logits, 2)).tolist() == [[True, True, False, False, False]]
    assert torch.isfinite(apply_top_p(logits, 0.7)).tolist() == [[True, True, False, False, False]]
    assert torch.isfinite(apply_top_p(logits, 0.75)).tolist() == [[True, True, False, False, False]]
    assert torch.isfinite(apply_top_p(logits, 0.76)).tolist() == [[True, True, True, False, False]]
    assert torch.isfinite(apply_top_p(logits, 0.1)).tolist() == [[True, False, False, False, False]]
    assert torch.isfinite(apply_min_p(logits, 0.2)).tolist() == [[True, True, True, False, False]]


def test_sampling_never_leaves_the_kept_set(model):
    params = SamplingParams(max_new_tokens=1, temperature=1.0, top_k=3, n=64, seed=0)
    with torch.no_grad():
        allowed = set(model(torch.tensor([PROMPTS[0]]))[0, -1].topk(3).indices.tolist())
    out = generate(model, [PROMPTS[0]], params, eos_token_ids=[])[0]
    assert {c.token_ids[0] for c in out} <= allowed


def test_stop_strings_cut_the_text(model):
    tok = train_tokenizer(["abc def ghi " * 10], vocab_size=300)
    m = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).eval()
    (first,) = generate(m, [tok.encode("abc", add_bos=True)], SamplingParams(max_new_tokens=12, temperature=0),
                        tokenizer=tok, eos_token_ids=[])[0]
    text = first.text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    (cut,) = generate(m, [tok.encode("abc", add_bos=True)],
                      SamplingParams(max_new_tokens=12, temperature=0, stop_strings=[stop]),
                      tokenizer=tok, eos_token_ids=[])[0]
    assert cut.finish_reason == "stop" and cut.text == text[:text.find(stop)]
