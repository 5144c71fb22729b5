"""int8 / int4 weight-only quantisation: the quantisers against hand-computed values, QuantLinear's kernels and
fallback against F.linear on the dequantized weight, save/load round trips, perplexity, the training guard, and
`lmforge quantize` then `lmforge generate` end to end."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from lmforge_cli import lmforge
from safetensors.torch import save_file

from lmforge.generation import SamplingParams, generate
from lmforge.lora import LoraOptions, apply_lora
from lmforge.model import ModelConfig, Transformer
from lmforge.modelio import load_model_dir, save_model_dir
from lmforge.quant import (
    QuantizedModelError,
    QuantLinear,
    compressed_tensors_config,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    pack_int8,
    quantize_int4,
    quantize_int8,
    quantize_model,
    unpack_int4,
    unpack_int8,
)

pytestmark = pytest.mark.usefixtures("one_thread")




# ---- the quantisers, by hand ----

def test_int8_per_row_scale_rounding_and_zero_rows():
    w = torch.tensor([[127.0, 1.5, -2.5, 0.4],  # max |w| = 127 -> scale 1: round half to even, 1.5 -> 2, -2.5 -> -2
                      [0.5, -0.25, 0.125, 0.0],  # scale 0.5 / 127
                      [0.0, 0.0, 0.0, 0.0]])  # all zero: scale 1, q 0
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert scale.tolist() == pytest.approx([1.0, 0.5 / 127, 1.0])
    assert q[0].tolist() == [127, 2, -2, 0]
    assert q[1].tolist() == [127, -64, 32, 0]  # -0.25 / (0.5/127) = -63.5 -> -64 (half to even), 31.75 -> 32
    assert q[2].tolist() == [0, 0, 0, 0]
    assert q.abs().max() <= 127
    back = dequantize_int8(q, scale)
    assert back[0].tolist() == [127.0, 2.0, -2.0, 0.0] and back[2].abs().max() == 0
    assert ((back - w).abs() <= scale[:, None] / 2 + 1e-7).all()  # error at most half a step


def test_int4_groups_min_scale_nibbles_by_hand():
    # group 1: min -3, max 12 -> scale 1; 3.5 -> 4, 7.5 -> 8 (half to even); group 2 constant -> scale 1, q 0
    w = torch.tensor([[-3.0, 12.0, 0.5, 4.5, 1.0, 1.0, 1.0, 1.0]])
    packed, scale, lo = quantize_int4(w, group_size=4)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 4)
    assert scale.tolist() == [[1.0, 1.0]] and lo.tolist() == [[-3.0, 1.0]]
    assert unpack_int4(packed).tolist() == [[0, 15, 4, 8, 0, 0, 0, 0]]
    assert packed.tolist() == [[0 | 15 << 4, 4 | 8 << 4, 0, 0]]  # q[2k] low nibble, q[2k+1] high nibble
    assert dequantize_int4(packed, scale, lo, 4).tolist() == [[-3.0, 12.0, 1.0, 5.0, 1.0, 1.0, 1.0, 1.0]]
    with pytest.raises(ValueError, match="divide in_features"):
        quantize_int4(torch.zeros(2, 12), group_size=8)


def test_int4_pack_round_trip_and_error_bound():
    torch.manual_seed(0)
    q = torch.randint(0, 16, (6, 10), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    w = torch.randn(16, 64)
    packed, scale, lo = quantize_int4(w, 32)
    err = (dequantize_int4(packed, scale, lo, 32) - w).abs().reshape(16, 2, 32)
    assert (err <= scale[..., None] / 2 + 1e-6).all()


# ---- QuantLinear: kernels and fallback ----

def make_layer(bits, out_features=48, in_features=128, group_size=32, bias=True):
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    return QuantLinear.from_linear(linear, bits, group_size).eval()


@pytest.mark.parametrize("bits", [8, 4])
def test_quant_linear_matches_f_linear_on_dequantized_weight(bits):
    layer = make_layer(bits)
    x = torch.randn(2, 5, 128)
    ref = F.linear(x, layer.dequantize(), layer.bias)
    assert layer._kernel_dtype(x.reshape(-1, 128)) == torch.bfloat16  # the fused kernel applies to this shape
    layer.kernel_dtype = torch.float32  # fp32 activations: the kernel is exact up to float rounding
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    layer.kernel_dtype = torch.bfloat16  # the default: activations rounded to bf16
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=3e-2 * ref.abs().max().item())
    layer.use_kernel = False  # the fallback (CUDA, MPS, shapes the kernels refuse)
    torch.testing.assert_close(layer(x), ref, rtol=1e-6, atol=1e-6)
    assert layer(x).shape == (2, 5, 48)


def test_int4_shapes_the_kernel_refuses_use_the_fallback():
    layer = make_layer(4, out_features=40, group_size=32)  # out % 16 != 0
    odd_group = make_layer(4, out_features=48, group_size=16)  # the kernel takes groups of 32..256 only
    for lay in (layer, odd_group):
        x = torch.randn(3, 128)
        assert lay._kernel_dtype(x) is None
        torch.testing.assert_close(lay(x), F.linear(x, lay.dequantize(), lay.bias), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [8, 4])
def test_unaligned_operands_do_not_crash_the_kernel(bits):
    """torch's int8 CPU kernel segfaults on operands at unaligned addresses (safetensors hands those out)."""
    layer = make_layer(bits, bias=False)
    layer.kernel_dtype = torch.float32
    buf = torch.randn(3 * 128 + 2)
    x = buf[2:].view(3, 128)  # 8 bytes past an aligned address
    if bits == 8:
        wbuf = torch.zeros(48 * 128 + 3, dtype=torch.int8)
        wbuf[3:].copy_(layer.weight.flatten())
        layer.weight = wbuf[3:].view(48, 128)
    torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize()), rtol=1e-5, atol=1e-5)


