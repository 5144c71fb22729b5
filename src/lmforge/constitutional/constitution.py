"""Constitutions: named principles, each a critique request, a revision request and an optional choice prompt.

A constitution is a YAML file (see lmforge/constitutions/default.yaml)::

    name: my-assistant
    principles:
      - name: harmless
        critique_request: Point out every way in which the assistant's last answer could cause harm ...
        revision_request: Rewrite the answer so that it contains nothing harmful ...
        choice_prompt: Which response is less harmful?      # optional: pairwise judging (RLAIF)
    examples:                                              # optional few-shot critique/revision rounds
      - {prompt: ..., response: ..., principle: harmless, critique: ..., revision: ...}

Built-in constitutions are named by file stem: ``default`` (helpful, honest, harmless; 12 principles) and
``customer_service`` (brand voice, escalation, privacy). This module also renders the chat messages of the
critique, revision and judging turns, so every backend sees the same prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from lmforge.config import read_yaml
from lmforge.errors import ConfigError

Messages = list[dict]


@dataclass(frozen=True)
class Principle:
    name: str
    critique_request: str
    revision_request: str
    choice_prompt: str | None = None


@dataclass(frozen=True)
class Example:
    """One demonstrated critique/revision round, shown before the real conversation when few_shot > 0."""

    prompt: str
    response: str
    principle: Principle
    critique: str
    revision: str


@dataclass
class Constitution:
    name: str
    principles: list[Principle]
    examples: list[Example] = field(default_factory=list)
    description: str = ""
    source: str = ""

    def draw(self, rng: random.Random, for_choice: bool = False) -> Principle:
        """A principle drawn uniformly (only those with a choice_prompt when judging pairs)."""
        pool = [p for p in self.principles if p.choice_prompt] if for_choice else self.principles
        if not pool:
            raise ConfigError(f"{self.source}: no principle has a 'choice_prompt', which pairwise labelling needs")
        return rng.choice(pool)


def builtin_constitutions() -> list[str]:
    folder = resources.files("lmforge") / "constitutions"
    return sorted(f.name.removesuffix(".yaml") for f in folder.iterdir() if f.name.endswith(".yaml"))


def constitution_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    builtin = resources.files("lmforge") / "constitutions" / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if builtin.is_file():
        return Path(str(builtin))
    raise ConfigError(f"constitution {name_or_path!r} is neither a file nor a built-in one "
                      f"({', '.join(builtin_constitutions())})")


def load_constitution(name_or_path: str) -> Constitution:
    """Read and check a constitution; a bad one raises ConfigError naming the file and the field."""
    path = constitution_path(name_or_path)
    data = read_yaml(path)
    src = str(path)
    unknown = set(data) - {"name", "description", "principles", "examples"}
    if unknown:
        raise ConfigError(f"{src}: unknown key {sorted(unknown)[0]!r} (keys: name, description, principles, examples)")
    raw = data.get("principles")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{src}: 'principles' must be a non-empty list")
    principles = [_principle(p, f"{src}: principles[{i}]") for i, p in enumerate(raw)]
    by_name = {p.name: p for p in principles}
    if len(by_name) != len(principles):
        raise ConfigError(f"{src}: principle names must be unique")
    examples = [_example(e, f"{src}: examples[{i}]", by_name) for i, e in enumerate(data.get("examples") or [])]
    return Constitution(name=str(data.get("name") or path.stem), principles=principles, examples=examples,
                        description=str(data.get("description") or ""), source=src)


def _text(item: dict, key: str, where: str, required: bool = True) -> str | None:
    value = item.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: field {key!r} must be a non-empty string")
    return value.strip()


def _principle(item, where: str) -> Principle:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: a principle must be a mapping with name, critique_request, revision_request")
    unknown = set(item) - {"name", "critique_request", "revision_request", "choice_prompt"}
    if unknown:
        raise ConfigError(f"{where}: unknown field {sorted(unknown)[0]!r}")
    return Principle(_text(item, "name", where), _text(item, "critique_request", where),
                     _text(item, "revision_request", where), _text(item, "choice_prompt", where, required=False))


def _example(item, where: str, principles: dict[str, Principle]) -> Example:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: an example must be a mapping")
    name = _text(item, "principle", where)
    if name not in principles:
        raise ConfigError(f"{where}: field 'principle' names {name!r}, which is not a principle here")
    return Example(_text(item, "prompt", where), _text(item, "response", where), principles[name],
                   _text(item, "critique", where), _text(item, "revision", where))


# ---- the prompts every backend sees ----

def few_shot_messages(examples: list[Example]) -> Messages:
    """Demonstrated rounds as earlier turns of the same chat: prompt, answer, critique, revision."""
    messages: Messages = []
    for e in examples:
        messages += [{"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.response},
                     {"role": "user", "content": critique_turn(e.principle)},
                     {"role": "assistant", "content": e.critique},
                     {"role": "user", "content": revision_turn(e.principle)},
                     {"role": "assistant", "content": e.revision}]
    return messages


def critique_turn(principle: Principle) -> str:
    return f"Critique request: {principle.critique_request}"


def revision_turn(principle: Principle) -> str:
    return (f"Revision request: {principle.revision_request}\n"
            "Reply with the rewritten answer only, as the assistant would say it to the user.")


def transcript(conversation: Messages) -> str:
    """A conversation as plain text for a judge: 'User: ...' / 'Assistant: ...' paragraphs."""
    names = {"user": "User", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(f"{names.get(m['role'], m['role'].title())}: {m['content']}" for m in conversation)


def pairwise_messages(conversation: Messages, response_a: str, response_b: str, principle: Principle,
                      labels: tuple[str, str] = ("A", "B")) -> Messages:
    """Ask which of two candidate final answers better follows the principle; the answer is one label."""
    a, b = labels
    text = (f"Here is a conversation between a user and an AI assistant.\n\n{transcript(conversation)}\n\n"
            f"Two candidate replies from the assistant follow.\n\nResponse {a}:\n{response_a}\n\n"
            f"Response {b}:\n{response_b}\n\n{principle.choice_prompt}\n"
            f"Answer with a single character, {a} or {b}.")
    return [{"role": "user", "content": text}]


def verdict_messages(conversation: Messages, response: str, question: str, yes: str, no: str,
                     labels: tuple[str, str] = ("A", "B")) -> Messages:
    """A two-choice question about one answer (label[0] = yes, label[1] = no), for evaluation."""
    a, b = labels
    text = (f"Here is a conversation between a user and an AI assistant.\n\n{transcript(conversation)}\n\n"
            f"The assistant replied:\n{response}\n\n{question}\n{a}: {yes}\n{b}: {no}\n"
            f"Answer with a single character, {a} or {b}.")
    return [{"role": "user", "content": text}]
