"""packed_attention=flex (FlexAttention, a block mask from the document ids) against the dense document mask:
the same tiles, logits, losses and gradients, in training forwards and in the RL stages' packed log-prob forward,
and no silent fallback to the dense mask."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask

import lmforge.model as model_module
from lmforge.model import (
    ModelConfig,
    Transformer,
    document_block_mask,
    packed_backend,
    set_packed_attention,
)
from lmforge.rollout import micro_batch, pack_rollout, policy_logprobs
from lmforge.train.loop import TrainConfig

GQA = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)


def documents(lengths: list[int], pad: int = 0) -> torch.Tensor:
    """(1, sum + pad) ids: document d for lengths[d] tokens, then ``pad`` tokens of -1 (rollout padding)."""
    return torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)] + [torch.full((pad,), -1)])[None].long()


def tiles(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, n, n) bool: which key tiles a BlockMask's (num, indices) tables list for each query tile."""
    n = idx.shape[-1]
    listed = torch.arange(n)[None, None, None, :] < num[..., None]
    out = torch.zeros(*idx.shape[:-1], n + 1, dtype=torch.bool)
    out.scatter_(-1, torch.where(listed, idx.long(), n), True)
    return out[:, 0, :, :n]


def dense_reference_tiles(docs: torch.Tensor, block: int):
    def same_document(b, h, q, k):
        return (k <= q) & (docs[b, q] == docs[b, k])

    ref = create_block_mask(same_document, docs.shape[0], None, docs.shape[1], docs.shape[1], device="cpu",
                            BLOCK_SIZE=block)
    return tiles(ref.kv_num_blocks, ref.kv_indices), tiles(ref.full_kv_num_blocks, ref.full_kv_indices)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 90), min_size=1, max_size=12), st.integers(0, 20))
def test_block_mask_lists_the_tiles_create_block_mask_finds(lengths, pad):
    docs = documents(lengths, pad)
    mask = document_block_mask(docs, block=32)
    partial, full = dense_reference_tiles(docs, 32)
    assert torch.equal(tiles(mask.kv_num_blocks, mask.kv_indices), partial)
    assert torch.equal(tiles(mask.full_kv_num_blocks, mask.full_kv_indices), full)
    assert torch.equal(mask.to_dense(), create_block_mask(
        lambda b, h, q, k: (k <= q) & (docs[b, q] == docs[b, k]), 1, None, docs.shape[1], docs.shape[1],
        device="cpu", BLOCK_SIZE=32).to_dense())


def loss_logits_grads(model, ids, docs, mode: str):
    model.packed_attention = mode
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids, document_ids=docs)
    loss.backward()
    logits = model(ids, document_ids=docs).detach()  # with gradients: the operator compiled_flex tests without
    return loss.detach(), logits, {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_flex_equals_dense(model, ids, docs):
    dense_loss, dense_logits, dense_grads = loss_logits_grads(model, ids, docs, "sdpa")
    flex_loss, flex_logits, flex_grads = loss_logits_grads(model, ids, docs, "flex")
    assert abs(float(flex_loss - dense_loss)) < 1e-5
    assert (flex_logits - dense_logits).abs().max() < 1e-5
    for name, g in dense_grads.items():
        assert (flex_grads[name] - g).abs().max() < 1e-5, name


def count_flex_calls(monkeypatch) -> list:
    """Make the dense mask an error and count flex_attend calls: a flex forward that falls back fails."""
    calls = []
    real = model_module.flex_attend

    def counted(*args):
        calls.append(args[3])
        return real(*args)

    def no_dense_mask(*args):
        raise AssertionError("packed_attention=flex built the dense mask")

    monkeypatch.setattr(model_module, "flex_attend", counted)
    monkeypatch.setattr(model_module, "build_attention_mask", no_dense_mask)
    return calls


@pytest.mark.parametrize("checkpointing", [False, True])
def test_flex_gives_the_dense_masks_logits_loss_and_gradients(checkpointing):
    torch.manual_seed(0)
    model = Transformer(GQA).train()
    model.gradient_checkpointing = checkpointing
    docs = torch.cat([documents([40, 3, 61, 17, 9]), documents([100, 20], pad=10)])  # uneven, -1 padding tail
    ids = torch.randint(0, 97, docs.shape)
    assert_flex_equals_dense(model, ids, docs)


@settings(max_examples=12, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=8))
def test_flex_equals_dense_for_any_document_lengths(lengths):
    torch.manual_seed(len(lengths))
    model = Transformer(GQA).train()
    docs = documents(lengths)
    assert_flex_equals_dense(model, torch.randint(0, 97, docs.shape), docs)


