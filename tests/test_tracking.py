"""train.report_to: metrics, config and run name reach TensorBoard, W&B (offline: no network) and MLflow (a local
file store), and the report's files go up as artifacts. The W&B side is read back from the run's .wandb file."""

import json
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from ddp_train import Stream, TinyLM, lm_loss, weights_saver
from lmforge_cli import lmforge
from PIL import Image

from lmforge.apps.pipeline import stage_config
from lmforge.stages.grpo import GRPOConfig
from lmforge.stages.online_dpo import OnlineDPOConfig, round_tracking
from lmforge.train.loop import TrainConfig, train
from lmforge.train.metrics import read_metrics
from lmforge.train.runs import config_hash
from lmforge.train.tracking import log_report

pytestmark = pytest.mark.usefixtures("one_thread")
wandb = pytest.importorskip("wandb")


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def wandb_records(run_dir: Path) -> list:
    """Every record of the offline runs under run_dir/wandb, in order. The .wandb file is LevelDB's log format
    (32 KiB blocks of chunks: crc32, length, type) after a 7-byte W&B header; each record is a protobuf Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, buf = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if length == 0 and kind == 0:
                break
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            buf = chunk if kind in (1, 2) else buf + chunk  # full / first, middle / last
            if kind in (1, 4):
                record = pb.Record()
                record.ParseFromString(buf)
                records.append(record)
    return records


def history(records) -> dict[int, dict]:
    """W&B history rows by their logged ``step``."""
    rows = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            if "step" in row:
                rows.setdefault(row["step"], {}).update(row)
    return rows


@dataclass
class Stage:  # a stage's resolved config, as train() gets it
    model: str = "tiny"
    train: dict = field(default_factory=lambda: {"lr": 1e-2})


def run(out, **kw):
    torch.manual_seed(0)
    model = TinyLM()
    cfg = TrainConfig(**{**dict(lr=1e-2, warmup_steps=1, max_steps=4, batch_size=4, micro_batch_size=4,
                                log_every=1, eval_every=2, save_every=2, seed=0), **kw})
    eval_fn = lambda m: {"val_loss": 1.5}
    return train(model, lm_loss, Stream(), cfg, out, save_model=weights_saver(model), eval_fn=eval_fn,
                 run_config=Stage())


def test_wandb_offline_and_mlflow_get_name_config_and_every_metric(tmp_path, offline):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "exp" / "sft"
    run(out, report_to=["jsonl", "tensorboard", "wandb", "mlflow"])
    logged = read_metrics(out)
    assert (out / "tb").is_dir()

    records = wandb_records(out)
    (start,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert start.display_name == "exp/sft" and start.project == "lmforge" and start.run_group == "exp"
    config = {u.key: json.loads(u.value_json) for u in start.config.update}
    assert config["model"] == "tiny" and config["train"] == {"lr": 1e-2}
    seen = history(records)
    for row in logged:  # every number of metrics.jsonl, at its step
        for k, v in row.items():
            if k not in ("step", "time") and isinstance(v, (int, float)):
                assert seen[row["step"]][k] == pytest.approx(v), (row["step"], k)
    assert {"loss", "lr", "grad_norm", "val_loss"} <= set(seen[2])

    ids = json.loads((out / "tracking.json").read_text())
    client = MlflowClient((tmp_path / "exp" / "mlruns").as_uri())
    mlrun = client.get_run(ids["mlflow"])
    assert mlrun.info.run_name == "exp/sft" and mlrun.data.params["train.lr"] == "0.01"
    assert [m.step for m in client.get_metric_history(ids["mlflow"], "loss")] == [1, 2, 3, 4]
    assert [m.value for m in client.get_metric_history(ids["mlflow"], "val_loss")] == [1.5, 1.5]

    run(out, max_steps=6, report_to=["jsonl", "wandb", "mlflow"])  # resume from step 4: the same runs go on
    assert json.loads((out / "tracking.json").read_text()) == ids
    assert {r.run.run_id for r in wandb_records(out) if r.WhichOneof("record_type") == "run"} == {ids["wandb"]}
    assert set(history(wandb_records(out))) == {1, 2, 3, 4, 5, 6}
    assert [m.step for m in client.get_metric_history(ids["mlflow"], "loss")][-2:] == [5, 6]


def test_report_files_go_up_as_artifacts(tmp_path, offline):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "tiny"
    run_dir.mkdir()
    files = [run_dir / "report.html", run_dir / "loss_curves.png"]
    files[0].write_text("<html></html>")
    files[1].write_bytes(b"\x89PNG\r\n\x1a\n")  # only stored, never decoded, by the artifact
    log_report(["jsonl", "mlflow"], run_dir, files)
    ids = json.loads((run_dir / "report" / "tracking.json").read_text())
    listed = MlflowClient((run_dir / "mlruns").as_uri()).list_artifacts(ids["mlflow"], "report")
    assert sorted(Path(a.path).name for a in listed) == ["loss_curves.png", "report.html"]


def test_wandb_report_artifact_lists_the_files(tmp_path, offline):
    run_dir = tmp_path / "tiny"
    run_dir.mkdir()
    Image.new("RGB", (4, 4)).save(run_dir / "loss_curves.png")
    (run_dir / "report.html").write_text("<html></html>")
    log_report(["jsonl", "wandb"], run_dir, [run_dir / "report.html", run_dir / "loss_curves.png"])
    # W&B's core process may still be writing the offline log when finish() returns (seen once in a fresh
    # clone under load: no artifact record yet), so the record is read again until it is there or 30 s passed.
    for _ in range(60):
        records = wandb_records(run_dir / "report")
        artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
        if any(a.type == "report" for a in artifacts):
            break
        time.sleep(0.5)
    (artifact,) = [a for a in artifacts if a.type == "report"]
    assert sorted(e.path for e in artifact.manifest.contents) == ["loss_curves.png", "report.html"]


def test_bad_report_to_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown writer 'wandbb'"):
        TrainConfig(report_to=["jsonl", "wandbb"]).validate()
    with pytest.raises(ValueError, match="must keep jsonl"):
        TrainConfig(report_to=["wandb"]).validate()
    proc = lmforge("pretrain", "train.report_to=[tensorboard]", check=False)
    assert proc.returncode == 2 and "must keep jsonl" in proc.stderr and "Traceback" not in proc.stderr


def test_trackers_are_imported_only_when_asked_for():
    code = "import sys, lmforge.train.loop, lmforge.train.metrics; print('wandb' in sys.modules, 'mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_turning_a_tracker_on_retrains_no_pipeline_stage():
    plain = stage_config("sft", "tiny", [])
    tracked = stage_config("sft", "tiny", ["train.report_to=[jsonl,wandb]", "train.run_name=x"])
    assert config_hash(plain) == config_hash(tracked) != config_hash(stage_config("sft", "tiny", ["train.lr=1e-4"]))


def test_eval_on_start_reaches_the_trackers_once_and_leaves_training_as_it_was(tmp_path, offline):
    def rng_eating_eval(model):  # sampling in an eval draws from torch's generator: it must not shift training
        torch.rand(7)
        return {"val_loss": 1.5}

    def noisy_loss(model, batch):  # and so may training (dropout, sampled rollouts): here a random loss scale
        loss, metrics = lm_loss(model, batch)
        return loss * (1 + torch.rand(())), metrics

    def fit(out, **kw):
        torch.manual_seed(0)
        model = TinyLM()
        cfg = TrainConfig(lr=1e-2, warmup_steps=1, batch_size=4, micro_batch_size=4, log_every=1, eval_every=2,
                          save_every=2, seed=0, report_to=["jsonl", "wandb"], **kw)
        train(model, noisy_loss, Stream(), cfg, out, save_model=weights_saver(model), eval_fn=rng_eating_eval,
              run_config=Stage())
        return model

    plain = fit(tmp_path / "a" / "sft", max_steps=4)
    started = fit(tmp_path / "b" / "sft", max_steps=4, eval_on_start=True)
    for p, q in zip(plain.parameters(), started.parameters()):
        assert torch.equal(p, q)
    first = read_metrics(tmp_path / "b" / "sft")[0]
    assert first["step"] == 0 and first["val_loss"] == 1.5
    assert history(wandb_records(tmp_path / "b" / "sft"))[0]["val_loss"] == 1.5
    assert 0 not in history(wandb_records(tmp_path / "a" / "sft"))

    fit(tmp_path / "b" / "sft", max_steps=6, eval_on_start=True)  # a resumed run does not evaluate step 0 again
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "sft")].count(0) == 1


def test_rl_stages_evaluate_at_start_by_default_and_a_round_joins_its_stage_group(tmp_path, offline):
    assert GRPOConfig().train.eval_on_start is None and TrainConfig().eval_on_start is None  # the stage decides
    cfg = OnlineDPOConfig(out_dir=str(tmp_path / "tiny" / "online_dpo"))
    assert round_tracking(cfg, 2) == {"run_name": "tiny/online_dpo/round_2", "tracking_group": "tiny"}

    out = tmp_path / "tiny" / "online_dpo" / "round_2"
    run(out, report_to=["jsonl", "wandb"], **round_tracking(cfg, 2))
    (start,) = [r.run for r in wandb_records(out) if r.WhichOneof("record_type") == "run"]
    assert start.display_name == "tiny/online_dpo/round_2" and start.run_group == "tiny"
