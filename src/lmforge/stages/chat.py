"""``lmforge chat MODEL``: a multi-turn conversation with any checkpoint, rendered with its chat template.

Three ways to talk:
  lmforge chat runs/smollm2                              a REPL; answers stream token by token
  lmforge chat runs/smollm2 message="Hi!"                one turn: print the answer and exit
  printf 'Hi!\\nAnd then?\\n' | lmforge chat runs/smollm2  piped stdin: one user turn per line, history kept
In the REPL and in piped input, ``/reset`` forgets the conversation (the system prompt stays) and ``/exit``
ends it. ``save=chat.jsonl`` appends each conversation as a ``{"messages": [...]}`` row (the SFT format).
When the history no longer fits the context, the oldest turns are dropped (the system prompt is kept); an answer's
think block is shown but not kept in the history. ``thinking_budget=N`` caps each answer's thinking.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from lmforge.answers import strip_thinking
from lmforge.config import parse_cli
from lmforge.data.chat import encode_prompt, render
from lmforge.errors import ConfigError
from lmforge.generation import generate, sampling_params_from
from lmforge.modelio import DTYPES, load_model_and_tokenizer
from lmforge.tokenizer import CHATML_TEMPLATE

TEMPLATES = ("", "chatml")
COMMANDS = "/reset forgets the conversation, /exit quits"


@dataclass
class ChatConfig:
    model: str = ""  # lmforge or Hugging Face Llama-family model directory (or hub id)
    system: str = ""  # system prompt; empty: none (some templates then add their own default)
    message: str = ""  # one user turn: print the answer and exit
    template: str = ""  # "" = the checkpoint's chat template; chatml = use ChatML instead
    max_new_tokens: int = 512
    temperature: float = 0.7  # 0 = greedy
    top_k: int = 0
    top_p: float = 0.9
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0  # each turn samples with seed + turn number, so a conversation replays exactly
    thinking_budget: int | None = None  # most tokens inside <think> ... </think>; then the close is forced (s1)
    min_thinking_tokens: int = 0  # a close before this many thinking tokens becomes "Wait"
    num_waits: int = 0  # the first num_waits closes of the think block become "Wait" (s1)
    max_context: int = 0  # tokens of prompt + answer; 0 = the model's max_position_embeddings
    save: str = ""  # append the conversation to this .jsonl as {"messages": [...]}
    device: str = "auto"
    dtype: str = "float32"  # float32 | bfloat16 | float16

    def validate(self) -> None:
        if not self.model:
            raise ValueError("model=... is required (lmforge chat MODEL)")
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be '' (the checkpoint's) or 'chatml', got {self.template!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        self.sampling_params().validate()

    def sampling_params(self):
        return sampling_params_from(self)


class ChatSession:
    """A conversation: the messages so far, and ``reply(user_text)`` that renders them, generates and remembers.

    ``last_prompt`` is the rendered chat template of the latest turn; the model sees its tokens as SFT trained it
    to (data.chat.encode_prompt: bos first unless the template starts with it).
    """

    def __init__(self, model, tokenizer, params, system: str = "", max_context: int = 0):
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.system = system
        self.max_context = max_context or model.config.max_position_embeddings
        if params.max_new_tokens > self.max_context // 2:  # e.g. the default 512 on a 256-position tiny model:
            self.params = replace(params, max_new_tokens=self.max_context // 2)  # leave room for the conversation
        self.stop_strings = []
        if "<|im_end|>" in (tokenizer.chat_template or CHATML_TEMPLATE) and tokenizer.token_to_id("<|im_end|>") is None:
            self.stop_strings = ["<|im_end|>"]  # ChatML over a vocabulary without its marker token
        self.turn = 0
        self.last_prompt = ""
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self) -> list[int]:
        """The rendered conversation, assistant turn opened; oldest turns dropped until the answer fits."""
        first = 1 if self.messages[0]["role"] == "system" else 0
        alone = len(self._render(self.messages[:first] + self.messages[-1:]))
        if alone + self.params.max_new_tokens > self.max_context:
            self.messages.pop()  # even with no history it cannot fit: keep the conversation as it was
            raise ValueError(f"the message is {alone} tokens with the template; with max_new_tokens="
                             f"{self.params.max_new_tokens} that exceeds the context of {self.max_context}")
        while True:
            ids = self._render(self.messages)
            if len(ids) + self.params.max_new_tokens <= self.max_context:
                return ids
            del self.messages[first:first + 2]  # the oldest user turn and its answer

    def _render(self, messages: list[dict]) -> list[int]:
        self.last_prompt = render(self.tokenizer, messages, add_generation_prompt=True)
        return encode_prompt(self.tokenizer, messages)

    def reply(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Add a user turn, generate the assistant's answer (``on_text`` gets it piece by piece), keep both."""
        self.messages.append({"role": "user", "content": text})
        ids = self.prompt_ids()
        params = replace(self.params, stop_strings=self.stop_strings,
                         seed=None if self.params.seed is None else self.params.seed + self.turn)
        decode = self.tokenizer.stream_decoder()
        shown = [""]

        def on_token(row: int, token_id: int) -> None:
            # the new characters (a character split over tokens waits until whole)
            piece = decode(token_id)
            if on_text is not None and piece:
                on_text(piece)
                shown[0] += piece

        completion = generate(self.model, [ids], params, tokenizer=self.tokenizer, pad_id=self.tokenizer.pad_id,
                              on_token=on_token)[0][0]
        if on_text is not None and completion.text.startswith(shown[0]) and len(completion.text) > len(shown[0]):
            on_text(completion.text[len(shown[0]):])  # a last, incomplete character: shown as the final text has it
        answer = completion.text.strip()
        # the history keeps the answer, not the thinking before it, as reasoning models' templates drop it
        self.messages.append({"role": "assistant", "content": strip_thinking(answer).strip() or answer})
        self.turn += 1
        return answer


