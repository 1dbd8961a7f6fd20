"""`Row`, the engine's per-sequence bookkeeping, fed decoder events directly: the logprobs it reports (streamed
or whole) always match the tokens it keeps, including blocks that add no text and answers cut at a stop string."""

from __future__ import annotations

import pytest

from diffcoder.decoding import DecodeEvent
from diffcoder.serving.engine import DecodeSettings, Row
from diffcoder.testing import tiny_tokenizer

SETTINGS = DecodeSettings(gen_length=12, steps=12, block_length=4, threshold=None,
                          remasking="low_confidence", temperature=0.0)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def feed(row: Row, blocks: list[list[int]], prompt_len: int = 3) -> None:
    """Commit each block's tokens one per step (logprob -0.1 * position), then close the block."""
    q = prompt_len
    for b, block in enumerate(blocks):
        positions = list(range(q, q + len(block)))
        for p, t in zip(positions, block):
            row.on_commit(DecodeEvent("commit", 0, b, 0, [p], [t], 0, [-0.1 * p], [[(t, -0.1 * p), (1, -9.0)]]))
        row.on_block(block, positions)
        q += len(block)
        if row.done:
            break
    row.finalize()


def run(tok, blocks, max_tokens=12, stop=None, logprobs=1):
    out = []
    row = Row([5, 6, 7], SETTINGS, max_tokens, stop or [], lambda kind, payload: out.append((kind, payload)), tok,
              tok.eos_token_id, logprobs=logprobs)
    feed(row, blocks)
    streamed = [s for kind, p in out if kind == "delta" for s in p["logprobs"] or []]
    final = out[-1][1]
    return row, streamed + (final["tail_logprobs"] or []), final


def ids(tok, text: str) -> list[int]:
    return tok(text)["input_ids"]


def test_a_block_of_special_tokens_reports_its_logprobs_on_the_final_chunk(tok):
    text = ids(tok, "def add(a, b):")[:4]
    special = [tok.convert_tokens_to_ids("<|endoftext|>")] * 4  # decodes to no text: no delta for this block
    row, streamed, final = run(tok, [text, special], max_tokens=8, logprobs=2)
    assert final["finish_reason"] == "length" and row.ids == text + special
    assert len(final["tail_logprobs"]) == 4  # only the final chunk can carry them
    want = [(t, -0.1 * (3 + i), [(t, -0.1 * (3 + i)), (1, -9.0)]) for i, t in enumerate(text + special)]
    assert streamed == final["logprobs"] == want


def test_eos_and_max_tokens_cut_the_scores_with_the_tokens(tok):
    body = ids(tok, "for i in range(10):\n")
    row, streamed, final = run(tok, [body[:4], body[4:6] + [tok.eos_token_id] + body[6:7]])
    assert row.ids == body[:6] and [s[0] for s in final["logprobs"]] == body[:6] and streamed == final["logprobs"]
    row, streamed, final = run(tok, [body[:4], body[4:8]], max_tokens=5)
    assert row.ids == body[:5] and [s[0] for s in streamed] == body[:5]


def test_a_stop_string_cuts_the_scores_with_the_tokens(tok):
    body = ids(tok, "class Stack:\n    def __init__(self):\n")
    text = tok.decode(body)
    stop = "Stack:"
    row, streamed, final = run(tok, [body[:4], body[4:8], body[8:12]], stop=[stop])
    assert final["finish_reason"] == "stop" and final["text"] == text[: text.index(stop)]
    k = next(k for k in range(1, len(body) + 1) if stop in tok.decode(body[:k]))
    assert [s[0] for s in final["logprobs"]] == body[:k] == [s[0] for s in streamed]


def test_no_logprobs_asked_none_reported(tok):
    row, _, final = run(tok, [ids(tok, "import os")[:4]], max_tokens=4, logprobs=None)
    assert final["logprobs"] is None and final["tail_logprobs"] is None
