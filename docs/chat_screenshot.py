"""Take docs/chat_page.png: `lmforge serve MODEL` on a loopback port, one question typed into the chat page in
headless Chromium (Debian's, driven by playwright, as tests/test_chat_page.py does), the streamed answer awaited.

    python docs/chat_screenshot.py runs/smollm2 docs/chat_page.png "What is the capital of France?"
"""

import re
import shutil
import subprocess
import sys

from playwright.sync_api import sync_playwright


def main(model: str, out: str, question: str) -> None:
    server = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", model, "port=0", "verbose=false"],
                              stderr=subprocess.PIPE, text=True)
    try:
        url = next(m.group(1) for line in server.stderr if (m := re.search(r"at (http://[\d.:]+)/v1", line)))
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"),
                                        args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 760, "height": 420})
            page.goto(url + "/")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "64")
            page.fill("#prompt", question)
            page.press("#prompt", "Enter")
            page.wait_for_function("() => document.querySelector('.msg.assistant') && "
                                   "!document.getElementById('send').disabled", timeout=300_000)
            page.screenshot(path=out)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main(*sys.argv[1:4])