def check_template(tokenizer, template: str, model: str) -> None:
    """A checkpoint without a chat template is an error, unless the user asks for ChatML by name."""
    if template == "chatml":
        tokenizer.chat_template = CHATML_TEMPLATE
    elif not tokenizer.chat_template:
        raise ConfigError(f"{model}: the tokenizer has no chat template (no 'chat_template' in "
                          "tokenizer_config.json, no chat_template.jinja); pass template=chatml to use ChatML")


def open_session(cfg: ChatConfig) -> ChatSession:
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.device, cfg.dtype)
    check_template(tokenizer, cfg.template, cfg.model)
    return ChatSession(model, tokenizer, cfg.sampling_params(), cfg.system, cfg.max_context)


def run_chat(cfg: ChatConfig, stdin=None, stdout=None) -> list[list[dict]]:
    """Talk (one message, piped turns, or a REPL when stdin is a terminal); returns the conversations
    (a /reset starts a new one), each a list of messages with the system prompt first when there is one."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    session = open_session(cfg)
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    conversations: list[list[dict]] = [list(system)]  # every turn, even those dropped from the context

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    def turn(text: str) -> None:
        session.reply(text, on_text=write)
        write("\n")
        conversations[-1].extend(session.messages[-2:])

    interactive = not cfg.message and stdin.isatty()
    if cfg.message:
        turn(cfg.message)
    else:
        if interactive:
            _enable_line_editing()
            write(f"chatting with {cfg.model} ({COMMANDS})\n")
        while True:
            try:
                line = input("you> ") if interactive else stdin.readline()
            except EOFError:
                break
            if not interactive and not line:
                break  # end of piped input
            line = line.strip()
            if not line:
                continue
            if line in ("/exit", "/quit"):
                break
            if line == "/reset":
                session.reset()
                conversations.append(list(system))
                if interactive:
                    write("(conversation reset)\n")
                continue
            if interactive:
                write("assistant> ")
            try:
                turn(line)
            except ValueError as e:  # a message too long for the context: say so and carry on
                write(f"\n(error: {e})\n")
    conversations = [c for c in conversations if any(m["role"] == "assistant" for m in c)]
    if cfg.save:
        save_conversations(cfg.save, conversations)
    return conversations


def save_conversations(path: str, conversations: list[list[dict]]) -> None:
    """Append one ``{"messages": [...]}`` row per conversation to a .jsonl file (TRL's conversational format)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as f:
        for messages in conversations:
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


def _enable_line_editing() -> None:
    try:
        import readline  # noqa: F401  (arrow keys and history for input())
    except ImportError:
        pass


def main(argv: list[str]) -> int:
    if argv and "=" not in argv[0] and not argv[0].startswith("-"):
        argv = [f"model={argv[0]}", *argv[1:]]  # `lmforge chat MODEL ...`
    cfg = parse_cli(argv, ChatConfig, prog="lmforge chat", description=__doc__)

    try:
        run_chat(cfg)
    except ConfigError:
        raise  # the CLI prints it as a config error
    except (FileNotFoundError, ValueError) as e:  # no such model, unsupported model, message too long
        print(f"lmforge chat: error: {e}", file=sys.stderr)
        return 2
    return 0
