"""The preference and RL stages on micro models through their CLI entry points (each stage's ``main``), for
test_fsdp_stages.py; run alone or under torchrun, with train.parallel=ddp or fsdp, all in one process group.

    python tests/fsdp_stages.py FIXTURES OUT PARALLEL [JOB ...]
    torchrun --nproc_per_node=2 tests/fsdp_stages.py FIXTURES OUT fsdp [JOB ...]

FIXTURES holds what write_fixtures made. Each job trains into OUT/JOB; no JOB given: all of them. ``*_cut`` jobs
are stopped after a step as a signal stops them (the loop checkpoints that step and raises TrainingInterrupted),
then run again: the resumed run must equal the uninterrupted job. No periodic checkpoints: under fsdp they also
gather the whole weights, which would hide a rollout reading stale ones.
"""

import sys
from pathlib import Path

from preference_helpers import easy_pairs, micro_model_dir, write_jsonl
from test_rollout import make_model_dir, write_rl_prompts

import lmforge.train.loop as loop
from lmforge.stages import dpo, grpo, kto, online_dpo, ppo, reward
from lmforge.train.dist import cleanup, init_distributed
from lmforge.train.loop import TrainingInterrupted

STEP = ["train.schedule=constant", "train.warmup_steps=0", "train.log_every=1", "train.eval_every=0",
        "train.save_every=0", "train.num_threads=1", "train.device=cpu", "train.weight_decay=0.0"]


def write_fixtures(fx: Path) -> None:
    """Micro models and data: an SFT-like model with a ChatML tokenizer and preference pairs; an RL policy, a
    reward model and prompts with answers."""
    micro_model_dir(fx / "sft")
    write_jsonl(fx / "pairs.jsonl", easy_pairs(32))
    make_model_dir(fx / "policy")
    make_model_dir(fx / "rm", seed=3, num_labels=1)
    write_rl_prompts(fx / "rl.jsonl", n=12)


def preference(fx: Path) -> list[str]:
    return [f"model={fx / 'sft'}", f"data.source={fx / 'pairs.jsonl'}", "data.eval_fraction=0.25",
            "train.batch_size=4", "train.micro_batch_size=2", "train.lr=1e-3", *STEP]


def rl(fx: Path) -> list[str]:
    return [f"model={fx / 'policy'}", f"data.source={fx / 'rl.jsonl'}", f"data.eval_source={fx / 'rl.jsonl'}",
            "data.eval_size=4", "max_new_tokens=6", "train.lr=1e-3", *STEP]


def jobs(fx: Path) -> dict[str, tuple]:
    """name -> (stage module, CLI arguments, the step after which a first run is interrupted, or None)."""
    grpo_args = [*rl(fx), "prompts_per_rollout=2", "num_generations=4", "train.batch_size=4",
                 "train.micro_batch_size=2", f"rewards=[{{kind: model, path: {fx / 'rm'}}}]", "beta=0.04"]
    ppo_args = [*rl(fx), f"rewards=[{{kind: model, path: {fx / 'rm'}}}]", "num_generations=1",
                "prompts_per_rollout=4", "epochs=1", "train.batch_size=4", "train.micro_batch_size=2"]
    odpo_args = [*rl(fx), f"rewards=[{{kind: model, path: {fx / 'rm'}}}]", "rounds=1", "prompts_per_round=8",
                 "num_generations=4", "epochs=1.0", "train.batch_size=4", "train.micro_batch_size=2"]
    return {
        "dpo": (dpo, [*preference(fx), "train.max_steps=4", "beta=0.1"], None),
        "dpo_cut": (dpo, [*preference(fx), "train.max_steps=4", "beta=0.1"], 2),
        "dpo_sync": (dpo, [*preference(fx), "train.max_steps=4", "sync_ref_model=true", "ref_model_sync_steps=1",
                     "ref_model_mixup_alpha=0.5"], None),  # a live reference that follows the policy
        "dpo_bf16": (dpo, [*preference(fx), "train.max_steps=4", "train.dtype=bfloat16"], None),  # mixed precision
        "kto": (kto, [*preference(fx), "train.max_steps=4"], None),
        "reward": (reward, [*preference(fx), "train.max_steps=4"], None),
        "grpo": (grpo, [*grpo_args, "train.max_steps=8"], None),  # 4 steps per rollout
        "grpo_cut": (grpo, [*grpo_args, "train.max_steps=8"], 6),  # stops in the second rollout
        "ppo": (ppo, [*ppo_args, "train.max_steps=4"], None),
        "online_dpo": (online_dpo, odpo_args, None),
    }


def stop_after(step: int):
    """loop.after_step as it runs when a signal reached a rank during ``step``: checkpoint, then stop everywhere."""
    after_step = loop.after_step

    def stopping(s, window, progress, stop, signum=None):
        after_step(s, window, progress, stop or s.step == step, signum)
    return stopping


def main(fx: Path, out: Path, parallel: str, names: list[str]) -> None:
    init_distributed("cpu")
    table = jobs(fx)
    for name in names or list(table):
        stage, args, cut = table[name]
        args = [*args, f"out_dir={out / name}", f"train.parallel={parallel}"]
        if cut is not None:
            after_step, loop.after_step = loop.after_step, stop_after(cut)
            try:
                stage.main(args)
                raise AssertionError(f"{name}: the run was not interrupted")
            except TrainingInterrupted:
                pass
            finally:
                loop.after_step = after_step
        stage.main(args)
    cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4:])
