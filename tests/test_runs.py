"""The run skeleton (train/runs.py): config.yaml once, the summary and model at the end, the finished marker."""

import json
from dataclasses import dataclass, field

import torch
import yaml

from lmforge.model import ModelConfig, Transformer
from lmforge.modelio import load_model_dir
from lmforge.train.loop import TrainConfig
from lmforge.train.runs import config_hash, finish_run, is_finished, mark_finished, round_metrics, start_run


@dataclass
class StageConfig:
    out_dir: str = ""
    lr_note: str = "a stage's own key"
    train: TrainConfig = field(default_factory=lambda: TrainConfig(device="cpu", seed=7))


def test_start_run_writes_the_resolved_config_once_and_seeds(tmp_path):
    cfg = StageConfig(out_dir=str(tmp_path / "run"))
    run = start_run(cfg)
    first = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(first, torch.rand(3))  # seeded with cfg.train.seed
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["lr_note"] == "a stage's own key" and saved["train"]["seed"] == 7
    assert run.out_dir == tmp_path / "run" and run.is_main and run.device.type == "cpu"


def test_finish_run_saves_the_model_and_writes_the_summary(tmp_path):
    run = start_run(StageConfig(out_dir=str(tmp_path)))
    model = Transformer(ModelConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1))
    summary = finish_run(run, {"val_loss": 1.25, "seconds": 3.0}, model)
    assert summary["model_dir"] == str(tmp_path / "model") and summary["seconds"] == 3.0  # the stage's own
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert not list(tmp_path.glob("*.tmp"))  # written atomically
    reopened = load_model_dir(tmp_path / "model")
    for a, b in zip(model.state_dict().values(), reopened.state_dict().values()):
        assert torch.equal(a, b)
    assert "seconds" in finish_run(run, {})  # added when the stage did not time itself


def test_round_metrics_keeps_floats_rounded():
    assert round_metrics({"loss": 0.123456, "accuracy": 0.5, "tokens": 12, "name": "x"}) == \
        {"loss": 0.1235, "accuracy": 0.5}


def test_finished_marker_matches_only_its_config(tmp_path):
    marker = tmp_path / "step" / "done.json"
    a, b = config_hash(StageConfig(out_dir="a")), config_hash(StageConfig(out_dir="b"))
    assert a == config_hash({"out_dir": "a", "lr_note": "a stage's own key",
                             "train": TrainConfig(device="cpu", seed=7).__dict__}) and a != b
    assert is_finished(marker, a) is None
    mark_finished(marker, a, step="sft", summary={"steps": 2})
    assert is_finished(marker, a)["summary"] == {"steps": 2} and is_finished(marker, b) is None
    marker.write_text("{torn")
    assert is_finished(marker, a) is None