# ---- whole models ----

def tiny_model(std=0.02, qkv_bias=False):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                    qkv_bias=qkv_bias, initializer_range=std))
    return model.eval()


@pytest.mark.parametrize("bits", [8, 4])
def test_save_load_round_trip_gives_identical_outputs(bits, tmp_path):
    model = tiny_model(qkv_bias=True)
    stats = quantize_model(model, bits, group_size=32)
    assert stats["layers"] == 14 and 0 < stats["rel_error_mean"] <= stats["rel_error_max"] < 0.2
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    save_model_dir(tmp_path / "q", model)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    if bits == 8:  # compressed-tensors' W8A16 (pack-quantized), which transformers and vLLM read
        assert config["quantization_config"]["quant_method"] == "compressed-tensors"
        assert config["quantization_config"]["format"] == "pack-quantized"
    else:
        assert config["quantization_config"] == {"quant_method": "lmforge", "bits": 4, "group_size": 32}
    loaded = load_model_dir(tmp_path / "q")
    assert not loaded.training  # a quantized model loads for inference
    q = loaded.model.layers[1].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.bias is not None
    assert q.weight.dtype == (torch.int8 if bits == 8 else torch.uint8)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    save_model_dir(tmp_path / "again", loaded)  # a loaded quantized model saves quantized again
    with torch.no_grad():
        assert torch.equal(load_model_dir(tmp_path / "again")(ids), model(ids))


def test_int8_perplexity_within_a_few_percent_of_float():
    model = tiny_model(std=0.15)  # a peaked distribution, so perplexity means something
    text = generate(model, [[1, 2, 3]], SamplingParams(max_new_tokens=96, temperature=0.7, seed=0))[0][0].token_ids
    ids = torch.tensor([[1, 2, 3, *text]])

    def ppl(m):
        with torch.no_grad():
            return math.exp(float(m(ids[:, :-1], labels=ids[:, 1:])))

    base = ppl(model)
    int8 = copy.deepcopy(model)
    quantize_model(int8, 8)
    int4 = copy.deepcopy(model)
    quantize_model(int4, 4, 32)
    assert base < 30  # far below the vocabulary size (96): the test text is what the model predicts
    assert abs(ppl(int8) / base - 1) < 0.03  # measured +0.6%
    assert abs(ppl(int4) / base - 1) < 0.15  # measured +8%


def test_training_a_quantized_model_is_one_clear_error():
    model = tiny_model()
    quantize_model(model, 8)
    ids = torch.randint(0, 96, (1, 8))
    model(ids)  # eval mode with grad on (a frozen reference model) is fine
    model.train()
    with torch.no_grad():
        model(ids)  # so is train mode without gradients
    with pytest.raises(QuantizedModelError, match="int8-quantized .* cannot be trained"):
        model(ids, labels=ids)
    with pytest.raises(QuantizedModelError, match="already quantized"):
        quantize_model(model, 4)
    with pytest.raises(ValueError, match="group_size=48 must be even and divide"):
        quantize_model(tiny_model(), 4, group_size=48)

    with pytest.raises(QuantizedModelError, match="LoRA"):
        apply_lora(model, LoraOptions())


def test_unknown_quantization_config_is_refused(tmp_path):
    save_model_dir(tmp_path / "m", tiny_model())
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json: quantization_config .* is not lmforge's"):
        load_model_dir(tmp_path / "m")
    config["quantization_config"] = compressed_tensors_config(["lm_head"])
    config["quantization_config"]["config_groups"]["group_0"]["weights"].update(num_bits=4, strategy="group",
                                                                                group_size=128)
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="compressed-tensors quantization_config is not one lmforge reads"):
        load_model_dir(tmp_path / "m")


