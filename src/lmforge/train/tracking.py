"""Experiment tracking: where a run's metrics, config and plots go besides metrics.jsonl.

``train.report_to`` names the writers of a run (any of :data:`REPORT_TO`):

    jsonl        out_dir/metrics.jsonl, the run's record (the report, resume and the scaling fits read it); always on
    tensorboard  out_dir/tb (``tensorboard --logdir runs``)
    wandb        Weights & Biases (``pip install wandb``); ``WANDB_MODE=offline`` writes out_dir/wandb/ with no
                 network, ``wandb sync`` uploads it later. One W&B run per stage, grouped by the run directory
    mlflow       MLflow (``pip install mlflow-skinny``); ``MLFLOW_TRACKING_URI``, or a file store ``mlruns/`` beside
                 out_dir (the pipeline's stages share one; ``mlflow ui --backend-store-uri runs/tiny/mlruns``)

Every writer has the same small interface (:class:`Writer`): ``log(step, metrics)``, ``log_files(name, paths)``
and ``close()``. wandb and mlflow are imported only when asked for. A resumed run reopens the same W&B / MLflow run
(its id is kept in out_dir/tracking.json), and metrics are plotted against the logged ``step`` so the steps a
resume logs again overwrite rather than break the curve.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

REPORT_TO = ("jsonl", "tensorboard", "wandb", "mlflow")
DEFAULT_REPORT_TO = ("jsonl", "tensorboard")


def check_report_to(report_to) -> None:
    """One clear message for an unknown writer or a list without jsonl (the run's own record)."""
    unknown = [r for r in report_to if r not in REPORT_TO]
    if unknown:
        raise ValueError(f"report_to: unknown writer {unknown[0]!r} (writers: {', '.join(REPORT_TO)})")
    if "jsonl" not in report_to:
        raise ValueError("report_to must keep jsonl: metrics.jsonl is the run's record (the report, resume and the "
                         f"scaling fits read it); e.g. report_to=[jsonl,wandb], got {list(report_to)}")


@dataclass
class RunInfo:
    """What a tracker needs to name and describe a run."""

    out_dir: Path
    name: str = ""  # default: "<run dir>/<stage dir>", e.g. "tiny/sft"
    project: str = "lmforge"  # W&B project / MLflow experiment
    config: dict = field(default_factory=dict)  # the stage's resolved config
    resume_step: int | None = None  # a restart from this step's checkpoint
    run_group: str = ""  # default: the run directory's name (out_dir's parent), e.g. "tiny"

    @property
    def display_name(self) -> str:
        out = Path(self.out_dir).resolve()
        return self.name or f"{out.parent.name}/{out.name}"

    @property
    def group(self) -> str:
        return self.run_group or Path(self.out_dir).resolve().parent.name


class Writer(Protocol):
    def log(self, step: int, metrics: dict) -> None: ...

    def log_files(self, name: str, paths: list[Path]) -> None: ...

    def close(self) -> None: ...


def open_writers(report_to, run: RunInfo) -> list[Writer]:
    """The writers named in ``report_to`` other than jsonl (MetricsLogger writes metrics.jsonl itself)."""
    check_report_to(report_to)
    makers = {"tensorboard": TensorBoardWriter, "wandb": WandbWriter, "mlflow": MlflowWriter}
    return [w for w in (makers[r](run) for r in dict.fromkeys(report_to) if r != "jsonl") if w.active]


def numeric(metrics: dict) -> dict[str, float]:
    """The plottable scalars of a metrics row (no bools, strings or nulls)."""
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time")}


class TensorBoardWriter:
    """Scalars to out_dir/tb; a resume purges the events after the resumed step."""

    _warned = False

    def __init__(self, run: RunInfo):
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if not TensorBoardWriter._warned:
                warnings.warn("tensorboard is not installed, so metrics go to metrics.jsonl only "
                              "(pip install tensorboard to get them in TensorBoard too)", stacklevel=4)
                TensorBoardWriter._warned = True
            return
        purge = None if run.resume_step is None else run.resume_step + 1
        self.tb = SummaryWriter(str(Path(run.out_dir) / "tb"), purge_step=purge)

    @property
    def active(self) -> bool:
        return self.tb is not None

    def log(self, step: int, metrics: dict) -> None:
        for k, v in numeric(metrics).items():
            self.tb.add_scalar(k, v, step)

    def log_files(self, name: str, paths: list[Path]) -> None:
        """TensorBoard shows scalars here; the files already sit in the run directory beside tb/."""

    def close(self) -> None:
        self.tb.close()


def _ids_file(out_dir: Path) -> Path:
    return Path(out_dir) / "tracking.json"


def _run_id(run: RunInfo, key: str, new_id) -> str:
    """The tracker's run id: reused on a resume (from tracking.json), a fresh one otherwise."""
    path = _ids_file(run.out_dir)
    ids = json.loads(path.read_text()) if path.exists() else {}
    if run.resume_step is not None and key in ids:
        return ids[key]
    ids[key] = new_id()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ids, indent=2) + "\n")
    return ids[key]


