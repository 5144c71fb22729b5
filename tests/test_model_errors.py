"""A model directory that cannot load is one line naming the file and exit 2, in every verb that loads one.

Damage: model.safetensors cut in half, config.json missing or cut short, pickle-only weights, a tokenizer.json
cut short. The matrix runs the CLI in-process (lmforge.cli.main: the same dispatch and error handling, without
an interpreter start per case); one case runs as a real subprocess to show the exit code and no traceback.
"""

import json
import shutil

import pytest
from lmforge_cli import lmforge

from lmforge import cli
from lmforge.apps.verbs import VERBS
from lmforge.errors import ModelLoadError
from lmforge.modelio import check_model_dir, load_model_and_tokenizer, load_model_dir, weight_names

pytestmark = pytest.mark.usefixtures("one_thread")


def damage(good, target, kind):
    """A copy of the model directory ``good`` at ``target``, damaged one way; returns (dir, the file to name)."""
    shutil.copytree(good, target)
    weights, config = target / "model.safetensors", target / "config.json"
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
        return target, weights
    if kind == "no_config":
        config.unlink()
        return target, target
    if kind == "pickle_only":
        weights.unlink()
        (target / "pytorch_model.bin").write_bytes(b"\x80\x04not a model")
        return target, target
    if kind == "bad_config":
        config.write_text(config.read_text()[:40])
        return target, config
    if kind == "bad_tokenizer":
        tok = target / "tokenizer.json"
        tok.write_text(tok.read_text()[:100])
        return target, tok
    raise ValueError(kind)


KINDS = ("truncated", "no_config", "pickle_only", "bad_config", "bad_tokenizer")


@pytest.fixture(scope="module")
def files(tiny_model_dir, tmp_path_factory):
    """The damaged model directories and small valid inputs for every verb."""
    root = tmp_path_factory.mktemp("damaged")
    good = tiny_model_dir("good", text="What is 2+3? The answer is 5. hi hello\n")
    dirs = {kind: damage(good, root / kind, kind) for kind in KINDS}
    rows = {"sft.jsonl": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            "prefs.jsonl": {"prompt": "hi", "chosen": "hello", "rejected": "go"},
            "unpaired.jsonl": {"prompt": "hi", "completion": "hello", "label": True},
            "prompts.jsonl": {"prompt": "What is 2+3?", "answer": "5"}}
    for name, row in rows.items():
        (root / name).write_text(json.dumps(row) + "\n")
    (root / "corpus.txt").write_text("the king rode to the castle\n\nthe queen spoke of rain\n" * 10)
    return root, good, dirs


def verb_args(verb, model, root, good, out):
    """The verb's arguments with ``model`` as the model it loads (valid data for everything else)."""
    return {
        "chat": ["chat", f"model={model}", "message=hi"],
        "sample": ["sample", f"model={model}", "prompt=hi"],
        "generate": ["generate", f"model={model}", f"input={root / 'prompts.jsonl'}", f"output={out / 'g.jsonl'}"],
        "think": ["think", f"model={model}", f"input={root / 'prompts.jsonl'}", f"out_dir={out}"],
        "eval": ["eval", f"model={model}", f"perplexity={root / 'corpus.txt'}", f"out_dir={out}"],
        "sft": ["sft", f"model={model}", f"data={root / 'sft.jsonl'}", f"out_dir={out}"],
        "reward": ["reward", f"model={model}", f"data.source={root / 'prefs.jsonl'}", f"out_dir={out}"],
        "dpo": ["dpo", f"model={model}", f"data.source={root / 'prefs.jsonl'}", f"out_dir={out}"],
        "kto": ["kto", f"model={model}", f"data.source={root / 'unpaired.jsonl'}", f"out_dir={out}"],
        "grpo": ["grpo", f"model={model}", f"data.source={root / 'prompts.jsonl'}", f"out_dir={out}"],
        "ppo": ["ppo", f"model={model}", f"data.source={root / 'prompts.jsonl'}", f"out_dir={out}"],
        "online-dpo": ["online-dpo", f"model={model}", f"data.source={root / 'prompts.jsonl'}", f"out_dir={out}"],
        "midtrain": ["midtrain", f"model={model}", f"out_dir={out}"],
        "pretrain": ["pretrain", f"init_from={model}", f"tokenizer={good}", f"data.source={root / 'corpus.txt'}",
                     "data.mix=[]", f"out_dir={out}"],
        "quantize": ["quantize", f"model={model}", f"out={out / 'q'}"],
        "serve": ["serve", f"model={model}", "port=0"],
        "import": ["import", str(model), f"out_dir={out / 'imported'}"],
        "export": ["export", "gguf", str(model), f"out={out / 'model.gguf'}"],
        "push": ["push", f"model={model}", "repo_id=someone/tiny", "license=mit", "dry_run=true"],
        "prm": ["prm", f"model={model}", "num_problems=2", "eval_num_problems=2", f"out_dir={out}"],
    }[verb]


