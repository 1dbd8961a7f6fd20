"""The playground in real headless Chromium (Debian's /usr/bin/chromium driven by Playwright)."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from diffcoder.decoding import block_spans, commit_counts

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("the playground test needs Debian's chromium at /usr/bin/chromium "
                "(apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        yield pg
        browser.close()


def generate_counting_commits(page) -> list[int]:
    """Click Generate and wait for the end, recording how many slots are committed after every change of the
    canvas (tokens must appear over time); returns those counts."""
    page.evaluate("""() => { window.__counts = [];
        new MutationObserver(() => window.__counts.push(
            document.querySelectorAll('#canvas .slot.committed').length))
          .observe(document.getElementById('canvas'), {childList: true}); }""")
    page.click("#generate")
    page.wait_for_selector("body[data-state=done]", timeout=60000)
    return page.evaluate("window.__counts")


def test_playground_shows_the_denoising(page, server, tmp_path):
    page.goto(server.base + "/")
    page.wait_for_selector("body[data-state=ready]", timeout=20000)
    assert server.model_name in page.inner_text("#model")
    # the remasking choices are the server's (diffcoder.settings.REMASKING), the checkpoint's default selected
    from diffcoder.settings import REMASKING

    assert page.eval_on_selector_all("#remasking option", "os => os.map(o => o.value)") == list(REMASKING)
    assert page.input_value("#remasking") == REMASKING[0]
    prompt = "Write a function that adds two numbers."
    page.fill("#prompt", prompt)
    page.select_option("#mode", "chat")
    page.fill("#max_tokens", "24")
    page.fill("#steps_per_block", "2")
    counts = generate_counting_commits(page)

    api = httpx.post(server.base + "/v1/chat/completions", timeout=60, json={
        "model": server.model_name, "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 24, "steps_per_block": 2}).json()
    P = api["usage"]["prompt_tokens"]
    # slots committed per step (docs/design.md §2.3): 2 steps per block, a 1-slot block takes 1
    sizes = [c for s, e in block_spans(P, 24, 4) for c in commit_counts(e - max(s, P), 2) if c]
    n_steps = len(sizes)
    assert len(set(counts)) > 3 and counts == sorted(counts), counts  # 2 per step, growing
    slots = page.query_selector_all("#canvas .slot")
    assert len(slots) == 24  # the whole canvas, every slot committed
    steps = sorted({int(s.get_attribute("data-step")) for s in slots})
    assert steps == list(range(1, n_steps + 1))  # each step coloured by its own number
    colours = {s.get_attribute("style") for s in slots}
    assert len(colours) == n_steps

    assert page.evaluate("document.getElementById('final').textContent") == api["choices"][0]["message"]["content"]

    # replay: at step 3 exactly the slots committed in steps 1..3 are shown
    page.evaluate("""() => { const r = document.getElementById('replay'); r.value = '3';
                              r.dispatchEvent(new Event('input')); }""")
    shown = page.query_selector_all("#canvas .slot.committed")
    assert sorted({int(s.get_attribute("data-step")) for s in shown}) == [1, 2, 3]
    assert len(shown) == sum(sizes[:3])
    page.click("#play")
    page.wait_for_function(f"document.getElementById('replay-label').textContent === 'step {n_steps} / {n_steps}'",
                           timeout=20000)
    assert len(page.query_selector_all("#canvas .slot.committed")) == 24

    shot = Path(os.environ.get("DIFFCODER_SCREENSHOT_DIR", tmp_path)) / "playground.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_playground_highlighter_and_errors(page, server):
    page.goto(server.base + "/")
    page.wait_for_selector("body[data-state=ready]", timeout=20000)
    code = "def add(a, b):\n    # sum\n    return a + 'x' + 1\n"
    html = page.evaluate("(c) => highlight(c)", code)
    assert '<span class="kw">def</span>' in html and '<span class="fn">add</span>' in html
    assert '<span class="com"># sum</span>' in html and '<span class="str">\'x\'</span>' in html
    text = page.evaluate("(h) => { const d = document.createElement('div'); d.innerHTML = h; return d.textContent; }",
                         html)
    assert text == code  # highlighting never changes the text
    answer = "Here's how:\n```python\n" + code + "```\nIt's short."
    html = page.evaluate("(c) => highlightAnswer(c)", answer)
    assert '<span class="kw">def</span>' in html and "Here's how" in html  # prose stays plain
    assert page.evaluate("(h) => { const d = document.createElement('div'); d.innerHTML = h; return d.textContent; }",
                         html) == answer
    # an invalid setting shows the server's error message
    page.fill("#max_tokens", "100000")
    page.click("#generate")
    page.wait_for_selector("body[data-state=error]", timeout=20000)
    assert "context" in page.inner_text("#error")


def test_playground_infill_mode(page, fim_server, server, tmp_path):
    """Infill mode sends prefix and suffix to /v1/completions; the canvas shows the middle filling in between the
    prefix and the suffix, and the answer is prefix + middle + suffix."""
    from serving_helpers import FIM_PREFIX, FIM_SUFFIX

    page.goto(fim_server.base + "/")
    page.wait_for_selector("body[data-state=ready]", timeout=20000)
    assert not page.evaluate("document.querySelector('#mode option[value=infill]').disabled")
    page.select_option("#mode", "infill")
    assert page.is_visible("#prefix") and page.is_visible("#suffix") and not page.is_visible("#prompt")
    page.fill("#prefix", FIM_PREFIX)
    page.fill("#suffix", FIM_SUFFIX)
    page.fill("#max_tokens", "24")
    counts = generate_counting_commits(page)

    api = httpx.post(fim_server.base + "/v1/completions", timeout=60, json={
        "model": fim_server.model_name, "prompt": FIM_PREFIX, "suffix": FIM_SUFFIX, "max_tokens": 24}).json()
    middle = api["choices"][0]["text"]
    assert len(set(counts)) > 3 and counts == sorted(counts), counts  # the middle filled in over several steps
    # the canvas: the prefix, then the slots, then the suffix
    kinds = page.evaluate("""() => [...document.getElementById('canvas').children].map(
        (e) => e.classList.contains('context') ? e.classList[1] : 'slot')""")
    assert kinds[0] == "prefix" and kinds[-1] == "suffix" and set(kinds[1:-1]) == {"slot"}
    assert page.evaluate("document.querySelector('#canvas .context.prefix').textContent") == FIM_PREFIX
    assert page.evaluate("document.querySelector('#canvas .context.suffix').textContent") == FIM_SUFFIX
    n_middle = api["usage"]["completion_tokens"]
    assert n_middle > 4 and len(page.query_selector_all("#canvas .slot.committed")) >= n_middle
    # the answer: the whole file, the middle marked
    assert page.evaluate("document.getElementById('final').textContent") == FIM_PREFIX + middle + FIM_SUFFIX
    assert page.evaluate("document.querySelector('#final .middle').textContent") == middle
    shot = Path(os.environ.get("DIFFCODER_SCREENSHOT_DIR", tmp_path)) / "playground-infill.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a model without FIM tokens offers no infill mode
    page.goto(server.base + "/")
    page.wait_for_selector("body[data-state=ready]", timeout=20000)
    assert page.evaluate("document.querySelector('#mode option[value=infill]').disabled")
