"""Prompt files: reading and checking their rows, and encoding a prompt the way the model was trained.

    read_prompt_rows(path)   ("file:line", row) of a file of {"prompt": str} or {"messages": [...]} rows
                             (generate, think, and the pipeline's problems)
    encode_prompt_row        a row's token ids: messages through the chat template (assistant turn opened),
                             a "prompt" as raw text after the document-start token
    read_rl_prompts(spec)    RL rows {"prompt": str | messages, "answer": str | None, "where"} (GRPO, PPO,
                             online DPO)
    render_prompt            an RL prompt's token ids: the chat template (a string is one user turn), or raw text

All of them encode through data.chat.encode_prompt, the one prompt encoder of the package, and read through
data.rows.read_rows, so a bad row is the same error as in every other dataset: file, line and field.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.data.chat import check_messages, encode_prompt
from lmforge.data.rows import read_rows
from lmforge.errors import DataError


def read_prompt_rows(path: str | Path) -> list[tuple[str, dict]]:
    """("file:line", row) for every row of a prompts file, checked: a 'prompt' string or a 'messages' list.

    Rows are read by data.rows.read_rows (.jsonl, .json, .parquet, gzipped too), so a bad line is the same
    error as in every other dataset: file, line and field."""
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    for row, where in read_rows(str(path)):
        if "messages" in row:
            check_messages(row["messages"], where, need_assistant=False)
        elif "prompt" in row:
            if not isinstance(row["prompt"], str):
                raise DataError(f"{where}: field 'prompt' must be a string, got {type(row['prompt']).__name__}")
        else:
            raise DataError(f"{where}: a row needs a 'prompt' string or a 'messages' list "
                            f"(fields: {', '.join(row) or 'none'})")
        rows.append((where, row))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def encode_prompt_row(tokenizer, row: dict, add_bos: bool = True) -> list[int]:
    """Token ids of a prompt row by data.chat.encode_prompt: messages with the chat template (assistant turn
    opened, SFT's bos rule), a 'prompt' as raw text after the document-start token (``add_bos``) as pre-trained."""
    if "messages" in row:
        return encode_prompt(tokenizer, row["messages"])
    return encode_prompt(tokenizer, row["prompt"], chat=False, add_bos=add_bos)


def read_rl_prompts(spec: str, prompt_field: str = "prompt", answer_field: str = "answer") -> list[dict]:
    """RL prompt rows {"prompt": str | messages, "answer": str | None} from a .jsonl(.gz) (or .json / .parquet)
    file or ``builtin:tinyworld/NAME``. A bad row is one DataError naming the file, the line and the field."""
    if spec.startswith("builtin:") and not spec.startswith("builtin:tinyworld/"):
        raise DataError(f"{spec}: RL prompts come from a .jsonl file or builtin:tinyworld/rl")
    if not spec.startswith("builtin:") and not Path(spec).is_file():
        raise DataError(f"{spec}: no such file")
    rows = []
    for row, where in read_rows(spec):
        if prompt_field not in row:
            raise DataError(f"{where}: field {prompt_field!r} missing (fields: {', '.join(row)})")
        prompt = row[prompt_field]
        ok = isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt))
        if not ok:
            raise DataError(f"{where}: field {prompt_field!r} must be a string or a list of "
                            f"{{'role', 'content'}} messages, got {prompt!r:.60}")
        answer = row.get(answer_field)
        if answer is not None and not isinstance(answer, (str, int, float)):
            raise DataError(f"{where}: field {answer_field!r} must be a string or a number, got {answer!r:.40}")
        rows.append({"prompt": prompt, "answer": None if answer is None else str(answer), "where": where})
    if not rows:
        raise DataError(f"{spec}: no prompts")
    return rows


def render_prompt(tokenizer, prompt, system_prompt: str = "", chat_template: bool = True) -> list[int]:
    """Token ids the policy completes: the chat template with the assistant turn opened (a string prompt
    becomes one user message), or with ``chat_template=False`` the raw text after a document-start token;
    by data.chat.encode_prompt, so the policy sees the prefix SFT (or pre-training) gave it."""
    return encode_prompt(tokenizer, prompt, chat=chat_template, system=system_prompt)
