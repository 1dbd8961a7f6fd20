"""The decoding engine behind the server: a bounded queue of rows and one worker thread that decodes them.

A *row* is one sequence to generate (one choice of one prompt). The worker takes the oldest waiting row,
gathers every waiting row with the same batch-wide settings (`DecodeSettings.batch_key`, up to `max_batch`), and
decodes them together
with `diffcoder.decoding.generate`. Rows leave a batch between blocks (EOS, stop string, max_tokens, or a
client that went away); new rows join at the next batch. The asyncio side only queues rows and reads their
output through a thread-safe `sink` callback.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from diffcoder.decoding import DecodeEvent, generate
from diffcoder.errors import DiffcoderError
from diffcoder.serving.metrics import Metrics
from diffcoder.settings import DecodeSettings

log = logging.getLogger("diffcoder.serving")

class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__("the request queue is full")
        self.retry_after = retry_after


class EngineDown(Exception):
    """The decoder thread is dead and will not be started again."""


Sink = Callable[[str, Any], None]  # (kind, payload): 'delta' | 'commit' | 'final' | 'error'
TokenScore = tuple[int, float | None, list[tuple[int, float]]]  # (token id, logprob, top alternatives)


class Row:
    """One sequence being generated: turns the decoder's block events into text deltas, stops at EOS, at
    `max_tokens` or at the first stop string, and reports everything through `sink`."""

    def __init__(self, prompt_ids: list[int], settings: DecodeSettings, max_tokens: int, stop: list[str],
                 sink: Sink, tokenizer, eos_id: int | None, events: bool = False, seed: int | None = None,
                 logprobs: int | None = None) -> None:
        self.prompt_ids = prompt_ids
        self.settings = settings
        self.batch_key = settings.batch_key()  # rows decoded together share it
        self.max_tokens = max_tokens
        self.stop = stop
        self.sink = sink
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.events = events
        self.seed = seed
        self.logprobs = logprobs  # None: off; k: each token's logprob and its k most likely alternatives
        self.ids: list[int] = []  # generated ids kept for the answer (no EOS, cut at a stop string)
        self.scores: list[TokenScore] = []  # with logprobs: one per kept id
        self._pending_scores: dict[int, TokenScore] = {}  # committed slots whose block is not final yet
        self.reported = 0  # scores already handed to the sink
        self.sent = ""  # text already handed to the sink
        self.text = ""  # the answer so far (cut at a stop string)
        self.finish_reason: str | None = None
        self.cancelled = False  # set by the client side when the client goes away
        self.finalized = False
        self.commit_steps = 0
        self.decoded = 0  # canvas slots the decoder has finished for this row (all blocks so far)

    # -- text ------------------------------------------------------------------------------------------
    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _held_back(self, text: str) -> int:
        """Characters at the end of `text` not safe to send yet: a partial UTF-8 character, or a prefix of a
        stop string that the next block may complete."""
        hold = 0
        if text.endswith("\ufffd"):
            hold = len(text) - len(text.rstrip("\ufffd"))
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return hold

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    def _take(self, token_ids: list[int], positions: list[int]) -> None:
        """Keep the block's tokens up to EOS or max_tokens (with their scores when asked)."""
        for t, q in zip(token_ids, positions):
            if t == self.eos_id:
                self.finish_reason = "stop"
                break
            self.ids.append(t)
            if self.logprobs is not None:
                self.scores.append(self._pending_scores.get(q, (t, None, [])))
            if len(self.ids) >= self.max_tokens:
                self.finish_reason = "length"
                break
        self._pending_scores.clear()

    def _cut_at_stop(self, text: str, before: int) -> str:
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if not hits:
            return text
        self.finish_reason = "stop"
        # usage counts the tokens up to the one that completed the stop string
        for k in range(before + 1, len(self.ids) + 1):
            if any(s in self.decode(self.ids[:k]) for s in self.stop):
                del self.ids[k:], self.scores[k:]
                break
        return text[: min(hits)]

    def on_block(self, token_ids: list[int], positions: list[int]) -> None:
        self.decoded += len(token_ids)
        if self.done:
            return
        before = len(self.ids)
        self._take(token_ids, positions)
        text = self.decode(self.ids)
        if self.stop:
            text = self._cut_at_stop(text, before)
        self.text = text
        safe = text if self.finish_reason else text[: len(text) - self._held_back(text)]
        if len(safe) > len(self.sent) and safe.startswith(self.sent):
            self.sink("delta", {"text": safe[len(self.sent):], "logprobs": self.unreported_scores()})
            self.sent = safe

    def unreported_scores(self) -> list[TokenScore] | None:
        """Scores of the kept tokens not yet handed to the sink (None when logprobs are off)."""
        if self.logprobs is None:
            return None
        out = self.scores[self.reported:]
        self.reported = len(self.scores)
        return out

    def on_commit(self, ev: DecodeEvent) -> None:
        if self.done:
            return
        if self.logprobs is not None:
            for q, t, lp, alts in zip(ev.positions, ev.token_ids, ev.logprobs, ev.top_logprobs):
                self._pending_scores[q] = (t, lp, alts[: self.logprobs])
        if not self.events:
            return
        self.commit_steps += 1
        p = len(self.prompt_ids)
        self.sink("commit", {
            "block": ev.block,
            "step": self.commit_steps,  # denoising steps of this row so far (1-based)
            "positions": [q - p for q in ev.positions],  # relative to the first generated slot
            "token_ids": ev.token_ids,
            "tokens": [self.tokenizer.decode([t]) for t in ev.token_ids],
        })

    def fail(self, status: int, message: str) -> None:
        """Answer this row with an error instead of a result (once)."""
        if not self.finalized:
            self.finalized = True
            self.sink("error", {"status": status, "message": message})

    def finalize(self) -> None:
        if self.finalized:
            return
        self.finalized = True
        if self.finish_reason is None:
            self.finish_reason = "cancelled" if self.cancelled else "length"
        tail = self.text[len(self.sent):] if self.text.startswith(self.sent) else ""
        self.sent = self.text
        # text held back (a possible stop-string prefix) rides on the final chunk
        self.sink("final", {"text": self.text, "tail": tail, "finish_reason": self.finish_reason,
                            "completion_tokens": len(self.ids), "prompt_tokens": len(self.prompt_ids),
                            "logprobs": self.scores if self.logprobs is not None else None,
                            "tail_logprobs": self.unreported_scores()})