MODEL_VERBS = ("chat", "sample", "generate", "think", "eval", "sft", "reward", "dpo", "kto", "grpo", "ppo",
               "online-dpo", "midtrain", "pretrain", "quantize", "serve", "import", "export", "push", "prm")
CASES = [(verb, kind) for verb in MODEL_VERBS for kind in ("truncated", "no_config")] + \
        [(verb, kind) for verb in ("sft", "eval", "chat", "serve", "quantize", "pretrain")
         for kind in ("pickle_only", "bad_config", "bad_tokenizer")]


def test_the_matrix_covers_every_verb_that_loads_a_model():
    assert set(MODEL_VERBS) <= set(VERBS)
    assert set(VERBS) - set(MODEL_VERBS) == {"pipeline", "tokenizer", "constitutional", "scaling", "report", "data"}


@pytest.mark.parametrize(("verb", "kind"), CASES)
def test_a_broken_model_is_one_line_naming_the_file_and_exit_2(verb, kind, files, tmp_path, capsys):
    root, good, dirs = files
    model, named = dirs[kind]
    if kind == "bad_tokenizer" and verb == "pretrain":  # pretrain reads its tokenizer from tokenizer=
        args = verb_args(verb, good, root, model, tmp_path / "out")
    else:
        args = verb_args(verb, model, root, good, tmp_path / "out")
    rc = cli.main(args)  # an exception escaping here is the traceback a user would see
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert f"lmforge {verb}:" in err[-1] and str(named) in err[-1], err[-1]


def test_subprocess_exit_code_and_no_traceback(files, tmp_path):
    _, _, dirs = files
    model, named = dirs["truncated"]
    proc = lmforge("sft", f"model={model}", f"out_dir={tmp_path}", check=False, threads=1)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"lmforge sft: model error: {named}: cannot read")


@pytest.mark.parametrize("kind", KINDS)
def test_the_loader_raises_model_load_error_naming_the_file(kind, files):
    _, _, dirs = files
    model, named = dirs[kind]
    with pytest.raises(ModelLoadError, match=str(named)):
        load_model_and_tokenizer(model, "cpu")
    if kind != "bad_tokenizer":
        with pytest.raises(ModelLoadError, match=str(named)):
            check_model_dir(model)  # the headers-only check stages run before their data work


def test_the_loader_names_shape_mismatches_and_missing_dirs(files, tmp_path):
    _, good, _ = files
    odd = tmp_path / "odd"
    shutil.copytree(good, odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(ModelLoadError, match=f"{odd}: weights do not match config.json"):
        load_model_dir(odd)
    with pytest.raises(ModelLoadError, match="nowhere: no such model directory"):
        load_model_dir(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="a file, not a model directory"):
        load_model_dir(tmp_path / "file.txt")
    assert "model.embed_tokens.weight" in weight_names(good)
