"""The run skeleton every training stage is written with, as small functions (no base class).

    run = start_run(cfg)        join torchrun's group (cfg.train.device), make cfg.out_dir and take its lock
                                (train/runlock.py: one live run per out_dir), write the resolved config there
                                ONCE (config.yaml, main rank), seed torch with cfg.train.seed
    ... load the model and data, train(...) ...
    finish_run(run, summary, model, tokenizer)
                                main rank: the model as out_dir/model (a Hugging Face directory), ``seconds``
                                added, summary.json written atomically, the lock given back; returns the
                                summary ({} on other ranks)

    round_metrics(metrics)      the float metrics of a TrainResult, rounded to 4 digits, for a summary
    config_hash(cfg)            a short digest of a resolved config
    is_finished(marker, digest) / mark_finished(marker, digest, ...)
                                the "finished with this config" marker that lets the pipeline, the constitutional
                                run chain and the scaling sweep skip work that is already done
    log(message)                one line on stderr, flushed (rich progress bars draw on stdout)
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.atomic import write_atomic
from lmforge.config import save_config, to_dict
from lmforge.modelio import save_model_dir
from lmforge.train.dist import DistInfo, init_distributed
from lmforge.train.runlock import lock_out_dir, unlock_out_dir


@dataclass
class Run:
    """A started run: its config, process group, output directory and start time."""
    cfg: Any
    dist: DistInfo
    out_dir: Path
    t0: float  # time.time() at the start, for the summary's seconds

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def is_main(self) -> bool:
        return self.dist.is_main


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_config(cfg, out_dir: str | Path, dist: DistInfo | None = None) -> None:
    """The resolved config as out_dir/config.yaml (main rank only)."""
    if dist is None or dist.is_main:
        save_config(cfg, Path(out_dir) / "config.yaml")


def start_run(cfg, *, seed: bool = True) -> Run:
    """What every training stage does first: join the process group (``cfg.train.device``), make ``cfg.out_dir``
    and lock it (main rank; another live run there is an OutDirInUse error naming its PID), write the resolved
    config there once (main rank) and seed torch with ``cfg.train.seed``."""
    t0 = time.time()
    dist = init_distributed(cfg.train.device)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        lock_out_dir(out_dir)
    write_config(cfg, out_dir, dist)
    if seed:
        torch.manual_seed(cfg.train.seed)
    return Run(cfg, dist, out_dir, t0)


def round_metrics(metrics: dict, digits: int = 4) -> dict:
    """The float values of ``metrics``, rounded (what a summary reports of a TrainResult's metrics)."""
    return {k: round(v, digits) for k, v in metrics.items() if isinstance(v, float)}


def finish_run(run: Run, summary: dict, model=None, tokenizer=None) -> dict:
    """What every training stage does last, on the main rank: save ``model`` (with ``tokenizer``) as out_dir/model
    (``summary["model_dir"]``), add ``seconds`` since start_run unless the summary has them, and write
    summary.json atomically. Returns the summary; {} on the other ranks."""
    if not run.is_main:
        return {}
    if model is not None:
        summary["model_dir"] = str(save_model_dir(run.out_dir / "model", model, tokenizer))
    summary.setdefault("seconds", round(time.time() - run.t0, 1))
    write_atomic(run.out_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    unlock_out_dir(run.out_dir)
    return summary


# ---------------------------------------------------------------------------------------------- skip what is done


TRACKING_KEYS = ("report_to", "run_name", "tracking_project", "tracking_group")  # where metrics go, not what a stage computes


def config_hash(cfg) -> str:
    """16 hex digits of the resolved config (a dataclass or a dict), without train's tracking keys: turning W&B
    on retrains nothing."""
    data = dict(cfg) if isinstance(cfg, dict) else to_dict(cfg)
    if isinstance(data.get("train"), dict):
        data["train"] = {k: v for k, v in data["train"].items() if k not in TRACKING_KEYS}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_finished(marker: str | Path, digest: str) -> dict | None:
    """The record in ``marker`` when the work it marks finished with ``digest``; None when it is missing, torn,
    or was made with another config."""
    try:
        record = json.loads(Path(marker).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("config_hash") == digest else None


def mark_finished(marker: str | Path, digest: str, **record) -> None:
    """Record, atomically, that the work in ``marker``'s directory finished with ``digest`` (and ``record``)."""
    marker = Path(marker)
    marker.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(marker, json.dumps({**record, "config_hash": digest, "finished": time.time()}, default=str) + "\n")
