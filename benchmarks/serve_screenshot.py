"""Screenshot of the playground for docs/serving.md: serve a model on loopback, drive Debian's chromium with
Playwright, generate once, and save the page.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/serve_screenshot.py --out docs/serving-playground.png
"""

from __future__ import annotations

import argparse
import socket
import threading
import time

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the embedded default model)")
    ap.add_argument("--prompt", default="Write a Python function that checks whether a string is a palindrome.")
    ap.add_argument("--max-tokens", default="48")
    ap.add_argument("--replay-step", type=int, default=None,
                    help="show the canvas at this step instead of the end")
    ap.add_argument("--out", default="docs/serving-playground.png")
    args = ap.parse_args()

    import uvicorn
    from playwright.sync_api import sync_playwright

    from diffcoder.loading import resolve_model
    from diffcoder.serving import build_app

    app, _ = build_app(str(resolve_model(args.model)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 820})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("body[data-state=ready]", timeout=60000)
            page.fill("#prompt", args.prompt)
            page.fill("#max_tokens", args.max_tokens)
            page.click("#generate")
            page.wait_for_selector("body[data-state=done]", timeout=600000)
            if args.replay_step is not None:
                page.evaluate("(s) => { const r = document.getElementById('replay'); r.value = String(s);"
                              " r.dispatchEvent(new Event('input')); }", args.replay_step)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
