"""``lmforge generate``: sample completions for a file of prompts (JSON Lines in, JSON Lines out).

Each input row is ``{"prompt": "raw text"}`` or ``{"messages": [{"role": ..., "content": ...}, ...]}`` (rendered
with the model's chat template, ending in the assistant's turn); other fields are kept. Each output row is the
input row plus ``completions``: ``[{"text", "tokens", "finish_reason"[, "thinking_tokens", "answer_tokens"]
[, "token_ids", "logprobs"]}]``, n per row. ``thinking_budget=N`` caps the tokens inside a think block.
Rows (.jsonl, or .json / .parquet) are read and checked before the model loads, so a bad row costs nothing: the
error names file:line and the field. Prompts are encoded as the model was trained (data/prompts.py).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from lmforge.config import parse_cli
from lmforge.data.prompts import encode_prompt_row, read_prompt_rows
from lmforge.errors import DataError
from lmforge.generation import generate, sampling_params_from
from lmforge.modelio import DTYPES, load_model_and_tokenizer


@dataclass
class GenerateConfig:
    model: str = ""  # lmforge or Hugging Face Llama-family model directory (or hub id)
    input: str = ""  # .jsonl (or .json / .parquet) of {"prompt": str} or {"messages": [...]} rows
    output: str = ""  # .jsonl written row by row, in input order
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    n: int = 1  # completions per prompt
    stop_strings: list[str] = field(default_factory=list)
    seed: int = 0
    thinking_budget: int | None = None  # most tokens inside <think> ... </think>; then the close is forced (s1)
    min_thinking_tokens: int = 0  # a close before this many thinking tokens becomes "Wait"
    num_waits: int = 0  # the first num_waits closes of the think block become "Wait" (s1)
    batch_size: int = 32  # prompts running at once (each brings n rows); the next takes a finished one's place
    add_bos: bool = True  # raw-text prompts start with bos as pre-training documents do (messages: SFT's rule)
    logprobs: bool = False  # also write token_ids and their raw model log-probabilities
    compile: bool = False  # torch.compile the decode step: 10-40 s of warm-up on a 2-core CPU, for long jobs
    device: str = "auto"
    dtype: str = "float32"  # float32 | bfloat16 | float16

    def validate(self) -> None:
        for key in ("model", "input", "output"):
            if not getattr(self, key):
                raise ValueError(f"{key}=... is required")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        self.sampling_params().validate()

    def sampling_params(self):
        return sampling_params_from(self, return_logprobs=self.logprobs)


def completion_record(c, with_logprobs: bool) -> dict:
    record = {"text": c.text, "tokens": len(c.token_ids), "finish_reason": c.finish_reason}
    if c.thinking_tokens:
        record |= {"thinking_tokens": c.thinking_tokens, "answer_tokens": len(c.token_ids) - c.thinking_tokens}
    if with_logprobs:
        record |= {"token_ids": c.token_ids, "logprobs": [round(x, 5) for x in c.logprobs]}
    return record


def run_generate(cfg: GenerateConfig) -> dict:
    """Complete every row of cfg.input into cfg.output; returns counts for the summary line."""
    numbered = read_prompt_rows(cfg.input)
    model, tok = load_model_and_tokenizer(cfg.model, cfg.device, cfg.dtype)
    rows, prompts = [row for _, row in numbered], []
    for where, row in numbered:
        ids = encode_prompt_row(tok, row, cfg.add_bos)
        if not ids:
            raise DataError(f"{where}: field 'prompt' is empty (add_bos=true starts it from bos)")
        prompts.append(ids)
    params = cfg.sampling_params()
    out_path = Path(cfg.output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tokens = finished = 0
    columns = (TextColumn("generate"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
               TimeRemainingColumn())
    with out_path.open("w", encoding="utf-8") as out, Progress(*columns, transient=True) as progress:
        task = progress.add_task("generate", total=len(rows), rate="")
        chunk = 4 * cfg.batch_size  # prompts per engine call: written (and the bar moved) after each call
        for start in range(0, len(rows), chunk):
            batch = generate(model, prompts[start:start + chunk], params, tokenizer=tok, pad_id=tok.pad_id,
                             max_running=cfg.batch_size * cfg.n)
            for row, completions in zip(rows[start:start + chunk], batch):
                records = [completion_record(c, cfg.logprobs) for c in completions]
                out.write(json.dumps({**row, "completions": records}, ensure_ascii=False) + "\n")
                tokens += sum(r["tokens"] for r in records)
                finished += sum(r["finish_reason"] == "stop" for r in records)
            out.flush()
            elapsed = progress.tasks[0].elapsed or 1e-9
            progress.update(task, advance=len(batch), rate=f"{tokens / elapsed:,.0f} tok/s")
    return {"rows": len(rows), "completions": len(rows) * cfg.n, "tokens": tokens, "stopped": finished,
            "output": str(out_path)}


def main(argv: list[str]) -> int:
    cfg = parse_cli(argv, GenerateConfig, prog="lmforge generate", description=__doc__)
    s = run_generate(cfg)
    print(f"{s['completions']} completions for {s['rows']} prompts, {s['tokens']:,} tokens "
          f"({s['stopped']} stopped, {s['completions'] - s['stopped']} hit max_new_tokens) -> {s['output']}",
          file=sys.stderr)
    return 0
