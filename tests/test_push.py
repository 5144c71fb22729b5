"""``lmforge push``: the generated model card (base model, data, stages, eval table, recipe, licence) and the files
upload_folder gets; the dry run touches no network, the real path is checked against a stand-in HfApi."""

import json
import shutil

import pytest
import yaml
from lmforge_cli import lmforge

from lmforge.stages.push import PushConfig, run_push

hub = pytest.importorskip("huggingface_hub")


@pytest.fixture
def run_dir(tmp_path, tiny_model_dir):
    """runs/x/{pretrain,sft}: two stages as the pipeline leaves them (config.yaml, model/, eval/eval.json)."""
    model = tiny_model_dir("push")
    run = tmp_path / "x"
    stages = {"pretrain": {"out_dir": str(run / "pretrain"), "data": {"source": "builtin:tinyshakespeare", "mix": [
        {"source": "builtin:tinyshakespeare", "weight": 0.5}, {"source": "builtin:tinyworld/quiz", "weight": 0.5}]},
        "train": {"max_steps": 320, "lr": 3e-3}},
        "sft": {"model": str(run / "pretrain" / "model"), "data": "builtin:tinyworld/sft_careless",
                "out_dir": str(run / "sft"), "train": {"max_steps": 100, "lr": 1e-3}}}
    for name, config in stages.items():
        shutil.copytree(model, run / name / "model")
        (run / name / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "sft" / "eval").mkdir()
    (run / "sft" / "eval" / "eval.json").write_text(json.dumps(
        {"task": "tinyworld", "problems": 200, "accuracy": {"value": 0.795, "ci": [0.74, 0.85], "n": 200},
         "format_rate": {"value": 1.0, "ci": [1.0, 1.0], "n": 200}}))
    (run / "sft" / "model" / "optimizer.safetensors").write_bytes(b"training state")  # must never go up
    return run


def test_dry_run_writes_the_card_and_lists_the_files(run_dir):
    model = run_dir / "sft" / "model"
    out = lmforge("push", f"model={model}", "repo_id=me/tiny-sft", "license=mit", "dry_run=true").stdout
    assert "would upload" in out and "README.md" in out and "model.safetensors" in out
    assert "optimizer.safetensors" not in out
    card = hub.ModelCard.load(model / "README.md")
    assert card.data.license == "mit" and card.data.library_name == "transformers"
    assert {"lmforge", "pretrain", "sft"} <= set(card.data.tags) and card.data.base_model is None
    (result,) = card.data.eval_results
    assert (result.dataset_name, result.metric_type, result.metric_value) == ("tinyworld", "accuracy", 0.795)
    text = card.text
    assert "pretrain -> sft" in text and "trained from scratch" in text
    assert "`builtin:tinyworld/sft_careless`" in text and "`builtin:tinyworld/quiz`" in text
    assert "| sft | tinyworld (200 problems) | 79.5% [74.0%, 85.0%] | 100.0% [100.0%, 100.0%] |" in text
    assert "data: builtin:tinyworld/sft_careless" in text  # the recipe
    assert "released under `mit`" in text


def test_upload_goes_through_upload_folder(run_dir, monkeypatch):
    calls = {}
    monkeypatch.setattr(hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("create", (repo_id, kw)))
    monkeypatch.setattr(hub.HfApi, "upload_folder", lambda self, **kw: calls.setdefault("upload", kw) and "done")
    summary = run_push(PushConfig(model=str(run_dir / "sft" / "model"), repo_id="me/tiny-sft", license="mit",
                                  private=True))
    assert calls["create"] == ("me/tiny-sft", {"private": True, "exist_ok": True, "repo_type": "model"})
    upload = calls["upload"]
    assert upload["folder_path"] == str(run_dir / "sft" / "model") and upload["repo_id"] == "me/tiny-sft"
    assert "optimizer.safetensors" in upload["ignore_patterns"]
    assert {f["path"] for f in summary["files"]} >= {"README.md", "config.json", "model.safetensors"}


def test_imported_base_model_is_named(tmp_path, tiny_model_dir):
    base = tmp_path / "smol"
    shutil.copytree(tiny_model_dir("push_base"), base)
    (base / "import_summary.json").write_text(json.dumps({"source": "smollm2"}))
    sft = tmp_path / "sft"
    shutil.copytree(base, sft / "model", ignore=shutil.ignore_patterns("import_summary.json"))
    (sft / "config.yaml").write_text(yaml.safe_dump({"model": str(base), "data": "chats.jsonl"}))
    run_push(PushConfig(model=str(sft / "model"), repo_id="me/smol-sft", license="apache-2.0", dry_run=True))
    card = hub.ModelCard.load(sft / "model" / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.license == "apache-2.0"


def test_missing_licence_is_one_clear_error(run_dir):
    proc = lmforge("push", f"model={run_dir / 'sft' / 'model'}", "repo_id=me/x", check=False)
    assert proc.returncode == 2 and "license=... is required" in proc.stderr
