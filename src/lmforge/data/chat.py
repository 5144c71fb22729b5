"""Chat data: reading conversations in TRL's formats and tokenizing them with a loss mask on assistant tokens.

Rows (jsonl / json / parquet / ``hf:NAME[:CONFIG][@SPLIT]`` / ``builtin:NAME``), as TRL names their fields:

    {"messages": [{"role": "system", "content": ...}, {"role": "user", ...}, {"role": "assistant", ...}, ...]}
    {"prompt": "2+2?", "completion": "4"}                                  -> one user turn + one assistant turn
    {"prompt": [{"role": "user", ...}], "completion": [{"role": "assistant", ...}]}   (conversational)

A conversation is rendered ONCE with the tokenizer's chat template and tokenized once; which tokens are the
assistant's is found from character offsets in that rendered text (the template is rendered again up to each
assistant turn to locate where the turn starts and ends), so the mask is right for any template that renders
messages in order (ChatML / SmolLM2 / Qwen, Llama-3, Mistral, ...). The mask covers each assistant turn's
content and its end-of-turn marker (``<|im_end|>``, ``<|eot_id|>``) so the model learns to stop, and nothing of
the template's framing (role headers, the newline after the marker).

:func:`encode_prompt` is the one prompt encoder of the package (generate, sample, chat, think, eval, RL rollouts,
constitutional AI): chat prompts are tokenized exactly as a training conversation's prefix (same render, same bos
rule), raw-text prompts exactly as a pre-training document's start.
"""

from __future__ import annotations

from collections.abc import Iterator

from lmforge.data.rows import read_rows
from lmforge.errors import DataError

ROLES = ("system", "user", "assistant", "tool")


# ------------------------------------------------------------------------------------------------ checking rows

