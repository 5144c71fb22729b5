"""Byte-level BPE tokenizers (trained with the `tokenizers` library) and chat templates.

A trained tokenizer reserves ids 0..3 for ``<|endoftext|>`` (document separator, bos and pretraining eos),
``<|pad|>`` and the ChatML role markers ``<|im_start|>`` / ``<|im_end|>``, the convention SmolLM2 and Qwen use,
so imported models and our own share one chat format. Saved as tokenizer.json + tokenizer_config.json, which
``transformers.AutoTokenizer`` opens; ``Tokenizer.load`` also opens directories Hugging Face wrote.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Byte-level BPE: every byte is in the base alphabet, so any text round-trips exactly."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok, bos="<|endoftext|>", eos="<|endoftext|>", pad="<|pad|>", chat_template=CHATML_TEMPLATE)


class Tokenizer:
    def __init__(self, tok: HFTokenizer, bos: str | None, eos: str, pad: str | None,
                 chat_template: str | None = None, model_max_length: int = 1_000_000):
        self.tok = tok
        self.bos_token, self.eos_token = bos, eos
        self.pad_token = pad or eos
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        for name in (bos, eos, self.pad_token):
            if name is not None and tok.token_to_id(name) is None:
                raise ValueError(f"special token {name!r} is not in the vocabulary")

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self.tok.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def eos_id(self) -> int:
        return self.tok.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        return self.tok.token_to_id(self.pad_token)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_bos and self.bos_id is not None else ids

    def encode_batch(self, texts: list[str], add_bos: bool = False) -> list[list[int]]:
        out = [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]
        return [[self.bos_id] + ids for ids in out] if add_bos and self.bos_id is not None else out

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Render a conversation with the tokenizer's jinja2 chat template (ChatML by default)."""
        try:
            import jinja2
        except ImportError as e:
            raise ImportError("chat templates need jinja2: pip install jinja2") from e
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        template = env.from_string(self.chat_template or CHATML_TEMPLATE)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=self.bos_token or "", eos_token=self.eos_token)

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(d / "tokenizer.json"))
        added = {str(self.tok.token_to_id(t)): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                                "normalized": False, "single_word": False}
                 for t in self._special_tokens()}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
            "unk_token": None, "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False, "model_max_length": self.model_max_length,
            "chat_template": self.chat_template, "added_tokens_decoder": added,
        }
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        special_map = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        (d / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")

    def _special_tokens(self) -> list[str]:
        return [t for t in SPECIAL_TOKENS + [self.bos_token, self.eos_token, self.pad_token]
                if t is not None and self.tok.token_to_id(t) is not None]

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Open tokenizer.json + tokenizer_config.json written by lmforge or by Hugging Face."""
        d = Path(directory)
        if not (d / "tokenizer.json").exists():
            raise FileNotFoundError(f"{d}: no tokenizer.json (lmforge needs a 'fast' tokenizer file)")
        tok = HFTokenizer.from_file(str(d / "tokenizer.json"))
        config = {}
        if (d / "tokenizer_config.json").exists():
            config = json.loads((d / "tokenizer_config.json").read_text())
        template = config.get("chat_template")
        if template is None and (d / "chat_template.jinja").exists():
            template = (d / "chat_template.jinja").read_text()
        if isinstance(template, list):  # several named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        eos = _token_name(config.get("eos_token")) or "<|endoftext|>"
        bos = _token_name(config.get("bos_token"))
        pad = _token_name(config.get("pad_token"))
        return cls(tok, bos=bos, eos=eos, pad=pad, chat_template=template,
                   model_max_length=int(min(config.get("model_max_length", 1_000_000), 1e12)))


def _token_name(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _raise(message: str):
    raise ValueError(f"chat template: {message}")
