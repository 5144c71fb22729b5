"""``lmforge eval``: score a checkpoint; every metric is optional and runs when its inputs are given.

    task=tinyworld|thinkworld|gsm8k|svamp|math500|jsonl [data=FILE]   accuracy, format rate, response length,
                       hacking probes; rows with a "level" (thinkworld) also get accuracy by difficulty level
    thinking_budget=N  budget forcing for models with a think block (min_thinking_tokens=M: "Wait" below M);
                       thinking and answer tokens are counted apart
    reference=DIR      KL(model || reference) on the model's own samples; the reference's accuracy and length, and
                       accuracy_gain: model minus reference, paired over the same problems, with its interval
    reward_model=DIR   mean reward of the answers; with prefs=FILE its preference accuracy; the judge for compare
    compare=DIR        win rate of model against compare, judged by reward_model
    perplexity=SPEC    validation loss on texts (file, dir, glob, builtin:NAME) or a token-shards directory
    harness=TASK[,TASK]  EleutherAI lm-evaluation-harness tasks on lmforge's engine (lmforge.harness);
                       harness_include=DIR adds a directory of local task YAMLs; limit=N docs per task

Every rate comes with a 95% bootstrap interval. Writes eval.json (the summary) and records.jsonl (one row per
answer / pair / comparison, for reading what the model actually said) into out_dir (default: next to the
model directory, ``runs/x/sft/model`` -> ``runs/x/sft/eval``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lmforge import evaluation as ev
from lmforge.config import parse_cli, save_config
from lmforge.data.preference import read_pairs
from lmforge.data.sources import read_documents
from lmforge.data.tinyworld import is_formatted
from lmforge.errors import ConfigError, DataError
from lmforge.evaluation import TASKS
from lmforge.modelio import DTYPES, load_model_and_tokenizer, load_model_dir, weight_names
from lmforge.scoring import reward_scores


@dataclass
class EvalConfig:
    model: str = ""  # the model to evaluate: a model directory (or hub id)
    task: str = ""  # tinyworld | thinkworld | gsm8k | svamp | math500 | jsonl; empty: no task accuracy
    data: str = ""  # the task's .jsonl / .jsonl.gz (every task but tinyworld and thinkworld)
    limit: int = 100  # first N problems, pairs and prompts (0 = all); thinkworld: problems per level
    thinking_budget: int | None = None  # most thinking tokens per answer (forced </think>); None = no budget
    min_thinking_tokens: int = 0  # an earlier </think> becomes "Wait" (s1)
    num_waits: int = 0  # the first num_waits closes of the think block become "Wait" (s1)
    chat: bool = True  # prompts through the chat template; false: raw text (base models)
    max_new_tokens: int = 256
    n: int = 1  # samples per problem; n > 1 samples at temperature 1 and adds pass@n
    reference: str = ""  # KL to this model, and its accuracy / length on the same problems
    reward_model: str = ""  # a reward model directory (score head)
    prefs: str = ""  # held-out preference pairs {"prompt","chosen","rejected"} for reward_model
    compare: str = ""  # a second model: win rate of model vs compare, judged by reward_model
    perplexity: str = ""  # texts or a token-shards dir (meta.json) for validation loss
    seq_len: int = 256  # perplexity window
    perplexity_batches: int = 50  # at most this many batches of batch_size // 4 windows (0 = all the text)
    kl_samples: int = 1  # policy samples per prompt for the KL estimate
    harness: str = ""  # lm-evaluation-harness tasks, comma-separated (pip install lm-eval)
    harness_include: str = ""  # a directory of extra task YAMLs (local tasks, local data)
    harness_fewshot: int = -1  # -1: each task's own default
    harness_chat: bool = False  # render harness prompts with the chat template (lm-eval's apply_chat_template)
    batch_size: int = 32
    out_dir: str = ""  # default: <model dir>/../eval
    seed: int = 0
    n_boot: int = 1000
    device: str = "auto"
    dtype: str = "float32"

    def validate(self) -> None:
        if not self.model:
            raise ValueError("model=DIR is required")
        if self.task and self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.task not in ("", "tinyworld", "thinkworld") and not self.data:
            raise ValueError(f"task={self.task} needs data=PATH (its .jsonl or .jsonl.gz file)")
        if self.data and not self.task:
            raise ValueError("data=... needs task=... to say how to read it (jsonl for prompt/answer rows)")
        if (self.prefs or self.compare) and not self.reward_model:
            raise ValueError("prefs=... and compare=... need reward_model=DIR (the judge)")
        if (self.compare or self.reference) and not (self.task or self.prefs or self.perplexity):
            raise ValueError("compare / reference need prompts: give task=... or prefs=... (or perplexity=...)")
        if not (self.task or self.prefs or self.perplexity or self.harness):
            raise ValueError("nothing to evaluate: give task=..., prefs=... (with reward_model), perplexity=... "
                             "or harness=...")
        if self.harness_include and not self.harness:
            raise ValueError("harness_include=... needs harness=TASK[,TASK]")
        if self.limit < 0 or self.perplexity_batches < 0 or self.n < 1 or self.kl_samples < 1 or self.max_new_tokens < 1:
            raise ValueError("limit and perplexity_batches must be >= 0; n, kl_samples and max_new_tokens >= 1")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    def resolved_out_dir(self) -> Path:
        if self.out_dir:
            return Path(self.out_dir)
        model = Path(self.model)
        if model.is_dir():
            return model.parent / "eval" if model.name == "model" else model.with_name(model.name + "-eval")
        return Path("runs/eval") / model.name


def has_score_head(model_dir: str) -> bool:
    """Does the checkpoint hold a ``score.weight`` (a reward model), judged from its safetensors headers only."""
    return "score.weight" in weight_names(model_dir)


def run_eval(cfg: EvalConfig) -> dict:
    """Evaluate cfg.model; returns the summary written to eval.json."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    rows = ev.load_task(cfg.task, cfg.data, cfg.limit, cfg.seed) if cfg.task else []  # data errors before loading
    pairs = []
    if cfg.prefs:
        pairs = read_pairs(cfg.prefs)[:cfg.limit or None]
    if cfg.reward_model and not has_score_head(cfg.reward_model):
        raise DataError(f"reward_model={cfg.reward_model}: the checkpoint has no score head (score.weight); "
                        "is it a reward model?")
    model, tok = load_model_and_tokenizer(cfg.model, cfg.device, cfg.dtype)
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    load = lambda path, **kw: load_model_dir(path, device=device, dtype=dtype, **kw).eval()
    reference = load(cfg.reference) if cfg.reference else None
    judge = load(cfg.reward_model, num_labels=1) if cfg.reward_model else None
    common = dict(batch_size=cfg.batch_size, n_boot=cfg.n_boot, seed=cfg.seed)
    task_kw = {"thinking_budget": cfg.thinking_budget, "min_thinking_tokens": cfg.min_thinking_tokens,
               "num_waits": cfg.num_waits}
    if cfg.task == "tinyworld":  # its stricter format: one answer, stated last

        task_kw["format_check"] = is_formatted
    summary: dict = {"model": cfg.model}
    records: list[dict] = []

    if rows:
        summary |= {"task": cfg.task, "data": cfg.data, "problems": len(rows)}
        res = ev.task_accuracy(model, tok, rows, chat=cfg.chat, max_new_tokens=cfg.max_new_tokens, n=cfg.n,
                               **common, **task_kw)
        summary |= {k: res[k] for k in ("accuracy", "format_rate", "pass_at_n", "mean_thinking_tokens", "by_level")
                    if k in res}
        ref_res = None
        if reference is not None:
            ref_res = ev.task_accuracy(reference, tok, rows, chat=cfg.chat, max_new_tokens=cfg.max_new_tokens,
                                       n=cfg.n, **common, **task_kw)
            summary |= {"reference_accuracy": ref_res["accuracy"], "reference_format_rate": ref_res["format_rate"],
                        # paired over the same problems, so its interval is much tighter than the two accuracies'
                        "accuracy_gain": ev.rate([a - b for a, b in zip(res["per_problem"], ref_res["per_problem"])],
                                                 cfg.n_boot, cfg.seed)}
        flat = [c for row in res["completions"] for c in row]
        ref_flat = [c for row in ref_res["completions"] for c in row] if ref_res else None
        summary |= {"mean_response_tokens": res["mean_response_tokens"], **ev.hacking_probes(flat, ref_flat)}
        summary["samples"] = [{"prompt": r["prompt"], "response": r["response"]} for r in res["records"][:5]]
        records += [{"kind": "task", **r} for r in res["records"]]
        if ref_res:
            records += [{"kind": "reference_task", **r} for r in ref_res["records"]]
        if judge is not None:  # the judge's mean reward of the answers, with its interval
            prompt_ids = [ev.encode_prompt(tok, r["prompt"], cfg.chat) for r in rows]
            for name, result in (("reward", res), ("reference_reward", ref_res)):
                if result is not None:
                    pairs_ids = [(p, c.token_ids) for p, row in zip(prompt_ids, result["completions"]) for c in row]
                    summary[name] = ev.rate(reward_scores(judge, pairs_ids, tok.pad_id, cfg.batch_size),
                                            cfg.n_boot, cfg.seed)

    if pairs:
        pref = ev.preference_accuracy(judge, tok, [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
                                                   for p in pairs], batch_size=cfg.batch_size,
                                      n_boot=cfg.n_boot, seed=cfg.seed)
        summary |= {"prefs": cfg.prefs, "preference_accuracy": pref["accuracy"],
                    "preference_mean_margin": pref["mean_margin"]}
        records += [{"kind": "preference", **r} for r in pref["records"]]

    prompts = [r["prompt"] for r in rows] or [p.prompt for p in pairs]
    if cfg.compare and prompts:
        other = load(cfg.compare)
        win = ev.win_rate(model, other, judge, tok, prompts, chat=cfg.chat, max_new_tokens=cfg.max_new_tokens,
                          **common)
        summary |= {"compare": cfg.compare, "win_rate": win["win_rate"],
                    **{k: win[k] for k in ("wins", "ties", "losses", "mean_reward_a", "mean_reward_b")}}
        records += [{"kind": "win_rate", **r} for r in win["records"]]
        del other

    if reference is not None and prompts:
        ids = [ev.encode_prompt(tok, p, cfg.chat) for p in prompts]
        kl = ev.kl_to_reference(model, reference, ids, n=cfg.kl_samples, max_new_tokens=cfg.max_new_tokens,
                                tokenizer=tok, **common)
        summary |= {"reference": cfg.reference, "kl": kl["kl_k1_per_token"], **kl}

    if cfg.perplexity:
        texts = _perplexity_data(cfg.perplexity)
        ppl_args = dict(seq_len=cfg.seq_len, batch_size=max(1, cfg.batch_size // 4), max_batches=cfg.perplexity_batches)
        ppl = ev.perplexity(model, tok, texts, **ppl_args)
        summary |= {"perplexity_data": cfg.perplexity, "val_loss": ppl["loss"], "perplexity": ppl["perplexity"],
                    "perplexity_tokens": ppl["tokens"]}
        if reference is not None:
            ref_ppl = ev.perplexity(reference, tok, texts, **ppl_args)
            summary |= {"reference_val_loss": ref_ppl["loss"], "reference_perplexity": ref_ppl["perplexity"]}

    out_dir = cfg.resolved_out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.harness:
        summary |= harness_summary(cfg, model, tok, out_dir)
    with (out_dir / "records.jsonl").open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    summary |= {"seconds": round(time.time() - t0, 1), "records": str(out_dir / "records.jsonl")}
    (out_dir / "eval.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    save_config(cfg, out_dir / "config.yaml")
    return summary


def harness_summary(cfg: EvalConfig, model, tok, out_dir: Path) -> dict:
    """lm-evaluation-harness results for eval.json (and lm-eval's own table in harness.md)."""
    try:
        from lmforge.harness import run_harness
    except ImportError as e:
        raise ConfigError(f"harness=... needs lm-evaluation-harness: pip install lm-eval ({e})") from None
    tasks = [t.strip() for t in cfg.harness.split(",") if t.strip()]
    out = run_harness(model, tok, tasks, include_path=cfg.harness_include, limit=cfg.limit,
                      num_fewshot=None if cfg.harness_fewshot < 0 else cfg.harness_fewshot,
                      batch_size=cfg.batch_size, chat=cfg.harness_chat, seed=cfg.seed, pretrained=cfg.model)
    (out_dir / "harness.md").write_text(out["table"], encoding="utf-8")
    return {"harness": out["results"], "harness_versions": out["versions"], "harness_n_shot": out["n-shot"]}


def _perplexity_data(spec: str):
    """A token-shards directory as is; anything else read as documents (data.sources)."""
    if (Path(spec) / "meta.json").exists():
        return spec
    return list(read_documents(spec))


# ---- printing ----

ROWS = [  # (summary key, label, format); dict values {"value", "ci", "n"} get their interval printed
    ("accuracy", "accuracy", "{:.1%}"), ("pass_at_n", "pass@n", "{:.1%}"), ("format_rate", "format rate", "{:.1%}"),
    ("reference_accuracy", "reference accuracy", "{:.1%}"), ("mean_response_tokens", "response tokens", "{:.1f}"),
    ("mean_thinking_tokens", "  of which thinking", "{:.1f}"),
    ("reference_mean_length", "reference response tokens", "{:.1f}"), ("length_ratio", "length / reference", "{:.2f}"),
    ("truncated_rate", "hit max_new_tokens", "{:.1%}"), ("repetition_rate_4gram", "repeated 4-grams", "{:.1%}"),
    ("reward", "mean reward", "{:.3f}"), ("reference_reward", "reference mean reward", "{:.3f}"),
    ("preference_accuracy", "preference accuracy", "{:.1%}"), ("win_rate", "win rate vs compare", "{:.1%}"),
    ("kl_k1_per_token", "KL / token (k1)", "{:.4f}"), ("kl_k3_per_token", "KL / token (k3)", "{:.4f}"),
    ("kl_k1_per_sequence", "KL / sequence (k1)", "{:.3f}"), ("val_loss", "validation loss", "{:.4f}"),
    ("perplexity", "perplexity", "{:.2f}"), ("reference_val_loss", "reference validation loss", "{:.4f}"),
]


def print_summary(summary: dict, out_dir: Path) -> None:
    title = f"lmforge eval: {summary['model']}" + (f" on {summary['task']}" if "task" in summary else "")
    table = Table(title=title)
    for column in ("metric", "value", "95% CI", "n"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for key, label, fmt in ROWS:
        if key not in summary:
            continue
        v = summary[key]
        if isinstance(v, dict):
            ci = f"[{fmt.format(v['ci'][0])}, {fmt.format(v['ci'][1])}]"
            table.add_row(label, fmt.format(v["value"]), ci, str(v["n"]))
        else:
            table.add_row(label, fmt.format(v), "", "")
    if "wins" in summary:
        table.add_row("wins / ties / losses", f"{summary['wins']} / {summary['ties']} / {summary['losses']}", "", "")
    for level, r in (summary.get("by_level") or {}).items():
        a = r["accuracy"]
        table.add_row(f"level {level} accuracy ({r['mean_thinking_tokens']:.0f} thinking tokens)",
                      f"{a['value']:.1%}", f"[{a['ci'][0]:.1%}, {a['ci'][1]:.1%}]", str(a["n"]))
    console = Console()
    if len(table.rows):
        console.print(table)
    if summary.get("harness"):
        print((out_dir / "harness.md").read_text(encoding="utf-8"))
    console.print(f"{out_dir / 'eval.json'}  ({summary['seconds']} s)")


def main(argv: list[str]) -> int:
    cfg = parse_cli(argv, EvalConfig, prog="lmforge eval", description=__doc__)
    summary = run_eval(cfg)
    print_summary(summary, cfg.resolved_out_dir())
    return 0
