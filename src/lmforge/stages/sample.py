"""``lmforge sample``: continuations of a prompt from any checkpoint (lmforge or Hugging Face Llama-family dir)."""

from __future__ import annotations

import sys
from dataclasses import dataclass


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
    seed: int = 0
    device: str = "auto"


def run_sample(cfg: SampleConfig, stream=None) -> list[str]:
    """Sample ``cfg.n`` continuations; streams tokens to ``stream`` (a file) when n == 1."""
    from lmforge.generation import SamplingParams, generate
    from lmforge.modelio import load_model_dir, load_tokenizer
    from lmforge.train.dist import pick_device

    device = pick_device(cfg.device)
    model = load_model_dir(cfg.model, device=device).eval()
    tok = load_tokenizer(cfg.model)
    if cfg.chat:
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": cfg.prompt}],
                                                 add_generation_prompt=True))
    else:
        ids = tok.encode(cfg.prompt, add_bos=True)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                            top_p=cfg.top_p, min_p=cfg.min_p, repetition_penalty=cfg.repetition_penalty,
                            n=cfg.n, seed=cfg.seed)
    on_token = None
    if stream is not None and cfg.n == 1:
        shown = {"ids": [], "text": ""}

        def on_token(row: int, token_id: int) -> None:
            shown["ids"].append(token_id)
            text = tok.decode(shown["ids"], skip_special_tokens=True)
            stream.write(text[len(shown["text"]):])
            stream.flush()
            shown["text"] = text

        stream.write(cfg.prompt)
    completions = generate(model, [ids], params, tokenizer=tok, on_token=on_token)[0]
    if on_token is not None:
        stream.write("\n")
    return [c.text for c in completions]


def main(argv: list[str]) -> int:
    from lmforge.config import parse_cli

    cfg = parse_cli(argv, SampleConfig, prog="lmforge sample", description=__doc__)
    texts = run_sample(cfg, stream=sys.stdout)
    if cfg.n > 1:
        for i, text in enumerate(texts):
            print(f"--- sample {i + 1}\n{cfg.prompt}{text}")
    return 0
