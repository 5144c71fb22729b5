"""Typed configs: recipes + overrides, and errors that name the key and the file."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from lmforge.config import load_config, parse_override
from lmforge.errors import ConfigError


@dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclass
class Outer:
    name: str = "run"
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)
    limit: int | None = None


def write(tmp_path, text):
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return p


def test_recipe_and_overrides_are_merged_and_typed(tmp_path):
    p = write(tmp_path, "name: a\ninner:\n  lr: 3e-4\n  steps: 5\n")
    cfg = load_config(Outer, p, ["inner.steps=7", "tags=[x, y]", "limit=null"])
    assert cfg.name == "a" and cfg.inner.lr == 3e-4 and cfg.inner.steps == 7
    assert cfg.tags == ["x", "y"] and cfg.limit is None and cfg.inner.schedule == "cosine"


def test_unknown_key_names_the_key_and_file(tmp_path):
    p = write(tmp_path, "inner:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml.*unknown key inner\.'lrr'.*known keys in inner: lr, steps"):
        load_config(Outer, p)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"inner.steps: expected an integer, got 'many'"):
        load_config(Outer, None, ["inner.steps=many"])
    with pytest.raises(ConfigError, match=r"inner.schedule: 'linear' is not one of 'cosine', 'constant'"):
        load_config(Outer, None, ["inner.schedule=linear"])


def test_invalid_yaml_names_the_line(tmp_path):
    p = write(tmp_path, "name: a\ninner: [unclosed\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml:\d+: invalid YAML"):
        load_config(Outer, p)


def test_override_parsing():
    assert parse_override("a.b=3")[1].parsed == 3
    assert load_config(Outer, None, ["name=JULIET: hi"]).name == "JULIET: hi"  # raw text for string fields
    assert load_config(Outer, None, ["name=123"]).name == "123"
    assert load_config(Inner, None, ["lr=3e-4"]).lr == 3e-4
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("nonsense")


def test_missing_recipe_lists_builtins():
    with pytest.raises(ConfigError, match="neither a file nor a built-in recipe"):
        load_config(Outer, "no-such-recipe")


def test_recipe_variables_are_substituted_and_overridable(tmp_path):
    recipe = write(tmp_path, "run_dir: runs/a\nstage:\n  name: ${run_dir}/sft\n  tags: ['${run_dir}/x', plain]\n")
    cfg = load_config(Outer, recipe, section="stage")
    assert cfg.name == "runs/a/sft" and cfg.tags == ["runs/a/x", "plain"]
    cfg = load_config(Outer, recipe, ["run_dir=/tmp/b"], section="stage")
    assert cfg.name == "/tmp/b/sft" and cfg.tags == ["/tmp/b/x", "plain"]
    bad = write(tmp_path, "stage:\n  name: ${nope}/sft\n")
    with pytest.raises(ConfigError, match=r"\$\{nope\}.*not a top-level value"):
        load_config(Outer, bad, section="stage")