class WandbWriter:
    """One W&B run per stage: its name, the resolved config, every metric against ``step``, files as artifacts."""

    active = True

    def __init__(self, run: RunInfo):
        try:
            import wandb
        except ImportError:
            raise ImportError("train.report_to has wandb: pip install wandb (WANDB_MODE=offline needs no "
                              "account or network)") from None
        self.wandb = wandb
        run_id = _run_id(run, "wandb", lambda: secrets.token_hex(4))
        self.run = wandb.init(project=run.project, name=run.display_name, group=run.group, config=run.config,
                              dir=str(run.out_dir), id=run_id, resume="allow", reinit="create_new")
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")  # x axis = the training step, not W&B's own counter

    def log(self, step: int, metrics: dict) -> None:
        self.run.log({"step": step, **numeric(metrics)})

    def log_files(self, name: str, paths: list[Path]) -> None:
        artifact = self.wandb.Artifact(_artifact_name(name), type="report")
        for p in paths:
            artifact.add_file(str(p), name=p.name)
        self.run.log_artifact(artifact)
        images = {f"{name}/{p.stem}": self.wandb.Image(str(p)) for p in paths if p.suffix == ".png"}
        if images:
            self.run.log(images)

    def close(self) -> None:
        self.run.finish()


def _artifact_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


class MlflowWriter:
    """One MLflow run per stage in the experiment ``project``: the config as params (flattened) and config.json,
    every metric with its step, files as artifacts."""

    active = True

    def __init__(self, run: RunInfo):
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ImportError("train.report_to has mlflow: pip install mlflow-skinny") from None

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # a local file store: works with mlflow-skinny (no database), which MLflow 3 asks to opt into
            uri = (Path(run.out_dir).resolve().parent / "mlruns").as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(run.project)
        exp_id = experiment.experiment_id if experiment else self.client.create_experiment(run.project)
        self.run_id = _run_id(run, "mlflow", lambda: self.client.create_run(
            exp_id, run_name=run.display_name, tags={"group": run.group}).info.run_id)
        if run.resume_step is None:
            params = [Param(k, str(v)[:500]) for k, v in _flatten(run.config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[i:i + 100])
            self.client.log_dict(self.run_id, run.config, "config.json")
        else:
            self.client.update_run(self.run_id, status="RUNNING")

    def log(self, step: int, metrics: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in numeric(metrics).items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_files(self, name: str, paths: list[Path]) -> None:
        for p in paths:
            self.client.log_artifact(self.run_id, str(p), artifact_path=name)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def log_report(report_to, run_dir: Path, files: list[Path], project: str = "lmforge", name: str = "") -> None:
    """A pipeline's report (report.html, report.md and every plot in it) as files of one tracker run named
    "<run dir>/report"; nothing for jsonl and tensorboard (the files are in the run directory already)."""
    info = RunInfo(out_dir=Path(run_dir) / "report", name=name or f"{Path(run_dir).resolve().name}/report",
                   project=project)
    wanted = [r for r in report_to if r in ("wandb", "mlflow")]
    if not wanted:
        return
    writers = open_writers(["jsonl", *wanted], info)
    try:
        for w in writers:
            w.log_files("report", files)
    finally:
        for w in writers:
            w.close()