class Engine:
    """Owns the model; one worker thread decodes batches of rows taken from a bounded queue.

    A failing batch answers its own rows with an error and the worker goes on. Should the worker thread die
    anyway, its rows are answered, `death` says why, and `supervise()` starts a new one (at most
    `max_restarts` times; after that the engine is down and refuses new rows)."""

    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int = 64,
                 metrics: Metrics | None = None, mask_id: int | None = None, batch_wait: float = 0.02,
                 max_restarts: int = 3) -> None:
        if max_batch < 1 or max_queue < 1:
            raise DiffcoderError("--max-batch and --max-queue must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self.mask_id = mask_id
        # An idle worker waits this long (seconds) for more rows before starting a batch: requests sent together
        # arrive a few ms apart, and a batch cannot take new rows once it has started.
        self.batch_wait = batch_wait
        self.max_restarts = max_restarts
        self.restarts = 0
        self.death: str | None = None  # why the worker thread last died
        self.down = False  # dead for good: no restarts left
        self.eos_id = getattr(tokenizer, "eos_token_id", None) or model.config.eos_token_id
        self._pending: deque[Row] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._batch_seconds: deque[float] = deque(maxlen=20)

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="diffcoder-decoder", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def supervise(self) -> bool:
        """Called periodically: restart a dead worker while restarts are left. False once the engine is down."""
        if self.alive or self._stopping or self._thread is None:
            return not self.down
        if self.restarts < self.max_restarts:
            self.restarts += 1
            self.metrics.engine_restarts.inc()
            log.error("the decoder thread died (%s); starting it again (restart %d of %d)", self.death,
                      self.restarts, self.max_restarts)
            self.start()
            return True
        if not self.down:
            self.down = True
            with self._cond:
                waiting, self._pending = list(self._pending), deque()
                self.metrics.queue_depth.set(0)
            for r in waiting:
                r.fail(503, f"the decoder stopped ({self.death}) and the server is shutting down; retry on a "
                            f"restarted server")
        return False

    # -- queue -------------------------------------------------------------------------------------------
    def _prune(self) -> None:
        """Drop waiting rows whose clients went away (caller holds the lock)."""
        if any(r.cancelled for r in self._pending):
            gone = [r for r in self._pending if r.cancelled]
            self._pending = deque(r for r in self._pending if not r.cancelled)
            self.metrics.cancelled_rows.inc(len(gone))
            for r in gone:
                r.finalize()
        self.metrics.queue_depth.set(len(self._pending))

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained one batch (at least 1)."""
        per_batch = sum(self._batch_seconds) / len(self._batch_seconds) if self._batch_seconds else 1.0
        return max(1, math.ceil(per_batch * len(self._pending) / self.max_batch))

    def submit(self, rows: list[Row]) -> None:
        if self.down:
            raise EngineDown(self.death)
        with self._cond:
            self._prune()
            if len(self._pending) + len(rows) > self.max_queue:
                raise QueueFull(self.retry_after())
            self._pending.extend(rows)
            self.metrics.queue_depth.set(len(self._pending))
            self._cond.notify()

    def queue_depth(self) -> int:
        with self._cond:
            return len(self._pending)

    def wake(self) -> None:
        """Let the worker prune cancelled rows now."""
        with self._cond:
            self._prune()

    def _next_batch(self) -> list[Row] | None:
        with self._cond:
            while True:
                self._prune()
                if self._stopping:
                    return None
                if self._pending:
                    break
                self._cond.wait(timeout=0.5)
                if self._pending and self.batch_wait > 0:  # woke from idle: let simultaneous requests gather
                    deadline = time.monotonic() + self.batch_wait
                    while len(self._pending) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                        self._cond.wait(timeout=left)
            key = self._pending[0].batch_key
            batch = [r for r in self._pending if r.batch_key == key][: self.max_batch]
            taken = set(map(id, batch))
            self._pending = deque(r for r in self._pending if id(r) not in taken)
            self.metrics.queue_depth.set(len(self._pending))
            return batch

    # -- worker ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                self._run_batch(batch)
        except BaseException as exc:  # the thread goes down: say why, for /health and the supervisor
            self.death = f"{type(exc).__name__}: {exc}"
            log.exception("the decoder thread died")

    def _generator(self, batch: list[Row]) -> torch.Generator | None:
        """One random generator for a sampling batch, seeded by its first row (any int64 seed; none: random)."""
        if not batch[0].batch_key.sampling:
            return None
        seed = batch[0].seed
        gen = torch.Generator(device=self.model.device)
        gen.manual_seed(seed % 2**64 if seed is not None else time.time_ns() % 2**63)
        return gen

    def _run_batch(self, batch: list[Row]) -> None:
        s = batch[0].batch_key
        want = [r.logprobs for r in batch if r.logprobs is not None]
        self.metrics.active_rows.set(len(batch))
        self.metrics.prompt_tokens.inc(sum(len(r.prompt_ids) for r in batch))

        def on_event(ev: DecodeEvent) -> None:
            row = batch[ev.row]
            if ev.kind == "block":
                row.on_block(ev.token_ids, ev.positions)
            elif ev.kind == "commit":
                row.on_commit(ev)
            elif ev.kind == "done":
                if row.cancelled and row.finish_reason is None and row.decoded < s.canvas_length:
                    self.metrics.cancelled_rows.inc()  # dropped before its canvas was complete
                row.finalize()
                self.metrics.active_rows.set(sum(not r.finalized for r in batch))

        def cancelled(i: int) -> bool:
            return batch[i].done  # client gone, or the answer is complete (stop string, max_tokens)

        t0 = time.perf_counter()
        try:
            # the whole canvas: each row trims its own answer (max_tokens, EOS, stop strings)
            kw = {k: v for k, v in s.generate_kwargs().items() if k != "max_new_tokens"}
            result = generate(
                self.model, [r.prompt_ids for r in batch], **{**kw, "gen_length": s.canvas_length,
                                                             "steps": s.total_steps},
                eos_id=self.eos_id, mask_id=self.mask_id, tokenizer=self.tokenizer, on_event=on_event,
                cancelled=cancelled, generator=self._generator(batch), return_result=True,
                logprobs=max(want) if want else None,
            )
            self.metrics.observe_batch(len(batch), result.forwards, sum(len(r.ids) for r in batch), result.steps)
        except Exception as exc:  # a failing batch answers its own rows and leaves the server running
            status = 400 if isinstance(exc, DiffcoderError) else 500
            log.exception("a decoder batch failed")
            for r in batch:
                r.fail(status, f"decoding failed: {type(exc).__name__}: {exc}")
        except BaseException as exc:  # the thread is going down: answer the rows it holds first
            for r in batch:
                r.fail(503, f"the decoder thread stopped ({type(exc).__name__}: {exc}); retry the request")
            raise
        finally:
            for r in batch:
                r.finalize()
            self._batch_seconds.append(time.perf_counter() - t0)
            self.metrics.active_rows.set(0)
