"""RoPE context extension (linear, dynamic NTK, YaRN, Llama 3) against transformers, past the original context:
the frequencies, the logits of a loaded checkpoint, a saved one reopened in transformers, and cached decoding."""

import json
import warnings

import pytest
import torch

from lmforge.generation import SamplingParams, generate
from lmforge.model import KVCache, ModelConfig, Transformer, rope_frequencies
from lmforge.modelio import config_from_hf, load_model_dir, save_model_dir

transformers = pytest.importorskip("transformers")
ROPE_INIT_FUNCTIONS = pytest.importorskip("transformers.modeling_rope_utils").ROPE_INIT_FUNCTIONS

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_POS, THETA, LENGTH = 128, 10000.0, 300  # LENGTH: well past every context below
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "yarn_mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 1.0,
                    "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2, "truncate": False},
    "yarn_attention_factor": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16,
                              "attention_factor": 1.3},
}


def hf_config(scaling: dict | None, **kw):
    return transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=MAX_POS, initializer_range=0.2, tie_word_embeddings=False,
        rope_parameters={**(scaling or {"rope_type": "default"}), "rope_theta": THETA}, **kw)


def hf_model(scaling: dict | None):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(hf_config(scaling)).eval()


def ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", SCALINGS)
@pytest.mark.parametrize("seq_len", [None, 64, 200, 1000])
def test_frequencies_are_transformers_to_the_last_bit(name, seq_len):
    scaling = SCALINGS[name]
    hf_seq = torch.tensor(seq_len) if seq_len is not None else None  # transformers passes max(position_ids) + 1
    expected, expected_scale = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf_config(scaling), "cpu", seq_len=hf_seq)
    got, scale = rope_frequencies(32, THETA, scaling, MAX_POS, seq_len=seq_len)
    assert torch.equal(got, expected) and scale == pytest.approx(expected_scale, rel=1e-15)


@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("name", SCALINGS)
def test_scaled_checkpoint_loads_with_transformers_logits_past_the_context(tmp_path, name, key):
    """A transformers 5 directory (rope_parameters) and an older one (rope_scaling + rope_theta) both load with
    the scaling, and the logits at 300 positions match; plain RoPE would be off (the test can fail)."""
    stock = hf_model(SCALINGS[name])
    stock.save_pretrained(tmp_path)
    if key == "rope_scaling":  # rewrite as transformers 4 wrote it
        cfg = json.loads((tmp_path / "config.json").read_text())
        params = cfg.pop("rope_parameters")
        cfg["rope_theta"] = params.pop("rope_theta")
        cfg["rope_scaling"] = params
        (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = load_model_dir(tmp_path)
    assert ours.config.rope_scaling["rope_type"] == SCALINGS[name]["rope_type"]
    x = ids(LENGTH)
    with torch.no_grad():
        expected, got = stock(x).logits, ours(x)
        ours.config.rope_scaling = None
        ours.reset_rope()
        plain = ours(x)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    assert (plain - expected).abs().max() > 1e-2


@pytest.mark.parametrize("name", SCALINGS)
def test_saved_scaling_reopens_in_transformers_with_the_same_logits(tmp_path, name):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=MAX_POS,
                                    initializer_range=0.2, rope_scaling=dict(SCALINGS[name]))).eval()
    save_model_dir(tmp_path / "m", model)
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    x = ids(LENGTH)
    with torch.no_grad():
        torch.testing.assert_close(model(x), stock(x).logits, atol=2e-4, rtol=1e-4)
    assert load_model_dir(tmp_path / "m").config.rope_scaling == model.config.rope_scaling


@pytest.mark.parametrize("prompt", [100, 150])  # crossing the context while decoding, and starting past it
def test_dynamic_ntk_decoding_with_a_kv_cache_matches_transformers(tmp_path, prompt):
    """Dynamic NTK recomputes its frequencies from the sequence length at every step; transformers rotates each new
    key with the current step's frequencies and keeps the cached keys as they were: so does lmforge."""
    stock = hf_model(SCALINGS["dynamic"])
    stock.save_pretrained(tmp_path)
    ours = load_model_dir(tmp_path).eval()
    x = ids(prompt + 60)
    cache = KVCache(ours.config, 1, x.shape[1])
    with torch.no_grad():
        out = stock(x[:, :prompt], use_cache=True)
        key = "cache" if "cache" in out else "past_key_values"  # renamed in transformers 5.2x
        expected = [out.logits[:, -1]]
        got = [ours(x[:, :prompt], cache=cache)[:, -1]]
        for t in range(prompt, x.shape[1]):
            out = stock(x[:, t:t + 1], use_cache=True, **{key: out[key]})
            expected.append(out.logits[:, -1])
            got.append(ours(x[:, t:t + 1], cache=cache)[:, -1])
        whole = ours(x)[:, -1]
    torch.testing.assert_close(torch.cat(got), torch.cat(expected), atol=2e-4, rtol=1e-4)
    assert (whole - got[-1]).abs().max() > 1e-3  # cached decoding is not the full forward: keys kept old angles


