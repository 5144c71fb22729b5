"""``lmforge push model=DIR repo_id=USER/NAME license=mit``: a model directory to the Hugging Face Hub.

Writes a model card (``README.md`` in the model directory: base model, data, the stages that made it, the eval
table, the resolved recipe, the licence; lmforge.modelcard), then uploads the directory with huggingface_hub's
``upload_folder`` (creating the repository if needed). Training state (optimizer, RNG, trainer state) never goes
up. ``dry_run=true`` writes the card and lists the files that would be uploaded, touching no network.
The token comes from ``HF_TOKEN`` or ``huggingface-cli login``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from lmforge.config import parse_cli
from lmforge.modelcard import model_card

IGNORE = ["optimizer.safetensors", "rng.safetensors", "trainer_state.json", "*.tmp", ".*"]  # training state


@dataclass
class PushConfig:
    model: str = ""  # the model directory (e.g. runs/tiny/dpo/model)
    repo_id: str = ""  # USER/NAME or ORG/NAME on the hub
    license: str = ""  # the weights' licence (SPDX-style id: mit, apache-2.0, ...), written into the card
    private: bool = False
    revision: str = ""  # a branch; empty: main
    commit_message: str = "Upload model trained with lmforge"
    dry_run: bool = False  # write the card and list the files; no network
    card: bool = True  # false: upload the directory as it is (keep an existing README.md)

    def validate(self) -> None:
        for key in ("model", "repo_id", "license"):
            if not getattr(self, key):
                raise ValueError(f"{key}=... is required (lmforge push model=DIR repo_id=USER/NAME license=mit)")
        if self.repo_id.count("/") != 1 or not all(self.repo_id.split("/")):
            raise ValueError(f"repo_id must look like USER/NAME, got {self.repo_id!r}")
        if not (Path(self.model) / "config.json").is_file():
            raise ValueError(f"model={self.model}: not a model directory (no config.json)")


def files_to_upload(model_dir: Path) -> list[Path]:
    """The files upload_folder sends: everything in the directory but training state and hidden files."""
    return sorted(p for p in model_dir.rglob("*") if p.is_file()
                  and not any(fnmatch.fnmatch(part, pattern) for part in p.relative_to(model_dir).parts
                              for pattern in IGNORE))


def run_push(cfg: PushConfig) -> dict:
    """Write the card, then upload (or, with dry_run, only list); returns what was (or would be) sent."""
    model_dir = Path(cfg.model)
    if cfg.card:
        (model_dir / "README.md").write_text(model_card(model_dir, cfg.license, cfg.repo_id), encoding="utf-8")
    files = files_to_upload(model_dir)
    summary = {"repo_id": cfg.repo_id, "model": str(model_dir), "dry_run": cfg.dry_run,
               "card": str(model_dir / "README.md") if cfg.card else None,
               "files": [{"path": p.relative_to(model_dir).as_posix(), "bytes": p.stat().st_size} for p in files]}
    if cfg.dry_run:
        return summary
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ImportError("lmforge push needs huggingface_hub: pip install huggingface_hub") from None
    api = HfApi()
    api.create_repo(cfg.repo_id, private=cfg.private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(folder_path=str(model_dir), repo_id=cfg.repo_id, repo_type="model",
                               revision=cfg.revision or None, commit_message=cfg.commit_message,
                               ignore_patterns=IGNORE)
    summary["url"] = str(getattr(commit, "commit_url", commit))
    return summary


def main(argv: list[str]) -> int:
    cfg = parse_cli(argv, PushConfig, prog="lmforge push", description=__doc__)
    summary = run_push(cfg)
    total = sum(f["bytes"] for f in summary["files"])
    verb = "would upload" if cfg.dry_run else "uploaded"
    print(f"{verb} {len(summary['files'])} files ({total / 1e6:.1f} MB) from {cfg.model} to {cfg.repo_id}:")
    for f in summary["files"]:
        print(f"  {f['path']}  {f['bytes']:,} bytes")
    if summary["card"]:
        print(f"model card: {summary['card']}")
    if "url" in summary:
        print(summary["url"])
    return 0
