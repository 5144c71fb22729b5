"""`lmforge report` on a synthetic run directory: the table, side-by-side samples, embedded plots, valid HTML."""

import base64
import json
import struct
import sys
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from lmforge.apps.report import Stage, collect_stages, read_metrics, stage_table, write_report
from lmforge.cli import main
from lmforge.errors import DataError


def tiny_png(rgb=(200, 30, 30)) -> bytes:
    """A valid 2x2 PNG, written by hand (no matplotlib needed to make a stage's plot)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes(rgb) * 2 for _ in range(2))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def write_stage(run, name, summary=None, metrics=None, files=None):
    d = run / name
    d.mkdir(parents=True)
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))
    if metrics is not None:
        (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    for fname, data in (files or {}).items():
        (d / fname).parent.mkdir(parents=True, exist_ok=True)
        (d / fname).write_bytes(data if isinstance(data, bytes) else data.encode())
    return d


QUESTION = "What is 347 + 289?"


@pytest.fixture
def run(tmp_path):
    run = tmp_path / "runs" / "tiny"
    write_stage(run, "pretrain", {"val_loss": 1.8765, "seconds": 61.2, "steps": 320,
                                  "sample": f"{QUESTION} What is 12 + 5? What is"},
                [{"step": s, "loss": 4 - s / 100} for s in range(0, 300, 10)] + [{"step": 300, "val_loss": 1.9}],
                {"config.yaml": f"sample_prompt: '{QUESTION}'\n"})
    write_stage(run, "sft", {"seconds": 30, "accuracy": {"value": 0.62, "ci": [0.55, 0.7], "n": 200},
                             "samples": [{"prompt": QUESTION, "response": "347 + 289: 7+9=16. The answer is 636."},
                                         {"prompt": "What is 5 - 3?", "response": "The answer is 2."}]},
                [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "val_loss": 1.6}])
    write_stage(run, "grpo", {"eval/accuracy last": 0.8, "reward last": 0.75, "steps": 10},
                [{"step": 1, "loss": 0.1, "kl": 0.02}, {"step": 2, "loss": 0.05, "kl": 0.03, "eval/mean_length": 12.0}])
    write_stage(run, "dpo", {"eval_rewards/accuracies": 0.9, "eval_loss": 0.45, "kl": 0.0123, "mean_response_tokens": 17.5,
                             "samples": [{"prompt": QUESTION, "response": "<script>alert('x')</script> | 636 & more"}]},
                [{"step": 1, "loss": 0.69}, {"step": 2, "loss": 0.5}],
                {"beta_sweep.png": tiny_png(), "eval/reward_hacking.png": tiny_png((0, 90, 200)),
                 "eval/eval.json": json.dumps({"accuracy": 0.7, "reward": 1.25, "kl": 99.0})})
    (run / "notes").mkdir()  # not a stage: ignored
    return run


class StrictHTML(HTMLParser):
    """Checks that every non-void tag closes in order, and collects img sources and text."""
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.images, self.text, self.errors = [], [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def test_report_table_samples_and_embedded_images(run):
    out = write_report(run)
    assert out["stages"] == ["pretrain", "sft", "dpo", "grpo"]  # pipeline order, not alphabetical
    md = (run / "report.md").read_text()
    page = (run / "report.html").read_text()

    # the stage table: one row per stage, CI where given, missing values as a dash, eval.json fills gaps only
    assert "| stage | loss | accuracy | pref. acc. | reward | KL | length | steps | time |" in md
    assert "| pretrain | 1.877 | — | — | — | — | — | 320 | 61 s |" in md
    assert "| sft | 1.600 | 62.0% [55.0%, 70.0%] | — | — | — | — | 2 | 30 s |" in md  # the last val_loss logged
    assert "| dpo | 0.450 | 70.0% | 90.0% | 1.250 | 0.0123 | 17.5 | 2 | — |" in md  # the stage's own KL wins
    assert "| grpo | 0.050 | 80.0% | — | 0.750 | 0.0300 | 12.0 | 10 | — |" in md  # summary, else metrics

    # samples side by side: the base model's continuation next to the SFT and DPO answers to the same prompt
    row = next(line for line in md.splitlines() if line.startswith(f"| {QUESTION} |"))
    assert "What is 12 + 5? What is" in row and "The answer is 636." in row
    assert "&lt;script&gt;alert('x')&lt;/script&gt; \\| 636 &amp; more" in row
    assert "| What is 5 - 3? | — | The answer is 2. | — |" in md  # grpo has no samples: no column
    assert "![loss curves](loss_curves.png)" in md and "(dpo/beta_sweep.png)" in md
    assert "(dpo/eval/reward_hacking.png)" in md and "*dpo: beta sweep*" in md

    parser = StrictHTML()
    parser.feed(page)
    parser.close()
    assert not parser.errors and parser.stack == [] and page.startswith("<!DOCTYPE html>")
    assert "<script>" not in page and "&lt;script&gt;" in page
    sources = [img["src"] for img in parser.images]
    assert len(sources) == 3 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert base64.b64encode(tiny_png()).decode() in page  # the stage's PNG, embedded byte for byte
    assert base64.b64decode(sources[0].split(",", 1)[1]) == (run / "loss_curves.png").read_bytes()
    text = "".join(parser.text)
    assert "dpo (eval): reward hacking" in text and "347 + 289: 7+9=16. The answer is 636." in text


def test_report_is_deterministic_and_runs_from_the_cli(run, tmp_path, capsys):
    write_report(run)
    first = {name: (run / name).read_bytes() for name in ("report.md", "report.html", "loss_curves.png")}
    assert main(["report", str(run)]) == 0
    assert "4 stages (pretrain, sft, dpo, grpo)" in capsys.readouterr().out
    assert first == {name: (run / name).read_bytes() for name in first}

    out = tmp_path / "elsewhere"  # the Markdown's image paths follow the output directory
    assert main(["report", str(run), f"out_dir={out}", "title=My <run>"]) == 0
    md = (out / "report.md").read_text()
    assert md.startswith("# My &lt;run&gt;") and "(../runs/tiny/dpo/beta_sweep.png)" in md
    assert "<title>My &lt;run&gt;</title>" in (out / "report.html").read_text()


def test_report_without_matplotlib(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'lmforge\[plots\]' \(or run it with plots=false\)"):
        write_report(run)
    out = write_report(run, plots=False)
    assert out["loss_curves"] is None and "<img" not in (run / "report.html").read_text()


def test_bad_inputs_are_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such run directory"):
        write_report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no stage directories"):
        write_report(tmp_path / "empty")
    run = tmp_path / "run"
    write_stage(run, "sft", {"loss": 1.0}, files={"metrics.jsonl": '{"step": 1, "loss": 2}\n{"step": 2, "loss"\n'})
    with pytest.raises(DataError, match=r"sft/metrics.jsonl:2: invalid JSON"):
        collect_stages(run)


def test_columns_that_no_stage_has_are_left_out():
    stage = Stage("sft", Path("."), summary={"steps": 3, "accuracy": float("nan")}, metrics=[{"step": 1, "loss": 1.0}])
    headers, rows = stage_table([stage])
    assert headers == ["stage", "loss", "steps"] and rows == [["sft", "1.000", "3"]]


def test_read_metrics_drops_rows_superseded_by_a_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 3}, {"step": 2, "loss": 2}, {"step": 3, "loss": 9}, {"step": 2, "event": "resume"},
            {"step": 3, "loss": 1}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 3), (2, 2), (3, 1)]


def test_an_eval_stage_of_its_own(tmp_path):
    run = tmp_path / "run"
    write_stage(run, "eval", files={"eval.json": json.dumps({
        "accuracy": {"value": 0.25, "ci": [0.1, 0.4], "n": 40}, "kl": 0.5,
        "samples": [{"prompt": QUESTION, "response": "The answer is 636."}]})})
    write_report(run, plots=False)
    md = (run / "report.md").read_text()
    assert "| eval | 25.0% [10.0%, 40.0%] | 0.5000 |" in md and f"| {QUESTION} | The answer is 636. |" in md


def test_stage_tables_and_the_by_level_table(tmp_path):
    run = tmp_path / "run"
    level = lambda acc, lo, hi, think: {"accuracy": {"value": acc, "ci": [lo, hi], "n": 40},
                                        "mean_thinking_tokens": think, "mean_response_tokens": think + 6}
    write_stage(run, "sft", {"steps": 3}, files={"eval/eval.json": json.dumps(
        {"accuracy": 0.5, "by_level": {"1": level(0.9, 0.8, 1.0, 12.0), "5": level(0.2, 0.1, 0.35, 40.25)}})})
    write_stage(run, "grpo_length", {"steps": 3}, files={"eval/eval.json": json.dumps(
        {"accuracy": 0.6, "by_level": {"1": level(0.95, 0.9, 1.0, 4.0), "5": level(0.3, 0.15, 0.45, 38.0)}})})
    write_stage(run, "budget_sweep", files={"summary.json": "{}", "tables.json": json.dumps(
        [{"title": "accuracy by budget", "headers": ["setting", "level 5"], "rows": [["budget=8", "25%"]]}])})
    write_report(run, plots=False)
    md = (run / "report.md").read_text()
    assert "| stage | level 1 | level 5 |" in md
    assert "| sft | 90% [80%, 100%], 12.0 tok | 20% [10%, 35%], 40.2 tok |" in md
    assert "| grpo_length | 95% [90%, 100%], 4.0 tok | 30% [15%, 45%], 38.0 tok |" in md
    assert "### budget_sweep: accuracy by budget" in md and "| budget=8 | 25% |" in md
    html_text = (run / "report.html").read_text()
    assert "accuracy by budget" in html_text and "40.2 tok" in html_text
    (run / "budget_sweep" / "tables.json").write_text('[{"title": "x"}]')
    with pytest.raises(DataError, match="budget_sweep/tables.json"):
        collect_stages(run)
