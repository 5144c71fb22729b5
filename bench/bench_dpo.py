"""DPO training throughput and peak memory: lmforge's `dpo` stage vs TRL's DPOTrainer on the same tiny model.

    python bench/bench_dpo.py [--steps 12] [--warmup 3] [--threads 2]

Model: hidden 256, 4 layers, 4 heads (2 kv), ffn 688, vocab 8192, fp32 (bench_train_step.py's). Data: random
word-level sequences, prompt 64 tokens, chosen and rejected 128 tokens + eos each, batch 8 pairs, sigmoid DPO,
beta 0.1, AdamW. Both sides see the same token ids (a word-level tokenizer maps each word to one id).

Each configuration runs in its own subprocess, so its memory is its own:
  - pairs/s: optimizer steps after the warm-up steps, timed per step (lmforge: the loop's step_time; TRL: a
    TrainerCallback around each step), x batch size. Reference precomputation is done before the timed steps
    in both (reported separately for lmforge).
  - peak RSS: the process's resident-set high-water mark (getrusage ru_maxrss), which includes the interpreter,
    torch and (for TRL) transformers/trl imports; "train peak" subtracts the RSS measured just before training
    starts (after imports, model and data), i.e. what training itself added at its peak.
On a shared CPU these numbers move with the load; run it twice and read them with `uptime`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from lmforge.data.preference import Batches, TokenPair, collate_pairs, pair_length
from lmforge.model import ModelConfig, Transformer
from lmforge.modelio import save_model_dir
from lmforge.scoring import precompute_reference, store_pair_logps
from lmforge.stages.dpo import DPOConfig
from lmforge.train.loop import TrainConfig, train
from lmforge.train.preference import dpo_loss_fn

VOCAB, PROMPT, COMPLETION, BATCH = 8192, 64, 128, 8


def rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def make_model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512))


def make_pairs(n: int, eos: int):
    rng = random.Random(0)
    words = lambda k: [rng.randrange(4, VOCAB) for _ in range(k)]  # noqa: E731  ids 0-3: special tokens
    return [(words(PROMPT), words(COMPLETION) + [eos], words(COMPLETION) + [eos]) for _ in range(n)]


def word_tokenizer():
    """A transformers fast tokenizer in which the word "w{i}" is token i: text and ids map one to one."""
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")


def run_lmforge(args) -> dict:
    torch.set_num_threads(args.threads)
    model = make_model()
    total = args.warmup + args.steps
    pairs = [TokenPair(p, c, r) for p, c, r in make_pairs(total * BATCH, eos=1)]
    cfg = DPOConfig(reference="live" if args.live else "precompute", train=TrainConfig(
        lr=1e-6, warmup_steps=0, max_steps=total, batch_size=BATCH, micro_batch_size=BATCH, weight_decay=0.0,
        eval_every=0, save_every=0, log_every=1, dtype="float32", device="cpu", resume=False))
    rss_before = rss_now_mb()
    t0 = time.perf_counter()
    ref_model = None
    if args.live:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    else:
        precompute_reference(model, pairs, lambda b: collate_pairs(b, 0), store_pair_logps, pair_length,
                             2 * BATCH, "cpu")
    precompute_s = time.perf_counter() - t0
    times: list[float] = []
    cpu: list[float] = []

    def on_log(step, metrics):
        times.append(metrics["step_time"])
        cpu.append(time.process_time())

    batches = Batches(pairs, BATCH, lambda b: collate_pairs(b, 0), seed=0, length=pair_length)
    with tempfile.TemporaryDirectory() as out:
        train(model, dpo_loss_fn(cfg, ref_model=ref_model), batches, cfg.train, out,
              on_log=on_log, description="lmforge dpo")
    timed = times[args.warmup:]
    return {"pairs_per_s": BATCH * len(timed) / sum(timed), "precompute_s": precompute_s,
            "pairs_per_cpu_s": BATCH * (len(cpu) - 1 - args.warmup) / (cpu[-1] - cpu[args.warmup]),
            "peak_rss_mb": peak_rss_mb(), "train_peak_mb": peak_rss_mb() - rss_before}


def run_trl(args) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(args.threads)
    total = args.warmup + args.steps
    model_dir = tempfile.TemporaryDirectory()  # kept: TRL loads its reference model from the same path
    save_model_dir(model_dir.name, make_model())
    model = AutoModelForCausalLM.from_pretrained(model_dir.name, dtype=torch.float32, attn_implementation="sdpa")
    text = lambda ids: " ".join(f"w{i}" for i in ids)  # noqa: E731
    rows = [{"prompt": text(p), "chosen": " " + text(c[:-1]), "rejected": " " + text(r[:-1])}
            for p, c, r in make_pairs(total * BATCH, eos=1)]  # TRL appends the eos itself
    times: list[float] = []
    cpu: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)
            cpu.append(time.process_time() - self.c)

    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(output_dir=out, per_device_train_batch_size=BATCH, max_steps=total, learning_rate=1e-6,
                           beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=args.precompute,
                           logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                           dataloader_num_workers=0, max_length=None, disable_tqdm=True, seed=0)
        trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=word_tokenizer(), callbacks=[StepTimer()])
        batch = trainer.train_dataset[0]
        assert len(batch["prompt_ids"]) == PROMPT and len(batch["chosen_ids"]) == COMPLETION + 1, "tokenization"
        rss_before = rss_now_mb()
        trainer.train()
    timed = times[args.warmup:]
    return {"pairs_per_s": BATCH * len(timed) / sum(timed), "pairs_per_cpu_s": BATCH * len(timed) / sum(cpu[args.warmup:]),
            "peak_rss_mb": peak_rss_mb(),
            "train_peak_mb": peak_rss_mb() - rss_before}


CONFIGS = [  # (label, child arguments)
    ("TRL DPOTrainer (reference model live)", ["--impl", "trl"]),
    ("TRL DPOTrainer (precompute_ref_log_probs)", ["--impl", "trl", "--precompute"]),
    ("lmforge dpo (reference=live)", ["--impl", "lmforge", "--live"]),
    ("lmforge dpo (reference=precompute, default)", ["--impl", "lmforge"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--impl", choices=["trl", "lmforge"], help=argparse.SUPPRESS)
    ap.add_argument("--precompute", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--live", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--only", choices=["trl", "lmforge"], help="run one side only")
    args = ap.parse_args()
    if args.impl:
        result = run_lmforge(args) if args.impl == "lmforge" else run_trl(args)
        print("RESULT " + json.dumps(result))
        return
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    rows = []
    for label, extra in CONFIGS:
        if args.only and args.only not in extra:
            continue
        proc = subprocess.run([sys.executable, __file__, *extra, *common], capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{label}: failed\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append((label, json.loads(line.removeprefix("RESULT "))))
    print(f"\nDPO training, batch {BATCH} pairs x (prompt {PROMPT} + {COMPLETION}+1 tokens) x 2, fp32, "
          f"{args.threads} threads, {args.steps} timed steps after {args.warmup}; load {os.getloadavg()[0]:.1f}")
    print(f"{'implementation':<46} {'pairs/s':>8} {'pairs/CPU-s':>12} {'peak RSS MiB':>13} {'train peak MiB':>15}")
    for label, r in rows:
        print(f"{label:<46} {r['pairs_per_s']:>8.2f} {r['pairs_per_cpu_s']:>12.2f} {r['peak_rss_mb']:>13.0f} "
              f"{r['train_peak_mb']:>15.0f}")
    pre = [r for label, r in rows if "precompute, default" in label]
    if pre:
        print(f"(lmforge's reference pass over {BATCH * (args.steps + args.warmup)} pairs took "
              f"{pre[0]['precompute_s']:.1f} s, before the timed steps)")


if __name__ == "__main__":
    main()
