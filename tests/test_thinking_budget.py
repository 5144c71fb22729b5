"""Budget forcing (s1): the per-row state machine, pinned token by token, and the engine that consults it."""


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lmforge.generation
import lmforge.scheduler
from lmforge.generation import SamplingParams, generate
from lmforge.model import ModelConfig, Transformer
from lmforge.thinking import ThinkState, ThinkTags, count_thinking, new_state, opened_in_prompt

OPEN, CLOSE, W1, W2 = 100, 101, 102, 103  # "<think>", "</think>", and "Wait" as two tokens
TAGS = ThinkTags(open=(OPEN,), close=(CLOSE,), wait=(W1, W2))


def run(state: ThinkState, sampled: list[int]) -> list[int]:
    return [state.step(t) for t in sampled]


def test_no_budget_passes_every_token_and_counts_thinking():
    state = ThinkState(TAGS)
    assert run(state, [5, OPEN, 1, 2, 3, CLOSE, 7, 8]) == [5, OPEN, 1, 2, 3, CLOSE, 7, 8]
    assert (state.phase, state.thinking_tokens, state.forced_close, state.waits) == ("answer", 3, False, 0)


def test_budget_forces_the_close_after_exactly_budget_thinking_tokens():
    state = ThinkState(TAGS, max_tokens=2)
    out = run(state, [OPEN, 1, 2, 3, 4, 9])  # the model wants to go on thinking: 3 and 4 are overridden
    assert out == [OPEN, 1, 2, CLOSE, 4, 9]
    assert (state.phase, state.thinking_tokens, state.forced_close) == ("answer", 2, True)


def test_budget_zero_closes_at_once_even_when_the_prompt_opened_the_block():
    state = new_state(TAGS, prompt_ids=[7, OPEN], max_tokens=0)
    assert state.phase == "thinking"
    assert run(state, [1, 2, 3]) == [CLOSE, 2, 3]
    assert state.thinking_tokens == 0 and state.forced_close


def test_close_below_the_minimum_becomes_wait_and_thinking_goes_on():
    state = ThinkState(TAGS, max_tokens=10, min_tokens=4)
    out = run(state, [OPEN, 1, CLOSE, 0, 5, 6, CLOSE, 8])
    # the first close (1 thinking token) becomes "Wait" (2 tokens; the sampled 0 is overridden by the queued W2)
    assert out == [OPEN, 1, W1, W2, 5, 6, CLOSE, 8]
    assert (state.thinking_tokens, state.waits, state.phase) == (5, 1, "answer")


def test_a_wait_that_would_pass_the_budget_gives_way_to_the_close():
    state = ThinkState(TAGS, max_tokens=2, min_tokens=2)
    out = run(state, [OPEN, 1, CLOSE, 0, 0])
    assert out == [OPEN, 1, W1, CLOSE, 0]  # W1 is thinking token 2 = the budget: W2 is dropped, the close forced
    assert state.thinking_tokens == 2 and state.forced_close


def test_multi_token_close_is_not_counted_as_thinking_and_a_begun_close_is_completed():
    tags = ThinkTags(open=(OPEN,), close=(50, 51), wait=(W1,))
    state = ThinkState(tags)
    run(state, [OPEN, 1, 2, 50, 51, 9])
    assert (state.thinking_tokens, state.phase) == (2, "answer")
    state = ThinkState(tags, max_tokens=3)
    assert run(state, [OPEN, 1, 2, 50, 7, 9]) == [OPEN, 1, 2, 50, 51, 9]  # budget hit inside "50 51": completed
    assert state.phase == "answer" and state.thinking_tokens <= 3


def test_count_thinking_and_prompt_detection():
    assert count_thinking([OPEN, 1, 2, CLOSE, 3], TAGS) == 2
    assert count_thinking([1, 2, CLOSE, 3], TAGS, started_inside=True) == 2
    assert count_thinking([1, 2, 3], TAGS) == 0  # never opened: all answer
    assert count_thinking([OPEN, 1, 2], TAGS) == 2  # never closed: thinking to the end
    assert opened_in_prompt([1, OPEN], TAGS) and not opened_in_prompt([OPEN, 2, CLOSE], TAGS)


def test_min_above_budget_is_refused():
    with pytest.raises(ValueError, match="above the budget"):
        ThinkState(TAGS, max_tokens=3, min_tokens=4)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 103), max_size=60), st.integers(0, 12), st.integers(0, 12), st.booleans())
def test_no_row_ever_thinks_past_its_budget(sampled, budget, minimum, inside):
    """Whatever the model samples, the emitted stream holds at most `budget` tokens inside the think block."""
    minimum = min(minimum, budget)
    state = ThinkState(TAGS, budget, minimum, phase="thinking" if inside else "before")
    out = run(state, sampled)
    assert state.thinking_tokens <= budget
    assert count_thinking(out, TAGS, started_inside=inside) == state.thinking_tokens
    if state.phase == "answer" and not state.forced_close:
        assert state.thinking_tokens >= minimum