def check_messages(messages, where: str, field: str = "messages", need_assistant: bool = True) -> list[dict]:
    """A validated list of {"role", "content"} dicts; any problem is a DataError naming ``where`` and the field.

    Roles must be system / user / assistant / tool, contents strings, assistant contents non-empty; with
    ``need_assistant`` there must be at least one assistant turn (else there is nothing to learn).
    """
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field {field!r} must be a non-empty list of messages, got {messages!r:.60}")
    out = []
    for i, m in enumerate(messages):
        at = f"{where}: field {field!r}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{at}: expected a message object with 'role' and 'content', got {m!r:.60}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{at}: bad role {role!r} (roles: {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise DataError(f"{at}: 'content' must be a string, got {content!r:.60}")
        if role == "assistant" and not content.strip():
            raise DataError(f"{at}: empty assistant response")
        out.append({**m, "role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: field {field!r}: no assistant turn (nothing to train on)")
    return out


def prompt_messages(prompt, where: str, field: str = "prompt") -> list[dict]:
    """A prompt as messages: a string becomes one user turn; a message list is checked (no assistant needed)."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: field {field!r} is empty")
        return [{"role": "user", "content": prompt}]
    return check_messages(prompt, where, field, need_assistant=False)


def completion_messages(completion, where: str, field: str = "completion") -> list[dict]:
    """A completion as messages: a string becomes one assistant turn; a list must hold assistant turns only."""
    if isinstance(completion, str):
        if not completion.strip():
            raise DataError(f"{where}: field {field!r}: empty assistant response")
        return [{"role": "assistant", "content": completion}]
    messages = check_messages(completion, where, field, need_assistant=False)
    if any(m["role"] != "assistant" for m in messages):
        raise DataError(f"{where}: field {field!r}: a completion may only hold assistant messages")
    return messages


def conversation_of(row: dict, where: str, messages_field: str = "messages", prompt_field: str = "prompt",
                    completion_field: str = "completion") -> list[dict]:
    """One row in either SFT format -> a checked conversation (list of messages)."""
    if messages_field in row:
        return check_messages(row[messages_field], where, messages_field)
    if prompt_field in row or completion_field in row:
        for name in (prompt_field, completion_field):
            if row.get(name) is None:
                raise DataError(f"{where}: field {name!r} missing (fields: {', '.join(map(str, row))})")
        return (prompt_messages(row[prompt_field], where, prompt_field)
                + completion_messages(row[completion_field], where, completion_field))
    raise DataError(f"{where}: field {messages_field!r} missing: an SFT row needs {messages_field!r}, or "
                    f"{prompt_field!r} and {completion_field!r} (fields: {', '.join(map(str, row)) or 'none'})")


def read_sft_rows(spec: str, messages_field: str = "messages", prompt_field: str = "prompt",
                  completion_field: str = "completion", with_where: bool = False) -> Iterator:
    """Conversations (checked message lists) from an SFT dataset in either TRL format.

    with_where: yield (messages, "file:line") pairs instead, to name the row in later errors.
    """
    for row, where in read_rows(spec):
        messages = conversation_of(row, where, messages_field, prompt_field, completion_field)
        yield (messages, where) if with_where else messages


# ------------------------------------------------------------------------------------------------- tokenizing

def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict], add_generation_prompt: bool = False
                    ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and, per assistant turn, the [start, end) characters to learn: from where
    the template's assistant header ends to the end of the turn (end-of-turn marker included, trailing
    whitespace after it excluded).

    Start = length of the render of the messages before the turn with the generation prompt; end = length of
    the render through the turn. Both must be prefixes of the full render (templates that rewrite earlier
    turns, e.g. dropping past reasoning, are an error here, not a silently wrong mask).
    """
    text = render(tokenizer, messages, add_generation_prompt)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        through = render(tokenizer, messages[:i + 1])
        if not text.startswith(through):
            raise ValueError("the chat template does not render conversations in order (the render of the first "
                             f"{i + 1} messages is not a prefix of the whole), so assistant tokens cannot be found")
        header = render(tokenizer, messages[:i], add_generation_prompt=True) if i else None
        if header is not None and through.startswith(header) and len(header) < len(through):
            start = len(header)
        else:  # no usable generation prompt (or the very first message): find the content after the last turn
            before = len(render(tokenizer, messages[:i])) if i else 0
            start = text.find(m["content"].strip(), before, len(through))
            if start < 0:
                raise ValueError(f"messages[{i}]: the assistant content does not appear in the rendered template")
        end = len(through.rstrip())
        if end <= start:
            raise ValueError(f"messages[{i}]: the chat template renders no assistant text for this turn")
        spans.append((start, end))
    return text, spans


def encode_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` (no special tokens added) and each token's [start, end) character offsets.

    Takes lmforge's Tokenizer (``.tok`` is a `tokenizers.Tokenizer`) or a transformers fast tokenizer.
    """
    if hasattr(tokenizer, "tok"):
        enc = tokenizer.tok.encode(text, add_special_tokens=False)
        return list(enc.ids), list(enc.offsets)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _bos_id(tokenizer) -> int | None:
    bos = getattr(tokenizer, "bos_id", None)
    return bos if bos is not None else getattr(tokenizer, "bos_token_id", None)


def _mask_from_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose characters overlap an assistant span (a token straddling a boundary counts)."""
    mask = [0] * len(offsets)
    j = 0
    for t, (a, b) in enumerate(offsets):
        while j < len(spans) and spans[j][1] <= a:
            j += 1
        if j < len(spans) and a < spans[j][1] and b > spans[j][0]:
            mask[t] = 1
        elif j < len(spans) and a == b and spans[j][0] <= a < spans[j][1]:
            mask[t] = 1  # zero-width offsets (rare special tokens) inside a span
    return mask


def tokenize_conversation(tokenizer, messages: list[dict], add_generation_prompt: bool = False
                          ) -> tuple[list[int], list[int]]:
    """(input_ids, assistant_mask) of a conversation rendered once with the chat template and tokenized once.

    assistant_mask[t] = 1 where token t is assistant content or its end-of-turn marker: the tokens to learn.
    The tokenizer's bos is prepended unless the template already starts with it (never a double bos).
    """
    text, spans = assistant_spans(tokenizer, messages, add_generation_prompt)
    ids, offsets = encode_with_offsets(tokenizer, text)
    mask = _mask_from_spans(offsets, spans)
    bos = _missing_bos(tokenizer, ids)
    if bos is not None:
        ids, mask = [bos] + ids, [0] + mask
    return ids, mask


def _missing_bos(tokenizer, ids: list[int]) -> int | None:
    """The bos id when ``ids`` should get it in front: the tokenizer has one and the text does not start with it
    (SmolLM2's bos is ``<|im_start|>``, which its template already starts with: never a double bos)."""
    bos = _bos_id(tokenizer)
    return bos if bos is not None and (not ids or ids[0] != bos) else None


EMPTY_THINK = "<think></think>\n"  # an empty think block, answer at once (enable_thinking=False); = thinking budget 0


def generation_prompt(tokenizer, messages: list[dict], thinking: bool | None = None) -> str:
    """The rendered conversation with the assistant turn opened. thinking=None leaves the think block to the model;
    False closes an empty one (the template's ``enable_thinking=False`` when it knows it, else EMPTY_THINK
    appended); True opens it (``<think>`` + newline), so the model starts thinking at once."""
    text = render(tokenizer, messages, add_generation_prompt=True)
    if thinking is False:
        closed = tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)
        return closed if closed != text else text + EMPTY_THINK
    if thinking:
        return text + "<think>\n"
    return text


def encode_chat_prompt(tokenizer, messages: list[dict], thinking: bool | None = None) -> list[int]:
    """Token ids that ask a model for the next assistant turn: the template with the generation prompt, tokenized
    as :func:`tokenize_conversation` tokenizes a training conversation (one encode of the render, the same bos
    rule), so inference sees the very prefix SFT trained on. Unlike training it needs no assistant spans, so
    templates that rewrite earlier turns (dropping past reasoning) still render a prompt. ``thinking``: see
    :func:`generation_prompt`."""
    ids, _ = encode_with_offsets(tokenizer, generation_prompt(tokenizer, messages, thinking))
    bos = _missing_bos(tokenizer, ids)
    return [bos] + ids if bos is not None else ids


def encode_prompt(tokenizer, prompt, chat: bool = True, system: str = "", add_bos: bool = True,
                  thinking: bool | None = None) -> list[int]:
    """THE token ids a model is asked to continue; every stage that prompts a model (generate, sample, chat, think,
    eval, the RL rollouts, constitutional AI's local models) encodes through here, so that a prompt is
    token-identical to what the model trained on.

    prompt: a string, a list of {"role", "content"} messages, or a list of token ids (returned as they are).
    chat: render messages (a string = one user turn; ``system``, if given, first) with the chat template, the
    assistant turn opened, with SFT's bos rule (:func:`encode_chat_prompt`). Without chat the text (for messages,
    the last user turn) is a raw document start as pre-training saw it: ``tokenizer.encode(text, add_bos=True)``,
    the document-start token (bos, else ``<|endoftext|>``, else eos) first, as data/shards.py stores documents;
    ``add_bos=False`` leaves that token out. thinking (chat only): None leaves the think block to the model, False
    asks for an answer with an empty think block, True opens the block (:func:`generation_prompt`).
    """
    if isinstance(prompt, list) and (not prompt or isinstance(prompt[0], int)):
        return list(prompt)
    if not chat:
        if not isinstance(prompt, str):
            users = [m["content"] for m in prompt if m.get("role") == "user"]
            prompt = users[-1] if users else prompt[-1]["content"]
        return tokenizer.encode(prompt, add_bos=add_bos)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system:
        messages = [{"role": "system", "content": system}] + messages
    return encode_chat_prompt(tokenizer, messages, thinking)


def tokenize_prompt_completion(tokenizer, prompt, completion) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids) for preference / RL data, split at a token boundary.

    prompt: a string (one user turn) or a message list; completion: a string (one assistant turn) or a list
    of assistant messages. The pair is rendered and tokenized as one conversation; prompt_ids end with the
    assistant header (the generation prompt), completion_ids run through the end-of-turn marker.
    """
    prompt_msgs = prompt_messages(prompt, "prompt") if isinstance(prompt, str) else \
        check_messages(prompt, "prompt", "prompt", need_assistant=False)
    completion_msgs = completion_messages(completion, "completion")
    messages = prompt_msgs + completion_msgs
    text, spans = assistant_spans(tokenizer, messages)
    ids, offsets = encode_with_offsets(tokenizer, text)
    first = spans[-len(completion_msgs)][0]
    last = spans[-1][1]
    split = next((t for t, (_, b) in enumerate(offsets) if b > first), len(ids))
    stop = next((t for t, (a, _) in enumerate(offsets) if a >= last), len(ids))
    prompt_ids, completion_ids = ids[:split], ids[split:stop]
    bos = _missing_bos(tokenizer, prompt_ids)
    return ([bos] + prompt_ids if bos is not None else prompt_ids), completion_ids
