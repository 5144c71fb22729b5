"""SFT throughput: `lmforge sft`'s path (packing + the one training loop) vs TRL's SFTTrainer, side by side.

    python bench/bench_sft.py [--steps 12] [--warmup 3] [--conversations 1500]

Same model (hidden 256, 4 layers, 4 heads, 2 kv heads, ffn 688, vocab 8192; identical initial weights), same
chat data (multi-turn arithmetic conversations, some with a system prompt), loss on assistant tokens only in
both (lmforge's mask; TRL's assistant_only_loss through a {% generation %} chat template), packed rows of 256
tokens (TRL: packing=True, best-fit decreasing, which makes its batches padding-free), 8 rows per step, fp32,
2 threads, AdamW. Tokens/s counts the real (non-padding) input tokens each side processes, over the steps after
the warm-up ones. Run both in one process so they share the machine's load; compare the ratio.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from lmforge.data.chat import tokenize_conversation
from lmforge.data.packing import SFTBatches, make_rows, prepare_examples
from lmforge.data.tinyworld import problems, quiz_pages
from lmforge.model import ModelConfig, Transformer
from lmforge.modelio import load_model_dir, save_model_dir
from lmforge.tokenizer import train_tokenizer
from lmforge.train.lm import sft_loss
from lmforge.train.loop import TrainConfig, train

# ChatML with TRL's generation markers around what the assistant says (content + <|im_end|>), as lmforge masks it.
CHATML_GENERATION = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SYSTEMS = ["You are a careful arithmetic tutor.", "Show your work column by column, then give the answer.",
           "Answer briefly."]


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """1-4 question/answer turns each, a system prompt one time in two: lengths from ~40 to ~250 tokens."""
    rng = random.Random(seed)
    pool = problems(4 * n, "train", seed)
    out = []
    for _ in range(n):
        messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 4)):
            p = rng.choice(pool)
            messages += [{"role": "user", "content": p.question}, {"role": "assistant", "content": p.worked_answer()}]
        out.append(messages)
    return out


def bench_lmforge(model_dir: Path, tokenizer, convs, args) -> tuple[float, int]:
    examples, _ = prepare_examples((tokenize_conversation(tokenizer, m) for m in convs), args.seq)
    rows = make_rows(examples, args.seq, packing=True)
    batches = SFTBatches(examples, rows, args.batch, pad_id=tokenizer.pad_id, seed=0)
    model = load_model_dir(model_dir)
    windows = []

    def on_log(step, metrics):
        windows.append((step, metrics["tokens_per_sec"] * metrics["step_time"] * args.warmup,
                        metrics["step_time"] * args.warmup))

    cfg = TrainConfig(lr=1e-4, warmup_steps=0, max_steps=args.warmup + args.steps, batch_size=args.batch,
                      micro_batch_size=args.batch, weight_decay=0.0, eval_every=0, save_every=0,
                      log_every=args.warmup, device="cpu", num_threads=args.threads, resume=False)
    with tempfile.TemporaryDirectory() as out:
        train(model, sft_loss, batches, cfg, out, tokens_per_batch_fn=lambda b: int(b["num_tokens"]),
              on_log=on_log, description="lmforge sft")
    timed = windows[1:]  # the first window holds the warm-up steps
    tokens, seconds = sum(w[1] for w in timed), sum(w[2] for w in timed)
    return tokens / seconds, round(tokens / (len(timed) * args.warmup))


def bench_trl(model_dir: Path, convs, args) -> tuple[float, int]:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = CHATML_GENERATION
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    marks: list[float] = []
    counts: list[int] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(output_dir=out, max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch,
                           gradient_accumulation_steps=1, learning_rate=1e-4, lr_scheduler_type="constant",
                           weight_decay=0.0, max_length=args.seq, packing=True, assistant_only_loss=True,
                           use_cpu=True, bf16=False, fp16=False, report_to=[], logging_steps=10_000,
                           save_strategy="no", dataloader_num_workers=0, seed=0, disable_tqdm=True)
        trainer = SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(
            [{"messages": m} for m in convs]), processing_class=tok, callbacks=[Clock()])
        collate = trainer.data_collator

        def counting_collator(features):
            batch = collate(features)
            if "attention_mask" in batch:
                counts.append(int(batch["attention_mask"].sum()))
            else:  # padding-free: one flattened row of real tokens
                counts.append(int(batch["input_ids"].numel()))
            return batch

        trainer.data_collator = counting_collator
        torch.set_num_threads(args.threads)
        trainer.train()
    w = args.warmup
    tokens = sum(counts[w:w + args.steps])
    return tokens / (marks[-1] - marks[w - 1]), round(tokens / args.steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12, help="timed optimizer steps per side")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (also lmforge's log window)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--conversations", type=int, default=1500)
    args = ap.parse_args()
    if args.steps % args.warmup:
        ap.error("--steps must be a multiple of --warmup (lmforge's tokens/s is read per log window)")
    torch.set_num_threads(args.threads)

    convs = conversations(args.conversations)
    tokenizer = train_tokenizer(quiz_pages(1500) + [m["content"] for c in convs for m in c], vocab_size=8192)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq)
    with tempfile.TemporaryDirectory() as d:
        save_model_dir(d, Transformer(cfg), tokenizer)
        ours, ours_tokens = bench_lmforge(Path(d), tokenizer, convs, args)
        theirs, their_tokens = bench_trl(Path(d), convs, args)

    print(f"\nSFT training step, {args.batch} packed rows x {args.seq} tokens, fp32, {args.threads} threads, "
          f"{args.steps} timed steps after {args.warmup} warm-up, {len(convs)} conversations")
    print(f"{'implementation':<44} {'tokens/step':>11} {'tokens/s':>10} {'vs TRL':>7}")
    for name, tok_s, per_step in (("TRL SFTTrainer (packing, assistant_only_loss)", theirs, their_tokens),
                                  ("lmforge sft (packing, assistant-token loss)", ours, ours_tokens)):
        print(f"{name:<44} {per_step:>11,} {tok_s:>10,.0f} {tok_s / theirs:>6.2f}x")


if __name__ == "__main__":
    main()
