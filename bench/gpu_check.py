"""The GPU path in one command: throughput, MFU, memory and FSDP2's numerics, as one table.

    python bench/gpu_check.py                        # on a CUDA machine: the full check (meant to take < 8 min)
    python bench/gpu_check.py --smollm2 runs/smollm2 # SFT / DPO / GRPO / decode on SmolLM2-135M (lmforge import)
    python bench/gpu_check.py --smoke                # tiny shapes on the CPU in seconds (tests/test_gpu_check.py)

Rows:
  pretrain 124M / 350M   Llama-style configs (d768 L12, d1024 L24; vocab 32768, seq 2048), bf16 autocast, torch.compile,
                         fused AdamW: tokens/s and MFU = 6 N tokens/s / peak, N = parameters (tied embedding once),
                         peak = the GPU's dense bf16 FLOPs from train/loop.py PEAK_BF16_FLOPS (NVIDIA's datasheets:
                         H100 SXM and H200 989 TFLOPs). Beside it nanochat's published MFU, ~41-46% as issue 19 quotes
                         it (their figure, not measured here; their N and FLOP count may differ from ours).
  sft / dpo / grpo       `lmforge <stage>` on the SmolLM2 model directory (--smollm2; the row is skipped without one)
                         with the stages' built-in data (sft and grpo packed, train.packed_attention=flex on CUDA;
                         the CPU smoke run leaves them at auto, i.e. sdpa): optimizer steps/s, the median of the logged step times after
                         the first two (compile and warm-up).
  decode b1 / b16 / b64  generation.generate, sampled, no stop tokens: new tokens/s over the batch (CUDA-graph decode,
                         SamplingParams.compile, on CUDA).
  packed sdpa / flex     forward + backward of the first config on packed rows (16 documents of uneven lengths per
                         row): SDPA with the dense document mask vs FlexAttention's block mask (train.packed_attention),
                         tokens/s, peak memory and the flex loss's difference from sdpa's.
  fsdp2 = plain          3 AdamW steps sharded by FSDP2 over a 1-process group against the plain model: the largest
                         loss difference (should be ~0).
Peak memory is torch.cuda.max_memory_allocated per row (CUDA only). No GPU numbers exist yet: the table is to be taken
on the first GPU machine lent to the project.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as td

from lmforge.generation import SamplingParams, generate
from lmforge.model import ModelConfig, Transformer
from lmforge.modelio import load_model_dir, save_model_dir
from lmforge.tokenizer import train_tokenizer
from lmforge.train.dist import DistInfo, is_dtensor, is_sharded, shard_model
from lmforge.train.loop import TrainConfig, autocast_context, peak_flops
from lmforge.train.optim import build_optimizer

LLAMA = {"124M": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
         "350M": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16)}
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
NANOCHAT = "nanochat ~41-46% MFU (published)"
FULL = dict(vocab=32768, seq=2048, batch={"124M": 16, "350M": 8}, steps=10, stage_steps=12, decode_tokens=128,
            configs=LLAMA, packed_docs=16)
SMOKE = dict(vocab=256, seq=64, batch={"tiny": 2}, steps=2, stage_steps=3, decode_tokens=4, configs={"tiny": TINY},
             packed_docs=4)


def peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def llama(shape: dict, vocab: int, seq: int) -> Transformer:
    heads = shape["num_attention_heads"]
    return Transformer(ModelConfig(vocab_size=vocab, num_key_value_heads=heads, max_position_embeddings=seq, **shape))


def pretrain_row(name: str, shape: dict, s: dict, device: torch.device, bf16: bool, compile: bool) -> dict:
    """Timed AdamW steps of the loop's parts (autocast, torch.compile, build_optimizer's fused AdamW) on random
    tokens: ``steps`` warm-up steps, then ``steps`` timed ones."""
    reset_memory(device)
    torch.manual_seed(0)
    model = llama(shape, s["vocab"], s["seq"]).to(device)
    n = model.num_params()
    cfg = TrainConfig(lr=3e-4, dtype="bfloat16" if bf16 else "float32", compile=compile, device=str(device))
    optimizer = build_optimizer(model, cfg)
    fwd = torch.compile(model) if compile else model
    batch = s["batch"][name]
    tokens = torch.randint(0, s["vocab"], (batch, s["seq"] + 1), device=device)
    def step():
        with autocast_context(cfg, device):
            loss = fwd(tokens[:, :-1], labels=tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    tok_s = batch * s["seq"] * s["steps"] / timed_steps(step, s["steps"], device)
    peak = peak_flops(device)
    return {"row": f"pretrain {name}", "value": tok_s, "unit": "tokens/s", "params_M": n / 1e6,
            "mfu": 6 * n * tok_s / peak if peak else None, "peak_mib": peak_memory(device),
            "reference": NANOCHAT if device.type == "cuda" else ""}


def timed_steps(step, steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` calls of ``step`` after as many untimed warm-up calls (compile, allocator, caches)."""
    for _ in range(steps):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return time.perf_counter() - t0


