"""The model against transformers (both directions), and its invariants: KV cache, padding, packing."""

import json

import pytest
import torch

from lmforge.model import KVCache, ModelConfig, Transformer, positions_from_documents
from lmforge.modelio import config_from_hf, load_model_dir, save_model_dir

transformers = pytest.importorskip("transformers")


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    return ModelConfig(**{**base, **kw})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("kw", [dict(), dict(tie_word_embeddings=False), dict(num_key_value_heads=4),
                                dict(attention_bias=True), dict(qkv_bias=True), dict(head_dim=32)])
def test_lmforge_checkpoint_opens_in_transformers_with_same_logits(tmp_path, kw):
    model = Transformer(tiny(**kw)).eval()
    save_model_dir(tmp_path, model)
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = torch.randint(0, 97, (2, 17))
    with torch.no_grad():
        assert (model(x) - stock(x).logits).abs().max() < 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_transformers_checkpoint_loads_into_lmforge_with_same_logits(tmp_path, arch):
    common = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=arch == "qwen2", rope_theta=5000.0)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[arch]
    extra = {"sliding_window": None} if arch == "mistral" else {}
    stock = cls[1](cls[0](**common, **extra)).eval()
    stock.save_pretrained(tmp_path)
    model = load_model_dir(tmp_path).eval()
    assert model.config.rope_theta == 5000.0
    assert model.config.qkv_bias == (arch == "qwen2")
    x = torch.randint(0, 101, (2, 19))
    with torch.no_grad():
        assert (model(x) - stock(x).logits).abs().max() < 1e-4


def test_pickle_weights_are_refused(tmp_path):
    save_model_dir(tmp_path, Transformer(tiny()))
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors only"):
        load_model_dir(tmp_path)


def test_unsupported_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        config_from_hf({"model_type": "gpt2"})


def test_kv_cache_decode_equals_full_forward():
    model = Transformer(tiny()).eval()
    x = torch.randint(0, 97, (3, 14))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.config, 3, 32)
        steps = [model(x[:, :6], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(6, 14)]
        assert cache.length == 14
        assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5
        cache = KVCache(model.config, 3, 32)  # a multi-token step after a prefill (chunked prefill)
        model(x[:, :5], cache=cache)
        assert (model(x[:, 5:], cache=cache) - full[:, 5:]).abs().max() < 1e-5


def test_left_padding_gives_the_unpadded_logits():
    model = Transformer(tiny()).eval()
    a, b = torch.randint(0, 97, (9,)), torch.randint(0, 97, (12,))
    batch = torch.stack([torch.cat([torch.zeros(3, dtype=torch.long), a]), b])
    mask = torch.stack([torch.cat([torch.zeros(3), torch.ones(9)]), torch.ones(12)]).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(batch, attention_mask=mask, position_ids=positions)
        assert torch.isfinite(out).all()
        assert (out[0, 3:] - model(a[None])[0]).abs().max() < 1e-5
        assert (out[1] - model(b[None])[0]).abs().max() < 1e-5


def test_packed_documents_do_not_see_each_other():
    model = Transformer(tiny()).eval()
    docs = [torch.randint(0, 97, (n,)) for n in (5, 7, 4)]
    packed = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    assert positions_from_documents(doc_ids).tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3]]
    with torch.no_grad():
        out = model(packed, document_ids=doc_ids)
        start = 0
        for d in docs:
            assert (out[0, start:start + len(d)] - model(d[None])[0]).abs().max() < 1e-5
            start += len(d)


def test_loss_matches_cross_entropy_of_logits_and_ignores_minus_100():
    model = Transformer(tiny())
    x = torch.randint(0, 97, (2, 10))
    labels = torch.randint(0, 97, (2, 10))
    labels[0, :4] = -100
    logits = model(x)
    expected = torch.nn.functional.cross_entropy(logits.view(-1, 97), labels.view(-1), ignore_index=-100)
    assert torch.allclose(model(x, labels=labels), expected, atol=1e-6)


def test_tied_embeddings_share_storage_and_count_once():
    model = Transformer(tiny())
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    untied = Transformer(tiny(tie_word_embeddings=False))
    assert untied.num_params() - model.num_params() == 97 * 64


def test_score_head_round_trips(tmp_path):
    model = Transformer(tiny(num_labels=1))
    torch.nn.init.normal_(model.score.weight)
    save_model_dir(tmp_path, model)
    assert json.loads((tmp_path / "config.json").read_text())["num_labels"] == 1
    loaded = load_model_dir(tmp_path, num_labels=1)
    assert torch.equal(loaded.score.weight, model.score.weight)


def test_bad_config_names_the_problem():
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        Transformer(tiny(num_attention_heads=4, num_key_value_heads=3))


@pytest.mark.parametrize("packed", [False, True])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(packed):
    model = Transformer(tiny()).train()
    assert model.gradient_checkpointing is False
    x, labels = torch.randint(0, 97, (2, 12)), torch.randint(0, 97, (2, 12))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 12]) if packed else None

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(x, labels=labels, document_ids=doc_ids)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_loss, plain_grads = loss_and_grads()
    model.gradient_checkpointing = True
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ckpt_loss, ckpt_grads = loss_and_grads()
    assert torch.equal(plain_loss, ckpt_loss)
    for name, g in plain_grads.items():
        assert torch.allclose(g, ckpt_grads[name], atol=1e-6, rtol=1e-5), name
    # checkpointed: far fewer tensors are saved for backward than without it
    model.gradient_checkpointing = False
    saved_plain = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_plain.append(t) or t, lambda t: t):
        model(x, labels=labels, document_ids=doc_ids)
    assert len(saved) < len(saved_plain) / 2


def test_rope_tables_grow_past_max_position_embeddings_and_positions_default_to_past_plus_t():
    short = Transformer(tiny(max_position_embeddings=8)).eval()
    long = Transformer(tiny(max_position_embeddings=64)).eval()
    long.load_state_dict(short.state_dict())
    x = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        expected = long(x)
        assert (short(x) - expected).abs().max() < 1e-5  # tables extended, not an index error
        assert short.rope_cos.shape[0] >= 20
        explicit = short(x, position_ids=torch.arange(20).expand(2, 20))
        assert (explicit - expected).abs().max() < 1e-5
        cache = KVCache(short.config, 2, 40)
        short(x[:, :12], cache=cache)
        assert (short(x[:, 12:], cache=cache) - expected[:, 12:]).abs().max() < 1e-5
