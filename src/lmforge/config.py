"""Typed configs: dataclasses, YAML recipes and dotted ``key=value`` overrides.

A recipe is a YAML mapping whose keys mirror a stage's config dataclass. Overrides from the command line
(``train.lr=3e-4 model.hidden_size=128``) are applied on top. Every value is checked against the
dataclass field's type; unknown keys and wrong types raise :class:`ConfigError` naming the key and the
file it came from. The resolved config is written beside every run as ``config.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lmforge.errors import ConfigError

T = TypeVar("T")


def recipe_path(name_or_path: str) -> Path:
    """A recipe given by path, or by the name of a built-in recipe (``tiny`` -> recipes/tiny.yaml)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    builtin = resources.files("lmforge") / "recipes" / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if builtin.is_file():
        return Path(str(builtin))
    names = sorted(f.name.removesuffix(".yaml") for f in (resources.files("lmforge") / "recipes").iterdir()
                   if f.name.endswith(".yaml"))
    raise ConfigError(f"recipe {name_or_path!r} is neither a file nor a built-in recipe ({', '.join(names)})")


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys to values, got {type(data).__name__}")
    return data


class Override(str):
    """A command-line value: its raw text for string fields (``prompt=JULIET:``), parsed YAML for the rest."""

    @property
    def parsed(self) -> Any:
        try:
            return yaml.safe_load(self) if self.strip() else ""
        except yaml.YAMLError:
            return str(self)


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=3`` -> ("a.b", Override("3")): numbers, bools, lists and null parse as YAML where a field wants them."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. train.lr=3e-4)")
    key, raw = text.split("=", 1)
    return key.strip(), Override(raw)


def set_dotted(tree: dict, key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _check_type(value: Any, tp: Any, key: str, src: str) -> Any:
    if isinstance(value, Override):
        value = str(value) if tp is str else value.parsed
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key, src)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{src}{key}: bad value {value!r}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{src}{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{src}{key}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_check_type(v, item_tp, f"{key}[{i}]", src) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{src}{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{src}{key}: expected a section (mapping), got {value!r}")
        return _build(tp, value, key + ".", src)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{src}{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{src}{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{src}{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{src}{key}: expected a string, got {value!r}")
    return value


def _build(cls: type[T], data: dict, prefix: str, src: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"{src}unknown key {prefix}{unknown[0]!r} (known keys in "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(fields)})")
    kwargs = {k: _check_type(v, hints[k], prefix + k, src) for k, v in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as e:
            raise ConfigError(f"{src}{prefix.rstrip('.') or 'config'}: {e}") from None
    return obj


def from_dict(cls: type[T], data: dict, source: str | None = None) -> T:
    """Build a config dataclass from a nested dict, checking every key and type."""
    return _build(cls, data, "", f"{source}: " if source else "")


def load_config(cls: type[T], recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                section: str | None = None) -> T:
    """Recipe file (or built-in name) + dotted overrides -> a checked config of type ``cls``.

    ``section`` picks one stage's part of a multi-stage recipe (e.g. ``pretrain`` from a pipeline recipe).
    """
    data: dict = {}
    source = None
    if recipe is not None:
        path = recipe_path(str(recipe))
        source = str(path)
        data = read_yaml(path)
    variables = {}
    if recipe is not None and section is not None:
        variables = top_level_values(data)
        data = _section(data, section, source)
    for text in overrides:
        key, value = parse_override(text)
        if key in variables:  # ``run_dir=runs/exp`` re-roots every ${run_dir} of the recipe
            variables[key] = str(value)
        else:
            set_dotted(data, key, value)
    if overrides:
        source = f"{source} + overrides" if source else "overrides"
    return from_dict(cls, substitute(data, variables, source or "config"), source)


def top_level_values(recipe: dict) -> dict:
    """A multi-stage recipe's variables: its top-level scalars (``run_dir``), written ``${name}`` in any section."""
    return {k: v for k, v in recipe.items() if not isinstance(v, dict)}


def substitute(tree: Any, variables: dict, source: str) -> Any:
    """Replace ``${name}`` in string values with the recipe's top-level scalar ``name`` (e.g. ``run_dir``)."""
    if isinstance(tree, dict):
        return {k: substitute(v, variables, source) for k, v in tree.items()}
    if isinstance(tree, list):
        return [substitute(v, variables, source) for v in tree]
    if not isinstance(tree, str) or "${" not in tree:
        return tree
    out = tree
    for name in re.findall(r"\$\{(\w+)\}", tree):
        if name not in variables:
            raise ConfigError(f"{source}: ${{{name}}} in {tree!r} is not a top-level value of the recipe "
                              f"(variables: {', '.join(variables) or 'none'})")
        out = out.replace("${" + name + "}", str(variables[name]))
    return type(tree)(out) if isinstance(tree, Override) else out


def _section(data: dict, section: str, source: str) -> dict:
    """One stage's part of a multi-stage (pipeline) recipe."""
    if section not in data:
        raise ConfigError(f"{source}: no {section!r} section (sections: {', '.join(data)})")
    if not isinstance(data[section], dict):
        raise ConfigError(f"{source}: {section!r} must be a mapping")
    return dict(data[section])


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


def parse_cli(argv: list[str], cls: type[T], *, prog: str, description: str,
              default_recipe: str | None = None, section: str | None = None) -> T:
    """The one way every stage verb reads its arguments: ``[--config RECIPE] [key=value ...]``.

    ``--help`` prints the verb's description and every config key with its default.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="config keys (override with key=value):\n" + describe(cls))
    parser.add_argument("--config", "-c", default=default_recipe,
                        help=f"recipe YAML file or built-in recipe name (default: {default_recipe})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = parser.parse_args(argv)
    return load_config(cls, args.config, args.overrides, section=section)


def describe(cls: type, prefix: str = "") -> str:
    """One line per config key with its default, for ``--help``."""
    lines = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(describe(tp, prefix + f.name + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        lines.append(f"  {prefix}{f.name} = {default!r}")
    return "\n".join(lines)
