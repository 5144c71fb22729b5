"""SFT: packing (exactness, counts, resume), the assistant-only loss, LoRA (merge, PEFT format) and the CLI."""

import json

import pytest
import torch
from lmforge_cli import lmforge

from lmforge.data.packing import (
    SFTBatches,
    best_fit_pack,
    collate,
    iter_rows,
    make_rows,
    prepare_examples,
)
from lmforge.lora import LoraOptions, apply_lora, load_adapter, merge_lora, save_adapter, trainable_parameters
from lmforge.model import ModelConfig, Transformer
from lmforge.modelio import load_model_dir, save_model_dir
from lmforge.tokenizer import train_tokenizer
from lmforge.train.lm import sft_loss

TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128)


def random_examples(n, seed=0, lo=3, hi=20):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi, (1,), generator=g))
        ids = torch.randint(4, 64, (length,), generator=g).tolist()
        mask = [0] * (length // 2) + [1] * (length - length // 2)  # a prompt, then an assistant reply
        out.append((ids, mask))
    return out


def test_best_fit_pack_places_every_item_once_within_capacity():
    lengths = [7, 5, 5, 4, 3, 3, 2, 2, 1, 10, 6]
    bins = best_fit_pack(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 5  # sum 48 -> at least 5 bins of 10; best-fit decreasing reaches it
    with pytest.raises(ValueError):
        best_fit_pack([11], 10)


def test_truncate_and_drop_are_counted_never_silent():
    long_one = (list(range(4, 44)), [0] * 10 + [1] * 30)  # 40 tokens -> 39 pairs
    prompt_heavy = (list(range(4, 44)), [0] * 35 + [1] * 5)  # its reply lies past the cut
    short = ([5, 6, 7, 8], [0, 0, 1, 1])
    ex, stats = prepare_examples([long_one, prompt_heavy, short], seq_len=16, truncation="truncate")
    assert (stats.examples, stats.kept, stats.truncated, stats.dropped_no_target) == (3, 2, 2, 1)
    assert ex.lengths().tolist() == [16, 3]
    ex, stats = prepare_examples([long_one, prompt_heavy, short], seq_len=16, truncation="drop")
    assert (stats.kept, stats.truncated, stats.dropped_too_long) == (1, 0, 2)
    # labels are the next tokens where the target is an assistant token, -100 elsewhere
    assert ex.get(0)[0].tolist() == [5, 6, 7] and ex.get(0)[1].tolist() == [-100, 7, 8]


def test_packed_and_unpacked_losses_are_equal():
    torch.manual_seed(0)
    model = Transformer(TINY).eval()
    ex, stats = prepare_examples(random_examples(12), seq_len=40)
    packed_rows = make_rows(ex, 40, packing=True)
    assert len(packed_rows) < len(ex)  # several examples share a row
    packed = collate(ex, packed_rows, packed=True)
    unpacked = collate(ex, make_rows(ex, 40, packing=False), packed=False)
    assert int(packed["num_tokens"]) == int(unpacked["num_tokens"]) == stats.tokens
    with torch.no_grad():
        a = sft_loss(model, packed)[0]
        b = sft_loss(model, unpacked)[0]
    assert abs(float(a) - float(b)) < 1e-5
    # and per token: each packed example's logits are its logits alone
    with torch.no_grad():
        logits = model(packed["input_ids"], document_ids=packed["document_ids"])
        x, _ = ex.get(packed_rows[0][1])
        start = len(ex.get(packed_rows[0][0])[0])
        alone = model(torch.as_tensor(x)[None])
    assert (logits[0, start:start + len(x)] - alone[0]).abs().max() < 1e-5


def test_all_masked_batch_gives_zero_loss_with_a_gradient_not_nan():
    torch.manual_seed(0)
    model = Transformer(TINY)
    batch = collate(*(lambda e: (e, [[0, 1]]))(prepare_examples(random_examples(2), 40)[0]))
    batch["labels"].fill_(-100)
    loss, metrics = sft_loss(model, batch)
    loss.backward()
    assert loss.item() == 0.0 and loss.requires_grad and float(metrics["num_target_tokens"]) == 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_batches_resume_exactly_and_shard_across_ranks():
    ex, _ = prepare_examples(random_examples(40), seq_len=32)
    rows = make_rows(ex, 32, packing=True)
    a = SFTBatches(ex, rows, batch_size=4, seed=3)
    for _ in range(5):
        next(a)
    state = a.state_dict()
    expected = [next(a) for _ in range(7)]  # crosses an epoch boundary
    b = SFTBatches(ex, rows, batch_size=4, seed=3)
    b.load_state_dict(json.loads(json.dumps(state)))
    for want in expected:
        got = next(b)
        assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["labels"], want["labels"])
    # two ranks together see the rows one process sees
    one = next(SFTBatches(ex, rows, batch_size=4, seed=3))
    halves = [next(SFTBatches(ex, rows, batch_size=4, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert int(one["num_tokens"]) == sum(int(h["num_tokens"]) for h in halves)
    # evaluation visits every row exactly once
    assert sum(int(b["num_tokens"]) for b in iter_rows(ex, rows, 3)) == int(ex.lengths().sum())


def test_padding_is_only_at_the_row_tail_and_never_learned():
    ex, _ = prepare_examples(random_examples(6), seq_len=64)
    batch = collate(ex, make_rows(ex, 64, packing=True), pad_id=1)
    docs, labels = batch["document_ids"], batch["labels"]
    for r in range(docs.shape[0]):
        pad = docs[r] == -1
        if pad.any():
            first = int(pad.nonzero()[0])
            assert pad[first:].all() and (labels[r, first:] == -100).all()
    assert int((docs != -1).sum()) == int(batch["num_tokens"])


# ---- LoRA ----

def test_lora_merge_matches_adapter_and_the_adapter_loads_with_peft(tmp_path):
    peft = pytest.importorskip("peft")

    torch.manual_seed(0)
    base = Transformer(TINY)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_lora(base, LoraOptions(enabled=True, r=4, alpha=8, dropout=0.0))
    trainable, total = trainable_parameters(model)
    assert 0 < trainable < total
    with torch.no_grad():  # B starts at zero (adapter = identity); make it do something
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    x = torch.randint(0, TINY.vocab_size, (2, 12))
    model.eval()
    with torch.no_grad():
        adapter_on = model(x)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()

    merged = merge_lora(model)
    assert type(merged) is Transformer
    with torch.no_grad():
        assert (merged(x) - adapter_on).abs().max() < 1e-5

    fresh = Transformer(TINY)
    fresh.load_state_dict(base_state)
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert (loaded(x) - adapter_on).abs().max() < 1e-5


# ---- end to end ----



@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A random-init micro model + a tokenizer trained on arithmetic chats, saved as a model directory."""
    d = tmp_path_factory.mktemp("sft")
    rows = [{"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                          {"role": "assistant", "content": f"{a} + {b} = {a + b}. The answer is {a + b}."}]}
            for a in range(12) for b in range(12)]
    rows.append({"messages": [{"role": "system", "content": " ".join(f"Rule {i}." for i in range(60))},  # > seq_len
                              {"role": "user", "content": "What is 1 + 1?"},
                              {"role": "assistant", "content": "The answer is 2."}]})
    (d / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_tokenizer([m["content"] for r in rows for m in r["messages"]], vocab_size=300)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    save_model_dir(d / "base", Transformer(cfg), tok)
    return d


MICRO = ["seq_len=80", "train.max_steps=30", "train.batch_size=8", "train.micro_batch_size=8", "train.lr=1e-2",
         "train.warmup_steps=3", "train.eval_every=15", "train.save_every=15", "train.log_every=5",
         "val_fraction=0.1", "epochs=0"]


@pytest.mark.slow
def test_sft_cli_lowers_assistant_loss_and_saves_a_chat_checkpoint(base_dir, tmp_path):
    out = tmp_path / "run"
    proc = lmforge("sft", f"model={base_dir / 'base'}", f"data={base_dir / 'chat.jsonl'}", f"out_dir={out}", *MICRO,
                   "sample_prompt=What is 3 + 4?")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_loss"] < summary["val_loss_before"] - 0.5, summary
    assert summary["packing"]["truncated"] == 1 and summary["steps"] == 30
    assert summary["packing"]["rows"] < summary["packing"]["kept"]  # packed
    assert "1 truncated" in proc.stdout and "val loss (assistant tokens)" in proc.stdout
    tok_config = json.loads((out / "model" / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"]
    assert (out / "model" / "model.safetensors").exists() and (out / "metrics.jsonl").exists()
    assert (out / "checkpoints" / "step_0000030").exists()

    dropped = lmforge("sft", f"model={base_dir / 'base'}", f"data={base_dir / 'chat.jsonl'}",
                      f"out_dir={tmp_path / 'drop'}", *MICRO, "train.max_steps=2", "train.warmup_steps=0", "truncation=drop",
                      "packing=false")
    summary = json.loads((tmp_path / "drop" / "summary.json").read_text())
    assert summary["packing"]["dropped_too_long"] == 1 and summary["packing"]["truncated"] == 0
    assert "1 dropped" in dropped.stdout


@pytest.mark.slow
def test_sft_cli_lora_writes_a_peft_adapter_and_a_merged_model(base_dir, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "lora"
    lmforge("sft", f"model={base_dir / 'base'}", f"data={base_dir / 'chat.jsonl'}", f"out_dir={out}", *MICRO,
            "train.max_steps=10", "lora.enabled=true", "lora.r=4", "gradient_checkpointing=true")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lora"] and summary["trainable_params"] < summary["total_params"] / 2
    assert summary["val_loss"] < summary["val_loss_before"]
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "adapter" / "tokenizer.json").exists()

    x = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        via_adapter = load_adapter(load_model_dir(base_dir / "base"), out / "adapter").eval()(x)
        merged = load_model_dir(out / "model")(x)
        again = merge_lora(load_adapter(load_model_dir(base_dir / "base"), out / "adapter"))(x)
    assert (via_adapter - merged).abs().max() < 1e-5 and (again - merged).abs().max() < 1e-5


def test_sft_cli_bad_row_is_exit_2_naming_file_line_and_field(base_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
                   '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}\n')
    proc = lmforge("sft", f"model={base_dir / 'base'}", f"data={bad}", f"out_dir={tmp_path / 'x'}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{bad}:2: field 'messages'[1]: empty assistant response" in proc.stderr
