"""The scaling sweep (an IsoFLOP grid of pre-training runs) and the predict-then-verify recipe, for `lmforge scaling`.

Grid. Every model size N is trained at every compute budget C with D = C / (6N) tokens (rounded to whole
optimizer steps), so runs of one budget form an IsoFLOP profile (Hoffmann et al. 2022, approach 2) while the
whole grid covers the (N, D) plane for the parametric fit (approach 3). Each run has its own cosine schedule
sized to its length, as in Chinchilla (§3.1: a cosine cycle longer than the run overestimates the loss).

FLOPs recorded per run (D tokens, T = seq_len, L layers, d_attn = heads × head_dim):
  * ``flops`` = 6·N·D (Kaplan et al. 2020, §2.1), N = the configured parameter count (``n_column``);
  * ``flops_with_attention`` = D·(6·W + 12·L·T·d_attn), W = weights of every matmul including the output head.
    The second term is attention's own work: QKᵀ and attention-weighted values each cost 2·T·d_attn FLOPs
    per token per layer forward, ×3 for forward + backward (Hoffmann et al. 2022, appendix F; Kaplan et al.
    2020, table 1, counts the QKᵀ half). No discount for the causal mask.

N defaults to all parameters (as in Chinchilla). With tied embeddings the table is also the output head, which
multiplies on every token, so 6·N·D is then close to the true matmul count; ``n_params_non_embedding`` is
Kaplan's choice and is recorded too.

Every run directory holds its pre-training ``summary.json`` and, once finished, a marker of the plan it finished
with; a rerun skips those (and a killed run resumes from its last checkpoint). One tokenizer and one set of
token shards serve every run. The laws it fits and the plots are in lmforge.scaling.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lmforge.atomic import atomic_open, write_atomic
from lmforge.config import save_config
from lmforge.errors import ConfigError
from lmforge.model import ModelConfig, Transformer
from lmforge.modelio import load_tokenizer
from lmforge.scaling.laws import bootstrap_indices, fit_chinchilla, percentile_ci, theta_of
from lmforge.tokenizer import train_corpus_tokenizer
from lmforge.train.lm import run_pretraining
from lmforge.train.runs import config_hash, is_finished, mark_finished

FINISHED_FILE = "sweep_run.json"  # a run directory's "finished with this plan" marker (train/runs.py)
COLUMNS = ("name", "hidden_size", "num_hidden_layers", "n_params", "n_params_non_embedding", "tokens", "steps",
           "budget", "flops", "flops_with_attention", "val_loss", "unigram_baseline", "seconds")


@dataclass
class SweepModel:
    """One model size; other architecture settings come from the ``pretrain.model`` section."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 0  # 0 = hidden_size // 32 (head_dim 32), at least 1
    num_key_value_heads: int = 0  # 0 = num_attention_heads
    intermediate_size: int = 0  # 0 = 8/3 · hidden_size rounded up to a multiple of 16 (Llama's SwiGLU ratio)
    name: str = ""  # default dHIDDEN-LLAYERS

    @property
    def label(self) -> str:
        return self.name or f"d{self.hidden_size}-L{self.num_hidden_layers}"

    def apply(self, base):
        """``base`` (a ModelConfig) with this size's fields."""
        heads = self.num_attention_heads or max(1, self.hidden_size // 32)
        ff = self.intermediate_size or 16 * math.ceil(8 * self.hidden_size / 3 / 16)
        return replace(base, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
                       num_attention_heads=heads, num_key_value_heads=self.num_key_value_heads or heads,
                       intermediate_size=ff, head_dim=0)


@dataclass
class PredictTarget:
    model: SweepModel = field(default_factory=SweepModel)  # the recipe names a size larger than the sweep's
    budget: float = 0.0  # training FLOPs (C = 6ND); 0 = twice the sweep's largest budget


@dataclass
class ScalingConfig:
    out_dir: str = "runs/scaling_tiny"
    models: list[SweepModel] = field(default_factory=list)
    budgets: list[float] = field(default_factory=list)  # training FLOPs per run, C = 6·N·D
    n_column: Literal["n_params", "n_params_non_embedding"] = "n_params"  # N in C = 6ND and in the fit
    min_steps: int = 10  # runs whose budget buys fewer steps are lengthened (and flagged)
    warmup_fraction: float = 0.1  # of each run's steps
    n_boot: int = 50  # bootstrap refits for confidence intervals
    seed: int = 0
    predict: PredictTarget = field(default_factory=PredictTarget)

    def validate(self) -> None:
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if any(b <= 0 for b in self.budgets):
            raise ValueError(f"budgets must be positive FLOP counts, got {self.budgets}")
        if self.min_steps < 1:
            raise ValueError("min_steps must be at least 1")


@dataclass
class RunSpec:
    name: str
    model: dict  # ModelConfig fields
    budget: float
    steps: int
    n_params: int
    n_params_non_embedding: int
    flops_per_token: float  # with attention, see the module docstring
    clamped: bool = False  # the budget bought fewer than min_steps


# ---------------------------------------------------------------------------------------------- planning


def count_params(model_cfg, seq_len: int) -> tuple[int, int, float]:
    """(N, N without the embedding table, training FLOPs per token) of a config, built on the meta device."""
    with torch.device("meta"):
        model = Transformer(model_cfg)
    return model.num_params(), model.num_params(non_embedding=True), float(model.flops_per_token(seq_len))


def plan_run(size: SweepModel, budget: float, base, vocab_size: int, scfg: ScalingConfig) -> RunSpec:
    """The run of ``size`` at ``budget`` FLOPs: steps = C / (6 N · tokens per step), at least min_steps."""
    model_cfg = replace(size.apply(base.model), vocab_size=vocab_size,
                        max_position_embeddings=max(base.model.max_position_embeddings, base.seq_len))
    model_cfg.validate()
    n, n_ne, fpt = count_params(model_cfg, base.seq_len)
    n_used = n if scfg.n_column == "n_params" else n_ne
    tokens_per_step = base.train.batch_size * base.seq_len
    steps = round(budget / (6 * n_used * tokens_per_step))
    return RunSpec(name=f"{size.label}_C{budget:.2e}", model=asdict(model_cfg), budget=float(budget),
                   steps=max(steps, scfg.min_steps), n_params=n, n_params_non_embedding=n_ne,
                   flops_per_token=fpt, clamped=steps < scfg.min_steps)


def run_config(spec: RunSpec, base, run_dir: Path, tokenizer_dir: Path, scfg: ScalingConfig):
    """The PretrainConfig of one run: the shared base with this run's model, length and directories."""
    warmup = min(spec.steps - 1, round(scfg.warmup_fraction * spec.steps))
    train = replace(base.train, max_steps=spec.steps, warmup_steps=max(warmup, 0), eval_every=0)
    return replace(base, out_dir=str(run_dir), tokenizer=str(tokenizer_dir), init_from="",
                   model=ModelConfig(**spec.model), train=train, sample_tokens=0)


# ---------------------------------------------------------------------------------------------- running


def shared_tokenizer(base, out_dir: Path) -> Path:
    """The sweep's one tokenizer: ``pretrain.tokenizer`` when set, else trained once into out_dir/tokenizer."""
    if base.tokenizer:
        return Path(base.tokenizer)
    tok_dir = out_dir / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        train_corpus_tokenizer(base.data.source, tok_dir, base.vocab_size, text_field=base.data.text_field)
    return tok_dir


def train_run(spec: RunSpec, base, out_dir: Path, tokenizer_dir: Path, scfg: ScalingConfig,
              run_dir: Path | None = None) -> dict:
    """Train one run (or read it back when it finished with this plan) and return its table row."""
    run_dir = run_dir or out_dir / "runs" / spec.name
    spec_path, summary_path = run_dir / "spec.json", run_dir / "summary.json"
    spec_json = asdict(spec)
    planned = ("name", "model", "budget", "steps")
    if spec_path.exists() and any(json.loads(spec_path.read_text()).get(k) != json.loads(json.dumps(spec_json[k]))
                                  for k in planned):
        raise ConfigError(f"{run_dir} holds a run planned differently (model, steps or budget changed); "
                          f"delete it or use another scaling.out_dir")
    marker, digest = run_dir / FINISHED_FILE, config_hash({k: spec_json[k] for k in planned})
    if is_finished(marker, digest) and summary_path.exists():
        summary = json.loads(summary_path.read_text())
        print(f"[scaling] {spec.name}: done already (val_loss {summary['val_loss']:.4f})", flush=True)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(json.dumps(spec_json, indent=2) + "\n")
        shared_data = (out_dir / "data").resolve()
        shared_data.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "data").exists():
            (run_dir / "data").symlink_to(shared_data, target_is_directory=True)  # shards built once, reused
        print(f"[scaling] {spec.name}: N={spec.n_params:,}, {spec.steps} steps"
              + (" (lengthened to min_steps)" if spec.clamped else ""), flush=True)
        summary = run_pretraining(run_config(spec, base, run_dir, tokenizer_dir, scfg))
        mark_finished(marker, digest, run=spec.name)
    n_used = spec.n_params if scfg.n_column == "n_params" else spec.n_params_non_embedding
    tokens = int(summary["tokens"])
    return {"name": spec.name, "hidden_size": spec.model["hidden_size"],
            "num_hidden_layers": spec.model["num_hidden_layers"], "n_params": spec.n_params,
            "n_params_non_embedding": spec.n_params_non_embedding, "tokens": tokens, "steps": summary["steps"],
            "budget": spec.budget, "flops": 6.0 * n_used * tokens,
            "flops_with_attention": spec.flops_per_token * tokens, "val_loss": float(summary["val_loss"]),
            "unigram_baseline": float(summary.get("unigram_baseline", float("nan"))),
            "seconds": float(summary.get("seconds", 0.0))}


