"""The rollout engine: buffer layout, the one log-prob function (ratio exactly 1 at the start), the stream's
epochs and its state, prompt sampling, RL prompt files."""

import json

import pytest
import torch

import lmforge.rollout
from lmforge.data import tinyworld
from lmforge.data.prompts import read_rl_prompts, render_prompt
from lmforge.errors import DataError
from lmforge.model import ModelConfig, Transformer
from lmforge.modelio import load_tokenizer, save_model_dir
from lmforge.rollout import (
    RolloutStream,
    epoch_micro_batches,
    micro_batch,
    pack_rollout,
    policy_logprobs,
    policy_scores,
    prompt_indices,
    score_buffer,
    trim_before_embedding_backward,
)
from lmforge.tokenizer import train_tokenizer

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=128)


def tiny_model(vocab=16, seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab, **{**TINY, **kw}))


def make_model_dir(path, seed=0, num_labels=0):
    """A tiny random chat model directory with a tokenizer trained on arithmetic text (seconds)."""
    texts = [tinyworld.Problem(a, "+", b).worked_answer() for a in range(15) for b in range(15)]
    tok = train_tokenizer(texts * 2, 300)
    model = tiny_model(tok.vocab_size, seed, num_labels=num_labels)
    if num_labels:
        torch.nn.init.normal_(model.score.weight, std=0.5)
    save_model_dir(path, model, tok)
    return path


def write_rl_prompts(path, n=12):
    path.write_text("".join(json.dumps({"prompt": f"What is {a} + 1?", "answer": str(a + 1)}) + "\n"
                            for a in range(n)))
    return path


PROMPTS = [[1, 2, 3], [4, 5], [6]]
COMPLETIONS = [[7, 8], [9, 10, 11, 12], []]


def test_pack_rollout_layout():
    b = pack_rollout(PROMPTS, COMPLETIONS, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 7, 8, 0, 0], [0, 4, 5, 9, 10, 11, 12], [0, 0, 6, 0, 0, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1], [0, 0, 1, 0, 0, 0, 0]]
    assert b["position_ids"][1].tolist() == [0, 0, 1, 2, 3, 4, 5]  # counting real tokens only
    assert b["labels"].tolist() == [[7, 8, -100, -100], [9, 10, 11, 12], [-100] * 4]
    assert b["response_mask"].sum(1).tolist() == [2, 4, 0]


def test_trimmed_micro_batch_gives_the_same_logprobs():
    model = tiny_model().eval()
    b = pack_rollout(PROMPTS, COMPLETIONS, pad_id=0)
    full = policy_logprobs(model, b)
    mb = micro_batch(b, torch.tensor([0]))  # row 0 alone: no left padding, 2 response columns
    assert mb["input_ids"].shape == (1, 5)
    one = policy_logprobs(model, mb)
    torch.testing.assert_close(one[0], full[0, :2], atol=1e-5, rtol=1e-5)
    assert (full[2] == 0).all()  # an empty response has no log-probs
    # and by hand: log softmax of the logit that predicts token 7 (the column of the last prompt token)
    logits = model(torch.tensor([[1, 2, 3, 7]]))
    torch.testing.assert_close(one[0, 0], logits[0, 2].log_softmax(-1)[7], atol=1e-5, rtol=1e-5)


def test_rollout_and_training_logprobs_are_identical_so_the_first_ratio_is_exactly_one():
    """The rollout scores the buffer in the first epoch's micro-batches with the training forward."""
    model = tiny_model(vocab=32)
    prompts = [[1 + i % 5] * (1 + i % 3) for i in range(8)]
    completions = [[2 + (i * 7 + j) % 20 for j in range(1 + i % 4)] for i in range(8)]
    buffer = pack_rollout(prompts, completions, pad_id=0)
    plan = epoch_micro_batches(8, 3, seed=0, iteration=0, epoch=0)
    model.eval()
    buffer["old_logprobs"] = score_buffer(policy_scores(model), buffer, plan, "cpu")["logprobs"]
    model.train()  # the loop trains in train mode; the model has no dropout, so the numbers are the same
    for idx in plan:
        batch = micro_batch(buffer, idx)
        new = policy_logprobs(model, batch)  # with grad, as in the loss
        assert new.requires_grad
        assert torch.equal(new.detach(), batch["old_logprobs"])  # bit-identical: the ratio is exactly 1
        assert torch.equal(torch.exp(new - batch["old_logprobs"])[batch["response_mask"] > 0],
                           torch.ones(int(batch["response_mask"].sum())))


