"""Streaming a reply's text: re-decoding every token so far at each new token vs Tokenizer.stream_decoder.

    python bench/bench_stream_decode.py [--model runs/smollm2] [--tokens 500,2000,4000]

`lmforge serve` and `lmforge chat` turn each generated token into the characters it adds. They used to decode
the whole list of tokens so far at every token (quadratic in the reply's length, on the server's handler threads
while the engine steps); they now use tokenizers' DecodeStream, which decodes a window of the last few tokens.
Both sides here in one process on the same ids (the README's text, encoded with ``--model``'s tokenizer, or the
tiny recipe's tokenizer trained on it without one): total time to stream N tokens, the mean cost of each of the last 100,
and whether both produce the same text.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lmforge.modelio import load_tokenizer
from lmforge.tokenizer import train_tokenizer

README = Path(__file__).resolve().parent.parent / "README.md"


TAIL = 100  # "per token at the end": the mean over the last TAIL tokens


def redecode_all(tok, ids: list[int]) -> tuple[str, float, float]:
    shown, start = "", time.perf_counter()
    for n in range(1, len(ids) + 1):
        if n == len(ids) - TAIL + 1:
            tail = time.perf_counter()
        now = tok.decode(ids[:n], skip_special_tokens=True)
        if not now.endswith("\ufffd") and len(now) > len(shown):
            shown = now
    end = time.perf_counter()
    return shown, end - start, (end - tail) / TAIL


def stream_decoder(tok, ids: list[int]) -> tuple[str, float, float]:
    decode, pieces, start = tok.stream_decoder(), [], time.perf_counter()
    for n, i in enumerate(ids, 1):
        if n == len(ids) - TAIL + 1:
            tail = time.perf_counter()
        pieces.append(decode(i))
    end = time.perf_counter()
    return "".join(pieces), end - start, (end - tail) / TAIL


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="a model directory whose tokenizer to use")
    ap.add_argument("--tokens", default="500,2000,4000", help="each at least 100")
    args = ap.parse_args()
    text = README.read_text()
    tok = load_tokenizer(args.model) if args.model else train_tokenizer(text.splitlines(), vocab_size=2048)
    ids = tok.encode(text)
    print("| tokens streamed | re-decode all: total | per token at the end | stream_decoder: total | per token at the end "
          "| speed-up "
          "| same text |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for n in map(int, args.tokens.split(",")):
        a_text, a_total, a_last = redecode_all(tok, ids[:n])
        b_text, b_total, b_last = stream_decoder(tok, ids[:n])
        print(f"| {n:,} | {1000 * a_total:,.1f} ms | {1e6 * a_last:,.0f} us | {1000 * b_total:,.1f} ms | "
              f"{1e6 * b_last:,.1f} us | {a_total / b_total:,.0f}x | {a_text == b_text} |")


if __name__ == "__main__":
    main()