def run_sweep(scfg: ScalingConfig, base) -> list[dict]:
    """Train every (size, budget) run not done yet; write sweep.csv and sweep.jsonl after each one."""
    if not scfg.models or not scfg.budgets:
        raise ConfigError("scaling.models and scaling.budgets must both be non-empty lists")
    out_dir = Path(scfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(scfg, out_dir / "scaling.yaml")
    save_config(base, out_dir / "pretrain.yaml")
    tok_dir = shared_tokenizer(base, out_dir)
    vocab = load_tokenizer(tok_dir).vocab_size
    specs = [plan_run(m, b, base, vocab, scfg) for b in scfg.budgets for m in scfg.models]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"two sweep runs share a name ({names}); give scaling.models distinct sizes or names")
    rows: list[dict] = []
    t0 = time.time()
    for i, spec in enumerate(specs, 1):
        print(f"[scaling] run {i}/{len(specs)}", flush=True)
        rows.append(train_run(spec, base, out_dir, tok_dir, scfg))
        write_table(rows, out_dir / "sweep.csv")
    print(f"[scaling] {len(rows)} runs in {time.time() - t0:.0f} s -> {out_dir / 'sweep.csv'}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- the table


def write_table(rows: list[dict], path: Path) -> None:
    """sweep.csv (the COLUMNS) and sweep.jsonl beside it, each replaced atomically."""
    path = Path(path)
    with atomic_open(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    write_atomic(path.with_suffix(".jsonl"), "".join(json.dumps(r) + "\n" for r in rows))


def read_table(path: str | Path, required=("tokens", "val_loss")) -> list[dict]:
    """Rows of a sweep CSV (or JSONL) with numbers parsed; names the missing column or bad cell."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such table (run `lmforge scaling sweep` first, or pass --table)")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    if not rows:
        raise ConfigError(f"{path}: the table has no rows")
    missing = [c for c in required if c not in rows[0]]
    if missing:
        raise ConfigError(f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(rows[0])})")
    parsed = []
    for i, row in enumerate(rows, 2):
        out = {}
        for k, v in row.items():
            try:
                out[k] = float(v)
            except (TypeError, ValueError):
                out[k] = v
        for c in required:
            if not isinstance(out[c], float) or not math.isfinite(out[c]) or out[c] <= 0:
                raise ConfigError(f"{path}:{i}: column {c} must be a positive number, got {row[c]!r}")
        parsed.append(out)
    return parsed


def table_arrays(rows: list[dict], n_column: str = "n_params"):
    """(N, D, budget, L) arrays; ``budget`` falls back to 6ND rounded to 2 significant figures."""
    N = np.array([r[n_column] for r in rows], dtype=float)
    D = np.array([r["tokens"] for r in rows], dtype=float)
    L = np.array([r["val_loss"] for r in rows], dtype=float)
    if all(isinstance(r.get("budget"), float) for r in rows):
        budget = np.array([r["budget"] for r in rows], dtype=float)
    else:
        c = 6 * N * D
        budget = np.array([float(f"{x:.2g}") for x in c])
    return N, D, budget, L


# ---------------------------------------------------------------------------------------------- predict


def run_predict(scfg: ScalingConfig, base) -> dict:
    """Fit the sweep, predict a larger model's final loss, write the prediction, then train it and compare.

    The prediction (with a bootstrap interval over refits of L(N, D)) is written to prediction.json before
    the target's first step, so the report compares a real forecast with the outcome.
    """
    rows = run_sweep(scfg, base)
    N, D, _, L = table_arrays(rows, scfg.n_column)
    out_dir = Path(scfg.out_dir)
    tok_dir = shared_tokenizer(base, out_dir)
    budget = scfg.predict.budget or 2 * max(scfg.budgets)
    spec = plan_run(scfg.predict.model, budget, base, load_tokenizer(tok_dir).vocab_size, scfg)
    n_t = spec.n_params if scfg.n_column == "n_params" else spec.n_params_non_embedding
    d_t = spec.steps * base.train.batch_size * base.seq_len
    if n_t <= N.max():
        raise ConfigError(f"the predicted model (N={n_t:,}) must be larger than the sweep's largest "
                          f"(N={int(N.max()):,}): an extrapolation is the point")
    pred_dir = out_dir / "predict" / spec.name
    pred_path = pred_dir / "prediction.json"
    if pred_path.exists():
        prediction = json.loads(pred_path.read_text())
        print(f"[scaling] prediction made earlier: {prediction['predicted_loss']:.4f}", flush=True)
    else:
        fit = fit_chinchilla(N, D, L)
        boots = []
        for idx in bootstrap_indices(len(N), scfg.n_boot, scfg.seed):
            if len(np.unique(N[idx])) > 1 and len(np.unique(D[idx])) > 1:
                law = fit_chinchilla(N[idx], D[idx], L[idx], n_starts=2, extra_starts=[theta_of(fit.law)]).law
                boots.append(float(law.loss(n_t, d_t)))
        prediction = {"target": spec.name, "N": n_t, "D": d_t, "budget": budget, "steps": spec.steps,
                      "law": fit.law.to_dict(), "predicted_loss": float(fit.law.loss(n_t, d_t)),
                      "interval": list(percentile_ci(boots)), "sweep_runs": len(rows),
                      "sweep_max_N": float(N.max()), "sweep_max_D": float(D.max()),
                      "made_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        pred_dir.mkdir(parents=True, exist_ok=True)
        pred_path.write_text(json.dumps(prediction, indent=2) + "\n")
        print(f"[scaling] predicted val_loss of {spec.name} (N={n_t:,}, D={d_t:,}): "
              f"{prediction['predicted_loss']:.4f}, written to {pred_path} before training", flush=True)
    row = train_run(spec, base, out_dir, tok_dir, scfg, run_dir=pred_dir / "run")
    actual, predicted = row["val_loss"], prediction["predicted_loss"]
    lo, hi = prediction["interval"]
    result = {**prediction, "actual_loss": actual, "abs_error": predicted - actual,
              "rel_error": (predicted - actual) / actual, "inside_interval": bool(lo <= actual <= hi)}
    (pred_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    (pred_dir / "report.md").write_text(predict_markdown(result))
    result["report"] = str(pred_dir / "report.md")
    return result


def predict_markdown(r: dict) -> str:
    law = r["law"]
    lo, hi = r["interval"]
    inside = "inside" if r["inside_interval"] else "OUTSIDE"
    return (
        f"# Predict, then verify: {r['target']}\n\n"
        f"Fitted on {r['sweep_runs']} sweep runs (largest N = {r['sweep_max_N']:,.0f}, largest D = "
        f"{r['sweep_max_D']:,.0f}):\n\n"
        f"L(N, D) = {law['E']:.4g} + {law['A']:.4g} / N^{law['alpha']:.4f} + {law['B']:.4g} / D^{law['beta']:.4f}"
        f"\n\n"
        f"| | value |\n|---|---|\n"
        f"| target N (params) | {r['N']:,} ({r['N'] / r['sweep_max_N']:.1f}x the sweep's largest) |\n"
        f"| target D (tokens) | {r['D']:,} ({r['steps']} steps) |\n"
        f"| predicted val loss (before training, {r['made_at']}) | {r['predicted_loss']:.4f} |\n"
        f"| 95% bootstrap interval | [{lo:.4f}, {hi:.4f}] |\n"
        f"| actual val loss | {r['actual_loss']:.4f} ({inside} the interval) |\n"
        f"| absolute error (predicted − actual) | {r['abs_error']:+.4f} nats/token |\n"
        f"| relative error | {r['rel_error']:+.2%} |\n"
    )