def test_prompt_indices_walk_every_prompt_once_per_epoch_and_are_pure():
    seen = [i for it in range(3) for i in prompt_indices(6, it, 2, seed=1)]
    assert sorted(seen) == list(range(6))
    assert prompt_indices(6, 5, 2, seed=1) == prompt_indices(6, 5, 2, seed=1)
    assert prompt_indices(6, 0, 2, seed=1, rank=1, world_size=2) == seen[2:4]  # ranks take disjoint prompts


def fake_rollout(n_rows=6):
    calls = []

    def make_rollout(iteration, plan):
        calls.append(iteration)
        prompts = [[1]] * n_rows
        buffer = pack_rollout(prompts, [[2 + iteration, 3]] * n_rows, 0)
        buffer["row"] = torch.arange(n_rows).float() + 100 * iteration
        assert len(plan(n_rows)) == -(-n_rows // 4)
        return buffer, {"reward": float(iteration)}
    return make_rollout, calls


def test_stream_trains_epochs_over_each_buffer_then_rolls_out_again(tmp_path):
    make_rollout, calls = fake_rollout()
    stream = RolloutStream(make_rollout, epochs=2, micro_batch_size=3, seed=0)
    batches = [next(stream) for _ in range(6)]  # 2 micro-batches per epoch, 2 epochs per rollout
    assert calls == [0, 1]
    rows = [b["row"].tolist() for b in batches]
    assert sorted(rows[0] + rows[1]) == sorted(rows[2] + rows[3]) == [100 * 0 + i for i in range(6)]
    assert all(r >= 100 for r in rows[4])
    assert batches[0]["stats"]["reward"] == 0 and batches[4]["stats"]["reward"] == 1

    # state + the saved buffer resume mid-epoch on the very same samples, without a new rollout
    state = json.loads(json.dumps(stream.state_dict()))
    stream.save_buffer(tmp_path)
    expected = [next(stream)["row"].tolist() for _ in range(3)]
    make2, calls2 = fake_rollout()
    resumed = RolloutStream(make2, epochs=2, micro_batch_size=3, seed=0, resume_dir=lambda: tmp_path)
    resumed.load_state_dict(state)
    assert [next(resumed)["row"].tolist() for _ in range(3)] == expected and calls2 == [2]


def test_read_rl_prompts_formats_and_errors(tmp_path):
    rows = read_rl_prompts(str(write_rl_prompts(tmp_path / "rl.jsonl", 3)))
    assert rows[1]["prompt"] == "What is 1 + 1?" and rows[1]["answer"] == "2"
    tw = read_rl_prompts("builtin:tinyworld/rl")
    assert isinstance(tw[0]["prompt"], list) and tw[0]["answer"] is not None
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": 1}\n{"question": "b"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'prompt' missing \(fields: question\)"):
        read_rl_prompts(str(bad))
    bad.write_text('{"prompt": 3}\n')
    with pytest.raises(DataError, match="bad.jsonl:1: field 'prompt' must be a string or a list"):
        read_rl_prompts(str(bad))


def test_render_prompt_opens_the_assistant_turn(tmp_path):
    tok = load_tokenizer(make_model_dir(tmp_path / "m"))
    ids = render_prompt(tok, "What is 2 + 2?")
    text = tok.decode(ids)
    assert text.endswith("<|im_start|>assistant\n") and "What is 2 + 2?" in text
    assert render_prompt(tok, [{"role": "user", "content": "What is 2 + 2?"}]) == ids


def test_the_heap_is_trimmed_once_per_backward_just_before_the_embeddings_gradient(monkeypatch):
    """trim_before_embedding_backward (RL on CPU): one trim per backward, when every gradient but the embedding's
    has arrived (the tied weight's is still pending), none for no-grad forwards, and the gradients unchanged."""
    model, plain = tiny_model(vocab=16, tie_word_embeddings=True), tiny_model(vocab=16, tie_word_embeddings=True)
    trims = []
    monkeypatch.setattr(lmforge.rollout, "release_freed_memory", lambda: trims.append(
        (model.model.embed_tokens.weight.grad, model.model.layers[0].self_attn.q_proj.weight.grad is not None)))
    trim_before_embedding_backward(model)
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    with torch.no_grad():
        model(ids)
    assert trims == []
    model(ids).logsumexp(-1).sum().backward()
    plain(ids).logsumexp(-1).sum().backward()
    assert len(trims) == 1 and trims[0] == (None, True)
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
