"""lm-evaluation-harness on lmforge's engine (lmforge.harness): the same scores as lm-eval's own ``hf`` model on the
same checkpoint, opened by transformers, for a multiple-choice, a generate_until and a perplexity task written for
these tests (tests/harness_tasks: local YAMLs and data, no hub)."""

import json
from pathlib import Path

import pytest
import torch
from lmforge_cli import lmforge

from lmforge.apps.report import write_report
from lmforge.model import ModelConfig, Transformer
from lmforge.modelio import load_model_dir, load_tokenizer, save_model_dir
from lmforge.tokenizer import train_tokenizer

lm_eval = pytest.importorskip("lm_eval")
TaskManager = pytest.importorskip("lm_eval.tasks").TaskManager
LmforgeLM = pytest.importorskip("lmforge.harness").LmforgeLM  # imports lm_eval at its top
pytest.importorskip("transformers")

REPO = Path(__file__).parent.parent
TASKS = ["lmforge_tiny_mc", "lmforge_tiny_gen", "lmforge_tiny_ppl"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random 2-layer model whose context (64) is shorter than some texts, so rolling windows split."""
    text = "Question: What is 2 + 3?\nAnswer: 5\nThe assistant answers the user. Response A or B? I can help.\n"
    tok = train_tokenizer([text] * 20, vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                    max_position_embeddings=64))
    path = tmp_path_factory.mktemp("harness") / "model"
    save_model_dir(path, model, tok)
    return path


@pytest.fixture(scope="module")
def offline():
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.chdir(REPO)  # the task YAMLs name their data files relative to the repository root
    yield
    mp.undo()


def evaluate(model, **kw):
    return lm_eval.simple_evaluate(model=model, tasks=TASKS, task_manager=TaskManager(include_path="tests/harness_tasks",
                                                                                  include_defaults=False),
                                   bootstrap_iters=0, batch_size=4, **kw)


@pytest.fixture(scope="module")
def hf_results(model_dir, offline):
    return evaluate("hf", model_args={"pretrained": str(model_dir), "dtype": "float32", "device": "cpu"})


def printed(results: dict) -> dict:
    """{(task, metric): value} as lm-eval's table prints it (4 decimals)."""
    return {(task, key): f"{value:.4f}" for task, metrics in results["results"].items()
            for key, value in metrics.items() if "," in key and isinstance(value, float)}


def test_same_scores_and_answers_as_lm_evals_hf_model(model_dir, hf_results):
    ours = evaluate(LmforgeLM(model=load_model_dir(model_dir), tokenizer=load_tokenizer(model_dir), batch_size=4))
    assert printed(ours) == printed(hf_results) and len(printed(ours)) == 6
    for task in TASKS:
        mine, theirs = ours["samples"][task], hf_results["samples"][task]
        assert len(mine) == len(theirs) > 0
        for a, b in zip(mine, theirs):
            assert a["doc_id"] == b["doc_id"]
            if task == "lmforge_tiny_gen":  # the generated text itself, not just the score
                assert a["resps"] == b["resps"] and a["resps"][0][0]
            else:
                for x, y in zip(sum(a["resps"], []), sum(b["resps"], [])):  # (log p, is_greedy), or log p
                    x, y = (x, y) if isinstance(x, tuple) else ((x,), (y,))
                    assert x[0] == pytest.approx(y[0], abs=1e-4) and x[1:] == y[1:]


def test_cli_writes_harness_results_into_eval_json(model_dir, hf_results, tmp_path):
    out = lmforge("eval", f"model={model_dir}", "harness=lmforge_tiny_mc,lmforge_tiny_ppl",
                  "harness_include=tests/harness_tasks", f"out_dir={tmp_path}", "batch_size=4", threads=1).stdout
    assert "lmforge_tiny_mc" in out and "acc_norm" in out  # lm-eval's table
    harness = json.loads((tmp_path / "eval.json").read_text())["harness"]
    expected = printed(hf_results)
    for task in ("lmforge_tiny_mc", "lmforge_tiny_ppl"):
        for metric, value in harness[task].items():
            if not metric.endswith("_stderr"):
                assert f"{value:.4f}" == expected[(task, f"{metric},none")]
    assert (tmp_path / "harness.md").exists()


@pytest.mark.slow  # searching lm-eval's own index of ~15k task YAMLs takes a while
def test_unknown_task_is_one_clear_error(model_dir, offline, tmp_path):
    proc = lmforge("eval", f"model={model_dir}", "harness=no_such_task", f"harness_include={tmp_path}",
                   f"out_dir={tmp_path}", check=False)  # an empty include dir: lm-eval's own index is searched too
    assert proc.returncode == 2 and "'no_such_task' is not known to lm-eval" in proc.stderr


def test_report_shows_the_harness_table(tmp_path):
    stage = tmp_path / "sft"
    (stage / "eval").mkdir(parents=True)
    (stage / "eval" / "eval.json").write_text(json.dumps(
        {"accuracy": 0.5, "harness": {"lmforge_tiny_mc": {"acc": 0.25, "acc_stderr": 0.1637, "acc_norm": 0.375}}}))
    md = Path(write_report(tmp_path, plots=False)["markdown"]).read_text()
    assert "## lm-evaluation-harness" in md
    assert "| sft | lmforge_tiny_mc | acc | 0.2500 ± 0.1637 |" in md and "| sft | lmforge_tiny_mc | acc_norm | 0.3750 |" in md
