"""Byte-level BPE tokenizers (trained with the `tokenizers` library) and chat templates.

A trained tokenizer reserves ids 0..3 for ``<|endoftext|>`` (document separator, bos and pretraining eos),
``<|pad|>`` and the ChatML role markers ``<|im_start|>`` / ``<|im_end|>``, the convention SmolLM2 and Qwen use,
so imported models and our own share one chat format. Saved as tokenizer.json + tokenizer_config.json, which
``transformers.AutoTokenizer`` opens; ``Tokenizer.load`` also opens directories Hugging Face wrote.

:func:`train_corpus_tokenizer` trains one on a corpus spec (cleaned as the pre-training data will be) into a
directory, or reuses the one there when it was trained with the same settings on unchanged data: what
`lmforge tokenizer`, pre-training and the scaling sweep all call.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmforge.data.sources import clean_text, read_documents, source_signature
from lmforge.errors import DataError

TRAINING_FILE = "tokenizer_training.json"  # settings + data signature of a tokenizer trained on a corpus

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]

# ChatML, as SmolLM2 and Qwen write it: <|im_start|>{role}\n{content}<|im_end|>\n per message.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# ChatML that knows a think block (Qwen3's convention): ``enable_thinking=False`` opens and closes an empty
# ``<think>`` block in the generation prompt, so the model answers at once; otherwise the model opens it itself.
THINK_TOKENS = ("<think>", "</think>")
CHATML_THINK_TEMPLATE = CHATML_TEMPLATE.replace(
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think></think>\n' }}{% endif %}"
    "{% endif %}")

# End-of-text names used by common tokenizer families, for directories whose config names no eos.
_EOS_GUESSES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
                    think_tokens: bool = False) -> Tokenizer:
    """Byte-level BPE: every byte is in the base alphabet, so any text round-trips exactly.

    No normalizer (NFC and friends belong to data cleaning; a tokenizer that rewrites text cannot round-trip)
    and no prefix space (so ``encode("a") + encode("b")`` is ``encode("ab")`` at a word boundary).
    think_tokens: add ``<think>`` and ``</think>`` as single tokens (ids after the vocabulary), kept when
    decoding with skip_special_tokens (as Qwen3 and DeepSeek-R1 keep theirs), and the thinking chat template.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least "
                         f"{len(alphabet)} bytes + {len(SPECIAL_TOKENS)} special tokens")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=SPECIAL_TOKENS, show_progress=False, initial_alphabet=alphabet)
    tok.train_from_iterator(texts, trainer=trainer)
    if think_tokens:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return Tokenizer(tok, bos="<|endoftext|>", eos="<|endoftext|>", pad="<|pad|>",
                     chat_template=CHATML_THINK_TEMPLATE if think_tokens else CHATML_TEMPLATE)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what the rest of lmforge needs: special-token ids and a chat template.

    ``bos`` may be None (Qwen has none); documents then start with ``<|endoftext|>`` or eos instead, as such
    models were pre-trained. ``pad`` defaults to eos, as Hugging Face models without a pad token are used.
    """

    def __init__(self, tok: HFTokenizer, bos: str | None, eos: str, pad: str | None = None,
                 chat_template: str | None = None, model_max_length: int = 1_000_000):
        self.tok = tok
        self.bos_token, self.eos_token = bos, eos
        self.pad_token = pad or eos
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        for role, name in (("bos", bos), ("eos", eos), ("pad", self.pad_token)):
            if name is not None and tok.token_to_id(name) is None:
                raise ValueError(f"{role} token {name!r} is not in the vocabulary")

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"pad={self.pad_token!r})")

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self.tok.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def eos_id(self) -> int:
        """The id generation stops at (chat models also stop at ``<|im_end|>``; see modelio.eos_ids)."""
        return self.tok.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        return self.tok.token_to_id(self.pad_token)

    @property
    def doc_start_id(self) -> int:
        """What ``add_bos`` prepends: bos, else ``<|endoftext|>`` (Qwen's document separator), else eos."""
        if self.bos_id is not None:
            return self.bos_id
        endoftext = self.tok.token_to_id("<|endoftext|>")
        return endoftext if endoftext is not None else self.eos_id

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings in it (``<|im_start|>``) become their single ids."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.doc_start_id] + ids if add_bos else ids

    def encode_batch(self, texts: list[str], add_bos: bool = False) -> list[list[int]]:
        """``encode`` for many texts at once (the Rust side runs them in parallel)."""
        out = [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]
        return [[self.doc_start_id] + ids for ids in out] if add_bos else out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> Callable[[int], str]:
        """token id -> the text it adds to the tokens fed before it ("" while a character is still split over
        tokens); the pieces concatenate to decode(all ids). tokenizers' DecodeStream: each token decodes a
        window of the last few ids, not the whole list (bench/bench_stream_decode.py, SmolLM2's tokenizer, 4,000
        tokens: 3.4-3.7 ms in all against 1.7-2.1 s re-decoding the list at every token, ~1 us a token against
        0.7-1.0 ms by the end)."""
        stream = decoders.DecodeStream(skip_special_tokens=skip_special_tokens)
        return lambda token_id: stream.step(self.tok, int(token_id)) or ""

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """Render a conversation with the tokenizer's jinja2 chat template (ChatML when it has none).

        The environment matches the one `transformers` renders with (sandboxed, trim_blocks, lstrip_blocks,
        loop controls, ``raise_exception``), so templates shipped with Hugging Face models render the same.
        Extra keyword arguments (``tools=...``, ``enable_thinking=...``) are passed to the template.
        """
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message:
                raise ValueError(f"messages[{i}] must be a dict with a 'role' (and usually 'content'), "
                                 f"got {message!r:.60}")
        template = _compile_template(self.chat_template or CHATML_TEMPLATE)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=self.bos_token or "", eos_token=self.eos_token,
                               pad_token=self.pad_token, **kwargs)

    def save(self, directory: str | Path) -> None:
        """tokenizer.json + tokenizer_config.json + special_tokens_map.json, as `transformers` writes them."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(d / "tokenizer.json"))
        added = {str(i): {"content": t.content, "special": t.special, "lstrip": t.lstrip, "rstrip": t.rstrip,
                          "normalized": t.normalized, "single_word": t.single_word}
                 for i, t in sorted(self.tok.get_added_tokens_decoder().items())}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
            "unk_token": None, "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False, "model_max_length": self.model_max_length,
            "chat_template": self.chat_template, "added_tokens_decoder": added,
        }
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")
        special_map = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                         ("pad_token", self.pad_token)) if v is not None}
        (d / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Open a directory written by ``save`` or by Hugging Face (SmolLM2, Llama, Qwen, ...).

        Special tokens come from tokenizer_config.json, then special_tokens_map.json (strings, or dicts with
        "content"); eos falls back to a known end-of-text token in the vocabulary, pad to eos.
        """
        d = Path(directory)
        if not (d / "tokenizer.json").exists():
            raise FileNotFoundError(f"{d}: no tokenizer.json (lmforge needs a 'fast' tokenizer file)")
        try:
            tok = HFTokenizer.from_file(str(d / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
            raise ValueError(f"{d / 'tokenizer.json'}: not a readable tokenizer file ({e}); it is damaged or "
                             "truncated") from None
        config = _read_json(d / "tokenizer_config.json")
        special = _read_json(d / "special_tokens_map.json")

        def pick(key: str) -> str | None:
            return _token_name(config.get(key)) or _token_name(special.get(key))

        eos = pick("eos_token") or next((t for t in _EOS_GUESSES if tok.token_to_id(t) is not None), None)
        if eos is None:
            raise ValueError(f"{d / 'tokenizer_config.json'}: no 'eos_token', and none of "
                             f"{', '.join(_EOS_GUESSES)} is in the vocabulary")
        template = config.get("chat_template")
        if template is None and (d / "chat_template.jinja").exists():  # transformers >= 4.50 writes this
            template = (d / "chat_template.jinja").read_text(encoding="utf-8")
        if isinstance(template, list):  # several named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        max_len = config.get("model_max_length") or 1_000_000
        return cls(tok, bos=pick("bos_token"), eos=eos, pad=pick("pad_token"), chat_template=template,
                   model_max_length=int(min(max_len, 1e12)))  # HF writes 1e30 for "no limit"


def training_texts(data: str, text_field: str = "text", max_docs: int = 0, max_chars: int = 0) -> Iterator[str]:
    """Cleaned, non-empty documents of a corpus spec, stopping at max_docs documents or max_chars characters."""
    docs = chars = 0
    for raw in read_documents(data, text_field=text_field):
        doc = clean_text(raw)
        if not doc:
            continue
        if max_chars and chars + len(doc) > max_chars:
            doc = doc[:max_chars - chars]
            if not doc:
                return
        yield doc
        docs, chars = docs + 1, chars + len(doc)
        if (max_docs and docs >= max_docs) or (max_chars and chars >= max_chars):
            return


def train_corpus_tokenizer(data: str, out_dir: str | Path, vocab_size: int = 2048, *, text_field: str = "text",
                           min_frequency: int = 2, max_docs: int = 0, max_chars: int = 0,
                           think_tokens: bool = False) -> Tokenizer:
    """Train byte-level BPE on the corpus ``data`` (file, dir, glob, builtin:NAME, hf:...) and save it in out_dir;
    returns the Tokenizer. Reused without training when out_dir holds one trained with the same settings on
    unchanged data (recorded in tokenizer_training.json); otherwise (re)trained. think_tokens: <think> and
    </think> as single tokens and the thinking chat template (train_tokenizer)."""
    out = Path(out_dir)
    settings = {"data": data, "text_field": text_field, "vocab_size": vocab_size, "min_frequency": min_frequency,
                "max_docs": max_docs, "max_chars": max_chars} | ({"think_tokens": True} if think_tokens else {})
    signature = {"settings": settings, "data_signature": source_signature(data)}
    record = out / TRAINING_FILE
    if (out / "tokenizer.json").exists() and record.exists():
        try:
            done = json.loads(record.read_text())
        except json.JSONDecodeError:
            done = {}
        if {k: done.get(k) for k in signature} == signature:
            return Tokenizer.load(out)
    stats = {"docs": 0, "chars": 0}

    def counted() -> Iterator[str]:
        for doc in training_texts(data, text_field, max_docs, max_chars):
            stats["docs"] += 1
            stats["chars"] += len(doc)
            yield doc

    tok = train_tokenizer(counted(), vocab_size, min_frequency, think_tokens=think_tokens)
    if stats["docs"] == 0:
        raise DataError(f"{data}: no non-empty documents to train a tokenizer on")
    tok.save(out)
    record.write_text(json.dumps({**signature, "trained_on": stats, "vocab_size": tok.vocab_size}, indent=2) + "\n")
    return tok


@functools.lru_cache(maxsize=16)
def _compile_template(source: str):
    """A chat template compiled once (compiling costs milliseconds; SFT renders it several times per row)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_name(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _raise(message: str):
    raise ValueError(f"chat template: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)
