"""The web chat page of `lmforge serve`, in a real browser: Debian's headless Chromium driven by playwright.

`lmforge serve` runs as a user starts it (a subprocess, a loopback port); the test types a message, watches the
reply stream into the page chunk by chunk and end as the server's own greedy answer, sends a second turn with the
whole conversation, starts a new chat (the log and the conversation cleared), and checks that "New chat" in the
middle of a reply stops it rather than letting it leak into the next conversation."""

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

from lmforge.modelio import load_model_dir, load_tokenizer, save_model_dir

CHROMIUM = os.environ.get("LMFORGE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the browser is Debian's "
                                 "chromium, never `playwright install`)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium: apt-get install -y chromium "
                                "(.ci/run installs it where apt-get can)")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]  # root in a container: no sandbox


def start_server(model_dir: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """`lmforge serve MODEL port=0` in a child process; returns it and its URL once it listens."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(model_dir), "port=0", "device=cpu",
                             *args], stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:
        found = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
        if found:
            return proc, found.group(1)
    raise AssertionError(f"lmforge serve exited ({proc.wait()}) without serving")


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    path = tiny_model_dir("page", text="The assistant answers the user. Response A or B? Hello there, friend.\n",
                          layers=2, max_positions=512)
    model, tok = load_model_dir(path), load_tokenizer(path)
    with torch.no_grad():  # a random model's greedy reply tends to a run of newlines, which shows nothing: make
        for i in range(tok.vocab_size):  # whitespace-only tokens unlikely (their tied embedding rows -> 0)
            if not tok.decode([i]).strip():
                model.model.embed_tokens.weight[i] = 0
    save_model_dir(path, model, tok)
    proc, url = start_server(path, "verbose=false")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 900, "height": 640})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server + "/")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "40")
    yield page
    page.close()
    assert not errors, errors  # no uncaught script error at any point


def requests_of(page) -> list[dict]:
    """The bodies of the page's chat-completion requests, recorded as they are sent."""
    bodies = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions")
            else None)
    return bodies


def count_updates(page) -> None:
    """From now on, window.updates counts every change the page makes to an assistant message's text."""
    page.evaluate("""() => { window.updates = 0;
        new MutationObserver((records) => { window.updates += records.filter((r) =>
            (r.target.closest ? r.target : r.target.parentElement).closest('.assistant')).length; })
          .observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true}); }""")


def send(page, text: str) -> str:
    """Type a message, press Enter, wait for the reply to finish; returns the reply's text."""
    before = page.locator(".msg.assistant").count()
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    page.wait_for_function("n => document.querySelectorAll('.msg.assistant').length > n && "
                           "!document.getElementById('send').disabled", arg=before, timeout=60_000)
    return page.locator(".msg.assistant").nth(before).text_content()


def api_answer(url: str, messages: list[dict], max_tokens: int) -> str:
    body = json.dumps({"messages": messages, "temperature": 0, "max_tokens": max_tokens}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["choices"][0]["message"]["content"]


def test_type_a_message_see_the_streamed_reply_then_start_a_new_chat(page, server):
    bodies = requests_of(page)
    page.wait_for_function("() => document.getElementById('model').textContent")  # /health names the model
    assert page.text_content("#model") == json.loads(urllib.request.urlopen(server + "/health").read())["model"]
    count_updates(page)
    reply = send(page, "Response A or B?")
    expected = api_answer(server, [{"role": "user", "content": "Response A or B?"}], 40)
    assert reply == expected and len(reply.strip()) > 10, (reply, expected)
    assert page.evaluate("window.updates") >= 3  # it arrived in pieces, not all at once
    assert bodies[0]["stream"] is True and bodies[0]["messages"] == [{"role": "user", "content": "Response A or B?"}]
    assert page.locator(".msg.user").text_content() == "Response A or B?"

    send(page, "Hello there")  # the second turn carries the whole conversation
    assert [m["role"] for m in bodies[1]["messages"]] == ["user", "assistant", "user"]
    assert bodies[1]["messages"][1]["content"] == reply.strip()

    page.click("#reset")
    assert page.locator("#log .msg").count() == 0
    send(page, "Hello there")
    assert bodies[2]["messages"] == [{"role": "user", "content": "Hello there"}]  # the old conversation is gone


def test_new_chat_during_a_reply_stops_it(page):
    bodies = requests_of(page)
    page.fill("#max_tokens", "400")
    page.fill("#prompt", "Response A or B?")
    page.press("#prompt", "Enter")
    page.wait_for_function("() => (document.querySelector('.msg.assistant') || {}).textContent", timeout=60_000)
    page.click("#reset")  # while the reply is still streaming
    page.wait_for_function("() => !document.getElementById('send').disabled", timeout=60_000)
    assert page.locator("#log .msg").count() == 0  # nothing of the stopped reply comes back
    page.fill("#max_tokens", "8")
    send(page, "Hello there")
    assert bodies[-1]["messages"] == [{"role": "user", "content": "Hello there"}]
    assert page.locator("#log .msg").count() == 2


def test_pressing_enter_while_a_reply_streams_sends_nothing(page):
    bodies = requests_of(page)
    page.fill("#max_tokens", "400")
    page.fill("#prompt", "Response A or B?")
    page.press("#prompt", "Enter")
    page.wait_for_function("() => (document.querySelector('.msg.assistant') || {}).textContent", timeout=60_000)
    # Enter while the reply streams (checked in the same task as the key press, so a reply that ends in between
    # cannot make a second request legitimate): the send button is disabled, and Enter must not send either
    streaming = page.evaluate("""() => {
        const busy = document.getElementById('send').disabled, box = document.getElementById('prompt');
        box.value = 'Hello there';
        box.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', bubbles: true, cancelable: true}));
        return busy; }""")
    page.wait_for_function("() => !document.getElementById('send').disabled", timeout=120_000)
    if not streaming:
        pytest.skip("the reply ended before Enter could be pressed during it (a fast machine); nothing to check")
    assert len(bodies) == 1 and page.locator(".msg.user").count() == 1
    assert page.input_value("#prompt") == "Hello there"  # kept for when the reply is done


def test_an_error_is_shown_and_forgotten(page):
    page.fill("#max_tokens", "0")  # the server refuses max_tokens < 1
    bodies = requests_of(page)
    page.fill("#prompt", "Hello there")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.error", timeout=60_000)
    assert "max_tokens" in page.text_content(".msg.error")
    page.fill("#max_tokens", "8")
    send(page, "Hello there")
    assert bodies[-1]["messages"] == [{"role": "user", "content": "Hello there"}]  # the failed turn is not resent
