"""``lmforge sample``: continuations of a prompt from any checkpoint (lmforge or Hugging Face Llama-family dir).

With n=1 the continuation streams to the terminal token by token; with n>1 the samples share one prefill and
print one after another.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from lmforge.config import parse_cli
from lmforge.data.prompts import encode_prompt_row
from lmforge.generation import generate, sampling_params_from
from lmforge.modelio import DTYPES, load_model_and_tokenizer


@dataclass
class SampleConfig:
    model: str = "runs/tiny/pretrain/model"
    prompt: str = "ROMEO:"
    chat: bool = False  # wrap the prompt as a user turn with the model's chat template
    max_new_tokens: int = 120
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    n: int = 1
    stop_strings: list[str] = field(default_factory=list)
    seed: int = 0
    thinking_budget: int | None = None  # most tokens inside <think> ... </think>; then the close is forced (s1)
    min_thinking_tokens: int = 0  # a close before this many thinking tokens becomes "Wait"
    num_waits: int = 0  # the first num_waits closes of the think block become "Wait" (s1)
    compile: bool = False  # torch.compile the decode step: 10-40 s of warm-up on a 2-core CPU, for long samples
    device: str = "auto"
    dtype: str = "float32"  # float32 | bfloat16 | float16

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


def run_sample(cfg: SampleConfig, stream=None) -> list[str]:
    """Sample ``cfg.n`` continuations; streams tokens to ``stream`` (a file) when n == 1."""
    model, tok = load_model_and_tokenizer(cfg.model, cfg.device, cfg.dtype)
    row = {"messages": [{"role": "user", "content": cfg.prompt}]} if cfg.chat else {"prompt": cfg.prompt}
    ids = encode_prompt_row(tok, row, add_bos=True)
    params = sampling_params_from(cfg)
    on_token = None
    if stream is not None and cfg.n == 1:
        shown = {"ids": [], "text": ""}

        def on_token(row: int, token_id: int) -> None:
            # Decode everything so far and print the new characters: a multi-byte character split over
            # tokens only shows once complete. Stop strings are not held back (the final text cuts them).
            shown["ids"].append(token_id)
            text = tok.decode(shown["ids"], skip_special_tokens=True)
            if not text.endswith("\ufffd"):
                stream.write(text[len(shown["text"]):])
                stream.flush()
                shown["text"] = text

        stream.write(cfg.prompt)
    completions = generate(model, [ids], params, tokenizer=tok, pad_id=tok.pad_id, on_token=on_token)[0]
    if on_token is not None:
        stream.write("\n")
    return [c.text for c in completions]


def main(argv: list[str]) -> int:
    cfg = parse_cli(argv, SampleConfig, prog="lmforge sample", description=__doc__)
    texts = run_sample(cfg, stream=sys.stdout)
    if cfg.n > 1:
        for i, text in enumerate(texts):
            print(f"--- sample {i + 1}\n{cfg.prompt}{text}")
    return 0