def packed_attention_rows(s: dict, device: torch.device, bf16: bool) -> list[dict]:
    """Forward + backward of a packed batch (``packed_docs`` documents of uneven lengths per row) with
    packed_attention = sdpa (dense document mask) and = flex (block mask): tokens/s, peak memory and the largest
    loss difference. On CUDA the flex side is compiled flex_attention; on the CPU (smoke) its eager operator."""
    name, shape = next(iter(s["configs"].items()))
    torch.manual_seed(0)
    model = llama(shape, s["vocab"], s["seq"]).to(device)
    batch, seq, g = s["batch"][name], s["seq"], torch.Generator().manual_seed(0)
    cuts = [torch.randperm(seq - 1, generator=g)[:s["packed_docs"] - 1].add(1).sort().values for _ in range(batch)]
    docs = torch.stack([torch.bucketize(torch.arange(seq), c, right=True) for c in cuts]).to(device)
    tokens = torch.randint(0, s["vocab"], (batch, seq), device=device)
    cfg = TrainConfig(dtype="bfloat16" if bf16 else "float32", device=str(device))
    rows, losses = [], {}
    for side in ("sdpa", "flex"):
        model.packed_attention = side
        reset_memory(device)
        def step(side=side):
            with autocast_context(cfg, device):
                loss = model(tokens, labels=tokens, document_ids=docs)
            loss.backward()
            model.zero_grad(set_to_none=True)
            losses[side] = loss.item()

        seconds = timed_steps(step, s["steps"], device)
        rows.append({"row": f"packed {side} fwd+bwd", "value": batch * seq * s["steps"] / seconds,
                     "unit": "tokens/s", "peak_mib": peak_memory(device),
                     "reference": f"{s['packed_docs']} docs/row, seq {seq}"})
    rows[1]["reference"] += f", |loss - sdpa's| {abs(losses['flex'] - losses['sdpa']):.1e}"
    return rows