def test_flex_runs_flex_attention_in_every_layer_and_never_the_dense_mask(monkeypatch):
    calls = count_flex_calls(monkeypatch)
    model = Transformer(GQA)
    model.packed_attention = "flex"
    docs = documents([5, 9, 2])
    model(torch.randint(0, 97, docs.shape), labels=torch.randint(0, 97, docs.shape), document_ids=docs).backward()
    assert len(calls) == GQA.num_hidden_layers
    assert all(isinstance(m, model_module.BlockMask) for m in calls)


def test_packed_rl_logprobs_and_their_gradients_agree(monkeypatch):
    torch.manual_seed(0)
    model = Transformer(GQA)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 97, (int(n),), generator=g).tolist() for n in torch.randint(3, 12, (6,), generator=g)]
    completions = [torch.randint(2, 97, (int(n),), generator=g).tolist() for n in torch.randint(1, 30, (6,), generator=g)]
    batch = micro_batch(pack_rollout(prompts, completions, pad_id=1), torch.arange(6), packed=True)
    assert "document_ids" in batch and batch["input_ids"].shape[0] < 6  # sequences share rows
    out = {}
    for mode in ("sdpa", "flex"):
        model.packed_attention = mode
        model.zero_grad(set_to_none=True)
        logp = policy_logprobs(model, batch)
        (logp * batch["response_mask"]).sum().backward()
        out[mode] = logp.detach(), [p.grad.clone() for p in model.parameters()]
    assert (out["flex"][0] - out["sdpa"][0]).abs().max() < 1e-5
    assert max(float((a - b).abs().max()) for a, b in zip(out["flex"][1], out["sdpa"][1])) < 1e-5
    calls = count_flex_calls(monkeypatch)
    with torch.no_grad():
        model.packed_attention = "flex"
        policy_logprobs(model, batch)
    assert len(calls) == GQA.num_hidden_layers


@pytest.mark.slow
def test_compiled_flex_forward_without_gradients_uses_the_tiles_and_matches_dense():
    """No-grad forwards (reference log-probs) run compiled flex_attention, which reads the block tables (skipped
    tiles are never computed, full tiles skip mask_mod): wrong tables would change the logits."""
    torch.manual_seed(0)
    model = Transformer(GQA).eval()
    docs = torch.cat([documents([260, 3, 40, 97]), documents([150, 200], pad=50)])  # 400 tokens: 4 tiles of 128
    ids = torch.randint(0, 97, docs.shape)
    with torch.no_grad():
        model.packed_attention = "sdpa"
        dense = model(ids, document_ids=docs)
        model.packed_attention = "flex"
        flex = model(ids, document_ids=docs)
    mask = document_block_mask(docs)
    assert mask.full_kv_num_blocks[0].sum() > 0 and mask.kv_num_blocks[0, 0, -1] < 4  # some full, some skipped
    assert (flex - dense).abs().max() < 1e-5


def test_auto_is_flex_on_cuda_and_sdpa_on_cpu_and_bad_settings_are_refused():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert packed_backend("auto", cpu, padded=False) == "sdpa"
    assert packed_backend("auto", cuda, padded=False) == "flex"
    assert packed_backend("auto", cuda, padded=True) == "sdpa"
    assert packed_backend("flex", cpu, padded=False) == "flex"
    with pytest.raises(ValueError, match="document ids alone"):
        packed_backend("flex", cpu, padded=True)
    with pytest.raises(ValueError, match="packed_attention must be one of"):
        packed_backend("dense", cpu, padded=False)
    with pytest.raises(ValueError, match="unknown packed_attention"):
        TrainConfig(packed_attention="dense").validate()
    pair = torch.nn.ModuleDict({"policy": Transformer(GQA), "critic": Transformer(GQA)})
    set_packed_attention(pair, "flex")
    assert pair["policy"].packed_attention == pair["critic"].packed_attention == "flex"