@pytest.mark.parametrize("decoder", ["cache", "packed", "static"])
def test_dynamic_ntk_generation_engine_matches_transformers_greedy(tmp_path, decoder):
    """Every decoder of the generation engine (forward with a growing cache; the packed CPU step for 2+ rows; the
    fixed-shape decode_step) follows transformers' greedy tokens across the context boundary."""
    stock = hf_model(SCALINGS["dynamic"])
    stock.save_pretrained(tmp_path)
    ours = load_model_dir(tmp_path).eval()
    rows = 1 if decoder == "cache" else 2
    prompts = torch.cat([ids(110, seed=s) for s in range(rows)])
    with torch.no_grad():
        expected = stock.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=40,
                                  do_sample=False, eos_token_id=None, pad_token_id=0)[:, 110:].tolist()
    params = SamplingParams(max_new_tokens=40, temperature=0.0, static_cache=decoder == "static")
    got = [row[0].token_ids for row in generate(ours, prompts.tolist(), params, eos_token_ids=[])]
    assert got == expected


def test_dynamic_ntk_depends_on_the_call_alone_unlike_transformers(tmp_path):
    """The one documented difference: transformers keeps the frequencies of the longest sequence it has seen until
    a call shorter than max_position_embeddings resets them, so its result depends on earlier calls. lmforge
    computes them from each call's own length, which is transformers' answer on a freshly loaded model."""
    stock = hf_model(SCALINGS["dynamic"])
    stock.save_pretrained(tmp_path)
    ours = load_model_dir(tmp_path)
    short = ids(200)
    with torch.no_grad():
        fresh = stock(short).logits
        stock(ids(LENGTH))  # a longer call first
        after_longer = stock(short).logits
        torch.testing.assert_close(ours(short), fresh, atol=2e-4, rtol=1e-4)
    assert (after_longer - fresh).abs().max() > 1e-3


def test_unsupported_rope_types_are_one_clear_error():
    base = dict(model_type="llama", vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=MAX_POS)
    for key in ("rope_parameters", "rope_scaling"):
        with pytest.raises(ValueError, match=r"cfg.json: RoPE scaling type 'longrope' is not supported \(lmforge "
                                             r"implements linear, dynamic, yarn, llama3"):
            config_from_hf({**base, key: {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}},
                           "cfg.json")
    with pytest.raises(ValueError, match="cfg.json: RoPE scaling 'llama3' needs low_freq_factor, high_freq_factor"):
        config_from_hf({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "cfg.json")
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        config_from_hf({**base, "rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                    "partial_rotary_factor": 0.5}}, "cfg.json")
    old = config_from_hf({**base, "rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 500.0})
    assert old.rope_scaling == {"rope_type": "linear", "factor": 2.0} and old.rope_theta == 500.0
    assert config_from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}).rope_scaling is None
    with pytest.raises(ValueError, match="RoPE scaling type 'ntk' is not supported"):
        ModelConfig(rope_scaling={"rope_type": "ntk", "factor": 2.0}).validate()


def test_qwen2_sliding_window_warns_like_mistral():
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2)
    with pytest.warns(UserWarning, match=r"Qwen2 use_sliding_window=true \(sliding_window=4096 from layer 2\) is "
                                         "ignored; attention is full"):
        config_from_hf({**base, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4096,
                        "max_window_layers": 2})
    with pytest.warns(UserWarning, match="Mistral sliding_window=4096 is ignored"):
        config_from_hf({**base, "model_type": "mistral", "sliding_window": 4096})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Qwen2's default (the window is off) is silent
        config_from_hf({**base, "model_type": "qwen2", "use_sliding_window": False, "sliding_window": 4096})
