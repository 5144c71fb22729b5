"""Every CLI verb in one table: its module, its line of ``lmforge --help`` and, for a stage the pipeline can run,
its config class and run function. cli.py dispatches with it and the pipeline runs its stages with it.

Nothing is imported here (a module is named, not loaded), so ``lmforge --help`` reads the table without torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Verb:
    module: str  # imported when the verb runs; its main(argv) is the verb
    help: str
    config: str = ""  # a stage's config dataclass and run_<stage>(cfg) function: what the pipeline calls
    run: str = ""


# The order is the order of `lmforge --help` (and, for the stages, of the pipeline).
VERBS: dict[str, Verb] = {
    "pipeline": Verb("lmforge.apps.pipeline", "the whole recipe: pretrain -> midtrain -> SFT -> RM -> DPO -> GRPO -> "
                     "PPO -> report (the built-in tiny one by default)"),
    "data": Verb("lmforge.stages.data", "clean a corpus: quality filters, exact + MinHash near-dedup, language, "
                 "shards, report"),
    "tokenizer": Verb("lmforge.stages.tokenizer", "train a byte-level BPE tokenizer on a corpus"),
    "pretrain": Verb("lmforge.stages.pretrain", "pre-train a decoder-only transformer (next-token prediction)",
                     "PretrainConfig", "run_pretrain"),
    "midtrain": Verb("lmforge.stages.midtrain", "continue pre-training a base model on a curated weighted data mix",
                     "MidtrainConfig", "run_midtrain"),
    "sft": Verb("lmforge.stages.sft", "supervised fine-tuning on chat data (loss on assistant tokens; full or LoRA)",
                "SFTConfig", "run_sft"),
    "import": Verb("lmforge.stages.importer", "import a HF Llama-family dir, hub id, .gguf file, or smollm2 (PyPI)"),
    "quantize": Verb("lmforge.stages.quantize", "int8 / int4 weight-only quantisation of a model dir (size, ppl, "
                     "speed)"),
    "export": Verb("lmforge.stages.export", "write a model dir as one GGUF file (f32/f16/q8_0) for llama.cpp / "
                   "ollama"),
    "chat": Verb("lmforge.stages.chat", "multi-turn chat with any checkpoint (REPL, message=..., or piped stdin)"),
    "serve": Verb("lmforge.apps.serve", "OpenAI-compatible chat server (/v1/chat/completions) with a web chat page"),
    "reward": Verb("lmforge.stages.reward", "train a reward model on preference pairs (Bradley-Terry); "
                   "`reward score`", "RewardConfig", "run_reward"),
    "dpo": Verb("lmforge.stages.dpo", "DPO family on preference pairs: sigmoid/ipo/hinge/robust/simpo/orpo; "
                "`dpo sweep`", "DPOConfig", "run_dpo"),
    "kto": Verb("lmforge.stages.kto", "KTO on unpaired good/bad examples (prompt, completion, label)",
                "KTOConfig", "run_kto"),
    "online-dpo": Verb("lmforge.stages.online_dpo", "online / iterative DPO: sample, label by verifier or RM, DPO; "
                       "k rounds", "OnlineDPOConfig", "run_online_dpo"),
    "grpo": Verb("lmforge.stages.grpo", "GRPO / RLOO (algorithm=rloo) on prompts with verifiable or model rewards",
                 "GRPOConfig", "run_grpo"),
    "ppo": Verb("lmforge.stages.ppo", "PPO RLHF: policy, reference, reward model, critic; GAE, KL penalty",
                "PPOConfig", "run_ppo"),
    "prm": Verb("lmforge.stages.prm", "process reward model on stepwise data or policy traces (step checker / "
                "Monte-Carlo labels); first-error F1", "PRMConfig", "run_prm"),
    "sample": Verb("lmforge.stages.sample", "print continuations of a prompt from any checkpoint"),
    "generate": Verb("lmforge.stages.generate", "sample completions for a file of prompts (jsonl in, jsonl out)"),
    "think": Verb("lmforge.stages.think", "inference-time scaling: best-of-N, self-consistency, thinking budgets",
                   "ThinkConfig", "run_think"),
    "constitutional": Verb("lmforge.apps.constitutional_run", "constitutional AI: revise (critique->revision SFT "
                           "data), label (RLAIF soft preferences), eval"),
    "scaling": Verb("lmforge.stages.scaling", "scaling laws: sweep, fit L(N,D), compute-optimal N and D"),
    "eval": Verb("lmforge.stages.eval", "evaluate a checkpoint: task accuracy, preference accuracy, win rate, KL, "
                 "ppl"),
    "push": Verb("lmforge.stages.push", "upload a model directory to the Hugging Face Hub with a generated model "
                 "card"),
    "report": Verb("lmforge.apps.report", "Markdown + HTML report of a pipeline run: stage table, samples, curves, "
                   "plots"),
}