# ---- in the engine ----

def tiny_model(vocab=110):
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)).eval()


class IdTokenizer:
    """Token ids as text "<id>" pieces; the tags are ids 100/101, "Wait" is 102 103."""
    pad_id, eos_id = 0, 1

    def encode(self, text, add_bos=False):
        return {"<think>": [OPEN], "</think>": [CLOSE], "Wait": [W1, W2]}.get(text) or [int(t) for t in text.split()]

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


@pytest.mark.parametrize("budget", [0, 3, 7])
def test_engine_keeps_every_sampled_completion_within_its_budget(budget):
    model = tiny_model()
    prompts = [[5, 6, OPEN], [7, OPEN], [9, 9, 9]]  # two prompts open the block, one leaves it to the model
    params = SamplingParams(max_new_tokens=24, temperature=1.0, n=4, seed=1, thinking_budget=budget)
    results = generate(model, prompts, params, tokenizer=IdTokenizer(), eos_token_ids=[])
    for prompt, row in zip(prompts, results):
        for c in row:
            inside = opened_in_prompt(prompt, TAGS)
            assert c.thinking_tokens == count_thinking(c.token_ids, TAGS, started_inside=inside) <= budget
            if inside:  # closed by the model or forced at the budget, never later
                assert CLOSE in c.token_ids[:budget + 1]


def test_engine_without_a_budget_is_unchanged_and_still_reports_thinking():
    model = tiny_model()
    prompts = [[5, 6, OPEN], [7, 8]]
    plain = generate(model, prompts, SamplingParams(max_new_tokens=12, temperature=0.0), eos_token_ids=[])
    tracked = generate(model, prompts, SamplingParams(max_new_tokens=12, temperature=0.0, thinking_budget=None),
                       tokenizer=IdTokenizer(), eos_token_ids=[])
    assert [c.token_ids for r in plain for c in r] == [c.token_ids for r in tracked for c in r]
    assert tracked[0][0].thinking_tokens == count_thinking(tracked[0][0].token_ids, TAGS, started_inside=True)


def always_closing_model():
    """A model whose likeliest next token is CLOSE everywhere, by far (a hook on the head's forward)."""
    model = tiny_model()
    boost = torch.zeros(110)
    boost[CLOSE] = 100.0
    model.lm_head.register_forward_hook(lambda module, args, out: out + boost)
    return model


def generic_decode_only(monkeypatch):
    """Decode through the model's forward: the packed CPU step reads the head's weights, not its forward, so it
    would not see a hook on it."""
    for module in (lmforge.generation, lmforge.scheduler):
        monkeypatch.setattr(module, "packable", lambda model, rows: False)


def test_engine_min_thinking_replaces_an_early_close_with_wait(monkeypatch):
    """A model that always closes at once: with a minimum the engine writes "Wait" instead, until the minimum."""
    generic_decode_only(monkeypatch)
    model = always_closing_model()
    prompts = [[5, OPEN]]
    params = SamplingParams(max_new_tokens=10, temperature=0.0, thinking_budget=8, min_thinking_tokens=4)
    c = generate(model, prompts, params, tokenizer=IdTokenizer(), eos_token_ids=[])[0][0]
    assert c.token_ids[:5] == [W1, W2, W1, W2, CLOSE]
    assert (c.thinking_tokens, c.waits) == (4, 2)


def test_num_waits_replaces_the_first_closes_however_long_the_thinking():
    """s1's "ignore the end of thinking N times": the first num_waits closes become "Wait", the next one stands."""
    state = ThinkState(TAGS, num_waits=2)
    out = run(state, [OPEN, 1, 2, 3, CLOSE, 0, 4, CLOSE, 0, 5, CLOSE, 8])
    assert out == [OPEN, 1, 2, 3, W1, W2, 4, W1, W2, 5, CLOSE, 8]
    assert (state.waits, state.phase, state.thinking_tokens) == (2, "answer", 9)


def test_num_waits_never_passes_the_budget():
    state = ThinkState(TAGS, max_tokens=3, num_waits=5)
    out = run(state, [OPEN, 1, CLOSE, 0, 0, 0])
    assert out == [OPEN, 1, W1, W2, CLOSE, 0]
    assert state.thinking_tokens == 3 and state.forced_close


def test_engine_num_waits_writes_wait_k_times_then_lets_the_model_close(monkeypatch):
    generic_decode_only(monkeypatch)
    model = always_closing_model()
    params = SamplingParams(max_new_tokens=8, temperature=0.0, num_waits=2)
    c = generate(model, [[5, OPEN]], params, tokenizer=IdTokenizer(), eos_token_ids=[])[0][0]
    assert c.token_ids[:5] == [W1, W2, W1, W2, CLOSE]
    assert (c.thinking_tokens, c.waits) == (4, 2)
    with pytest.raises(ValueError, match="num_waits"):
        SamplingParams(num_waits=-1).validate()