# ---- the int8 file format: compressed-tensors' pack-quantized ----

@pytest.mark.parametrize("in_features", [8, 7, 1])
def test_pack_int8_puts_four_offset_bytes_in_a_word(in_features):
    q = torch.tensor([[-128, -1, 0, 127, 5, -7, 3, 2]], dtype=torch.int8)[:, :in_features]
    packed = pack_int8(q)
    assert packed.dtype == torch.int32 and packed.shape == (1, (in_features + 3) // 4)
    if in_features >= 4:  # q + 128 = bytes 0, 127, 128, 255, the first weight in the lowest byte
        assert packed[0, 0].item() == 0xFF807F00 - (1 << 32)
    assert torch.equal(unpack_int8(packed, in_features), q)


def test_pack_int8_matches_compressed_tensors():
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers",
                                  reason="pip install compressed-tensors (only this test uses it)")
    q = torch.randint(-128, 128, (6, 37), dtype=torch.int8)
    assert torch.equal(pack_int8(q), helpers.pack_to_int32(q, 8))
    assert torch.equal(helpers.unpack_from_int32(pack_int8(q), 8, q.shape), q)


def test_int8_directory_in_lmforges_older_format_still_loads(tmp_path):
    model = tiny_model()
    quantize_model(model, 8)
    save_model_dir(tmp_path / "old", model)
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "lmforge", "bits": 8, "group_size": None}
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "old" / "model.safetensors"))
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        assert torch.equal(load_model_dir(tmp_path / "old")(ids), model(ids))


@pytest.mark.parametrize("qkv_bias", [False, True])  # Llama and Qwen2
def test_transformers_opens_an_int8_directory_with_the_same_logits(tmp_path, qkv_bias):
    pytest.importorskip("compressed_tensors", reason="pip install compressed-tensors (transformers reads "
                        "lmforge's int8 directories through it)")
    transformers = pytest.importorskip("transformers")
    model = tiny_model(qkv_bias=qkv_bias)
    quantize_model(model, 8)
    save_model_dir(tmp_path / "q8", model)
    ours = load_model_dir(tmp_path / "q8")
    for layer in ours.modules():
        if isinstance(layer, QuantLinear):  # the float path: x W^T with W = s q exactly, as transformers computes
            layer.use_kernel = False
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q8").eval()
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        a, b = ours(ids), theirs(ids).logits
    assert (a - b).abs().max() < 1e-5
    assert a.abs().max() > 0.01  # a real comparison, not of two zero tensors


# ---- end to end ----

def test_cli_quantize_then_generate_and_refuse_training(tiny_model_dir, tmp_path):
    src = tiny_model_dir("quant")
    out = tmp_path / "q8"
    proc = lmforge("quantize", f"model={src}", f"out={out}", "bits=8", "speed_tokens=4")
    summary = json.loads((out / "quantize.json").read_text())
    assert summary["bits"] == 8 and summary["weight_error"]["layers"] == 7
    assert summary["size_mb"]["quantized"] < summary["size_mb"]["float"]
    assert abs(summary["perplexity"]["quantized"] / summary["perplexity"]["float"] - 1) < 0.05
    assert summary["decode_tok_s"]["quantized"] > 0 and "perplexity" in proc.stdout
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).exists(), name

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "The assistant"}) + "\n"
                       + json.dumps({"messages": [{"role": "user", "content": "Can you help?"}]}) + "\n")
    lmforge("generate", f"model={out}", f"input={prompts}", f"output={tmp_path / 'gen.jsonl'}",
            "max_new_tokens=5", "temperature=0", "device=cpu")
    rows = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["completions"][0]["tokens"] >= 1 for r in rows)

    four = lmforge("quantize", f"model={src}", f"out={tmp_path / 'q4'}", "bits=4", "group_size=32",
                   "speed_tokens=0")
    assert "int4 (group 32)" in four.stdout
    again = lmforge("quantize", f"model={out}", f"out={tmp_path / 'qq'}", check=False)
    assert again.returncode == 2 and "already quantized" in again.stderr and "Traceback" not in again.stderr

    chats = tmp_path / "chat.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "Response A or B?"},
                                                      {"role": "assistant", "content": "I can help with that."}]})
                             + "\n" for _ in range(8)))
    sft = lmforge("sft", f"model={out}", f"data={chats}", f"out_dir={tmp_path / 'sft'}", "seq_len=32",
                  "train.max_steps=2", "train.batch_size=2", "train.micro_batch_size=2", "train.warmup_steps=0",
                  "train.eval_every=0", "val_fraction=0.25", "epochs=0", check=False)
    assert sft.returncode == 2, sft.stderr
    assert "int8-quantized (weight-only): its quantized weights cannot be trained" in sft.stderr
    assert "Traceback" not in sft.stderr