def fsdp_row(device: torch.device) -> dict:
    """FSDP2 over a 1-process group: the same 3 AdamW steps as the plain model; the largest loss difference."""
    if not td.is_initialized():
        td.init_process_group("nccl" if device.type == "cuda" else "gloo", store=td.HashStore(), rank=0,
                              world_size=1)
    torch.manual_seed(0)
    plain = llama(TINY, 256, 64).to(device)
    sharded = shard_model(copy.deepcopy(plain), DistInfo(device=device, world_size=1)).to(device)
    assert is_sharded(sharded) and all(is_dtensor(p) for p in sharded.parameters())
    tokens = torch.randint(0, 256, (4, 65), device=device)
    losses = []
    for model in (plain, sharded):
        optimizer = build_optimizer(model, TrainConfig(lr=1e-2))
        for _ in range(3):
            loss = model(tokens[:, :-1], labels=tokens[:, 1:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    td.destroy_process_group()
    diff = max(abs(a - b) for a, b in zip(losses[:3], losses[3:]))
    return {"row": "fsdp2 = plain (3 steps)", "value": diff, "unit": "max |loss diff|", "reference": "~0"}


def decode_rows(model_dir: Path, s: dict, device: torch.device) -> list[dict]:
    """generate() at batch 1, 16 and 64: new tokens/s (after one untimed warm-up call per batch size)."""
    model = load_model_dir(model_dir, device=device).eval()
    rows = []
    for batch in (1, 16, 64):
        reset_memory(device)
        params = SamplingParams(max_new_tokens=s["decode_tokens"], temperature=1.0, seed=0,
                                compile=device.type == "cuda")
        prompts = [[1 + (i + j) % 200 for j in range(16)] for i in range(batch)]
        generate(model, prompts, params, eos_token_ids=[])
        sync(device)
        t0 = time.perf_counter()
        out = generate(model, prompts, params, eos_token_ids=[])
        sync(device)
        made = sum(len(c.token_ids) for row in out for c in row)
        rows.append({"row": f"decode b{batch}", "value": made / (time.perf_counter() - t0), "unit": "tokens/s",
                     "peak_mib": peak_memory(device), "reference": ""})
    return rows


STAGE_ARGS = {"sft": ["seq_len=256"], "dpo": [], "grpo": ["max_new_tokens=32", "prompts_per_rollout=8",
                                                         "num_generations=4", "train.batch_size=32",
                                                         "train.micro_batch_size=16"]}


def stage_row(stage: str, model_dir: Path, steps: int, work: Path, smoke: bool) -> dict:
    """`lmforge <stage>` for ``steps`` optimizer steps; steps/s from the logged step times after the first two."""
    out = work / stage
    args = [f"model={model_dir}", f"out_dir={out}", f"train.max_steps={steps}", "train.log_every=1",
            "train.eval_every=0", "train.save_every=0", "train.warmup_steps=0", "train.report_to=[jsonl]",
            *STAGE_ARGS[stage]]
    if stage in ("sft", "grpo") and not smoke:  # packed batches: measure them through FlexAttention (auto's
        args.append("train.packed_attention=flex")  # CUDA choice, named so that the row says what it ran)
    if smoke:
        args += ["train.batch_size=4", "train.micro_batch_size=4", "train.device=cpu"]
        args += {"sft": ["max_examples=64", "seq_len=64"], "dpo": ["data.max_rows=64"],
                 "grpo": ["max_new_tokens=4", "prompts_per_rollout=1", "num_generations=4", "data.eval_size=2"]}[stage]
    proc = subprocess.run([sys.executable, "-m", "lmforge", stage, *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if proc.returncode != 0:
        raise RuntimeError(f"lmforge {stage} failed:\n{proc.stderr[-3000:]}")
    times = [r["step_time"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "step_time" in r]
    timed = times[2:] or times
    return {"row": f"{stage} steps/s", "value": 1 / statistics.median(timed), "unit": "steps/s", "reference": ""}


def micro_model_dir(path: Path) -> Path:
    """A random micro chat model (2 blocks of 32) with a small BPE tokenizer: the smoke run's SmolLM2."""
    texts = [f"What is {a} + {b}? The answer is {a + b}." for a in range(20) for b in range(20)]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, num_key_value_heads=1,
                                    max_position_embeddings=512, **TINY))
    return save_model_dir(path, model, tokenizer)


def print_table(rows: list[dict], title: str) -> None:
    print(title)
    print(f"{'check':<26} {'value':>14} {'unit':<16} {'MFU':>7} {'peak MiB':>9}  reference")
    for r in rows:
        value = r["value"]
        shown = "skipped" if value is None else f"{value:.3g}" if value < 1 else f"{value:,.1f}"
        mfu = "" if r.get("mfu") is None else f"{r['mfu']:.1%}"
        mem = "" if r.get("peak_mib") is None else f"{r['peak_mib']:,.0f}"
        print(f"{r['row']:<26} {shown:>14} {r['unit']:<16} {mfu:>7} {mem:>9}  {r.get('reference', '')}")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (seconds)")
    ap.add_argument("--smollm2", default="runs/smollm2", help="SmolLM2-135M model dir (`lmforge import smollm2`)")
    ap.add_argument("--json", default="", help="also write the rows here")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda and not args.smoke:
        raise SystemExit("no CUDA device: run with --smoke for the CPU check of this script")
    s = SMOKE if args.smoke else FULL
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    rows = [pretrain_row(name, shape, s, device, bf16=cuda, compile=cuda) for name, shape in s["configs"].items()]
    rows += packed_attention_rows(s, device, bf16=cuda)
    rows.append(fsdp_row(device))
    model_dir = micro_model_dir(work / "micro") if args.smoke else Path(args.smollm2)
    if (model_dir / "config.json").exists():
        rows += [stage_row(stage, model_dir, s["stage_steps"], work, args.smoke) for stage in STAGE_ARGS]
        rows += decode_rows(model_dir, s, device)
    else:
        rows += [{"row": name, "value": None, "unit": f"no {model_dir}", "reference": ""}
                 for name in ("sft steps/s", "dpo steps/s", "grpo steps/s", "decode b1/b16/b64")]
    name = torch.cuda.get_device_name(device) if cuda else "CPU (smoke: tiny shapes, fp32, no compile)"
    print_table(rows, f"gpu_check on {name}, torch {torch.__version__}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=lambda v: None if v != v else v) + "\n")
    assert all(r["value"] is None or math.isfinite(r["value"]) for r in rows), rows
    return rows


if __name__ == "__main__":
    main()
