"""GRPO throughput: `lmforge grpo`'s code path vs TRL's GRPOTrainer (no vLLM) on the same tiny model.

    python bench/bench_grpo.py [--steps 4] [--threads 2] [--skip-trl] [--no-compile]

Both: the same random Llama-layout model (hidden 256, 4 layers, 4 heads, 2 kv heads, ffn 688, vocab 8192) and
tokenizer, 4 prompts x 4 generations per step, exactly 64 new tokens (no EOS), beta 0.04 (so both score a
frozen reference), one optimizer step per rollout, fp32 on CPU. Each step = generate + reward + log-probs +
loss + backward + AdamW. Prints prompts/s side by side (warm-up steps excluded); the row "+ compile" generates
with compile_generation=true, whose first step holds the torch.compile warm-up (printed).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lmforge.data.prompts import render_prompt
from lmforge.data.sources import read_documents
from lmforge.model import ModelConfig, Transformer
from lmforge.modelio import load_model_dir, load_tokenizer, save_model_dir
from lmforge.rollout import (
    DiskReference,
    RolloutStream,
    grpo_loss_fn,
    grpo_rollout,
    sample_as_trained,
    trim_before_embedding_backward,
)
from lmforge.stages.grpo import GRPOConfig
from lmforge.tokenizer import train_tokenizer
from lmforge.train.loop import TrainConfig, train

PROMPTS = ["ROMEO:", "JULIET: O", "First Citizen:", "KING HENRY:", "HAMLET: To be", "MERCUTIO: Nay",
           "LADY MACBETH:", "PROSPERO: Now"]


def token_reward(completion_ids: list[list[int]]) -> list[float]:
    return [float(sum(ids) % 7) for ids in completion_ids]  # cheap, and differs between samples


def build_model_dir(path: Path) -> None:
    tok = train_tokenizer(read_documents("builtin:tinyshakespeare"), 8192)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=256, intermediate_size=688,
                                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=256))
    save_model_dir(path, model, tok)


def bench_lmforge(model_dir: Path, out: Path, steps: int, warmup: int, compile_generation: bool = False,
                  first_step: list | None = None, gradient_checkpointing: bool = False,
                  ref_offload: bool = False, dtype: str = "float32") -> float:
    tok = load_tokenizer(model_dir)
    policy = load_model_dir(model_dir)
    ref = DiskReference(model_dir, "cpu") if ref_offload else load_model_dir(model_dir).eval().requires_grad_(False)
    cfg = GRPOConfig(prompts_per_rollout=4, num_generations=4, max_new_tokens=64, beta=0.04,
                     compile_generation=compile_generation, gradient_checkpointing=gradient_checkpointing,
                     ref_offload=ref_offload,
                     train=TrainConfig(lr=1e-6, schedule="constant", warmup_steps=0, max_steps=warmup + steps,
                                       batch_size=16, micro_batch_size=16, weight_decay=0.0, eval_every=0,
                                       save_every=0, log_every=1, device="cpu", dtype=dtype))
    policy.gradient_checkpointing = cfg.gradient_checkpointing  # as run_grpo sets it
    sample_as_trained(policy, cfg.train, torch.device("cpu"))  # as start_rl_run does: bf16 rollouts under bf16
    trim_before_embedding_backward(policy)  # and this, on CPU
    rows = [{"prompt": p, "answer": None} for p in PROMPTS]
    ids = [render_prompt(tok, p, chat_template=False) for p in PROMPTS]

    def reward(inp):
        r = torch.tensor(token_reward(inp.completion_ids))
        return r, {"tokens": r}
    # no EOS: every completion runs the full 64 tokens, as in TRL's run below
    stream = RolloutStream(grpo_rollout(cfg, policy, ref, None, rows, ids, reward, torch.device("cpu")),
                           epochs=1, micro_batch_size=16, seed=0)
    stamps = {0: time.perf_counter()}
    train(policy, grpo_loss_fn(cfg), stream, cfg.train, out,
          on_log=lambda step, m: stamps.__setitem__(step, time.perf_counter()))
    if first_step is not None:
        first_step.append(stamps[1] - stamps[0])
    return 4 * steps / (stamps[warmup + steps] - stamps[warmup])


def bench_trl(model_dir: Path, out: Path, steps: int, warmup: int, bf16: bool = False) -> float:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model.generation_config.eos_token_id = None  # run the full 64 tokens, like lmforge's run
    stamps = {}

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps[state.global_step] = time.perf_counter()

    def reward(completions, completion_ids=None, **kw):
        return token_reward(completion_ids)

    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=16, num_generations=4,
                      max_completion_length=64, max_steps=warmup + steps, learning_rate=1e-6, beta=0.04,
                      logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=bf16,
                      temperature=1.0, top_k=0, top_p=1.0, disable_tqdm=True, dataloader_num_workers=0)
    data = Dataset.from_dict({"prompt": PROMPTS * 64})
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                          callbacks=[Stamp()])
    trainer.train()
    return 4 * steps / (stamps[warmup + steps] - stamps[warmup])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip the compile_generation row")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        build_model_dir(d / "model")
        ours = bench_lmforge(d / "model", d / "lmforge", args.steps, args.warmup)
        rows.append(("lmforge grpo", ours))
        first_step = []
        if not args.no_compile:
            rows.append(("lmforge grpo + compile", bench_lmforge(d / "model", d / "lmforge_compile", args.steps,
                                                                 args.warmup, True, first_step)))
        if not args.skip_trl:
            rows.append((f"TRL {__import__('trl').__version__} GRPOTrainer (no vLLM)",
                         bench_trl(d / "model", d / "trl", args.steps, args.warmup)))
    base = rows[-1][1] if not args.skip_trl else rows[0][1]  # TRL, else lmforge's default
    print(f"\nGRPO step: 4 prompts x 4 generations x 64 new tokens, beta 0.04, fp32 CPU, {args.threads} threads, "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    print(f"{'implementation':<40} {'prompts/s':>10} {'s/step':>8} {'vs TRL':>8}")
    for name, v in rows:
        print(f"{name:<40} {v:>10.2f} {4 / v:>8.2f} {v / base:>7.2f}x")
    if first_step:
        print(f"lmforge grpo + compile: first (warm-up) step {first_step[0]:.1f} s, compile included")


if __name__ == "__main__":
    main()
