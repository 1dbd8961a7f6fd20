"""The benchmark harness: batched generation, sandboxed tests, resumable per-task records, and a summary.

A run directory holds `config.json` (what was asked), `tasks.jsonl` (one record per finished sample, appended
as soon as its test has run) and `summary.json`. Rerunning the same command skips finished samples, so an
interrupted run loses at most the batch in flight.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import threading
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from diffcoder.errors import ConfigError
from diffcoder.evaluation.benchmarks import Task, get_benchmark, load_tasks
from diffcoder.evaluation.extract import has_complete_block
from diffcoder.evaluation.metrics import ks_for, mean_pass_at_k
from diffcoder.evaluation.sandbox import Limits, Sandbox

# Settings that change what a record means: a rerun with other values must not resume into the same folder.
IDENTITY_KEYS = ("benchmark", "variant", "model", "prompt_style", "samples", "ar", "decoding", "data", "seed",
                 "api_base")


@dataclass
class EvalConfig:
    benchmark: str
    model: str  # a checkpoint path, or with api_base the served model's name
    prompt_style: str = "base"
    limit: int | None = None
    variant: str | None = None  # the benchmark's --split / --task value
    spread: int | None = None  # N tasks spread evenly over the (limited) list: a deterministic sample
    samples: int = 1
    ar: bool = False
    decoding: dict = field(default_factory=dict)  # generate() kwargs (diffusion) or max_new_tokens/temperature
    batch_size: int = 8
    data: str | None = None
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    workers: int = 0  # sandbox processes in parallel (0 = one per core)
    timeout_s: float = 10.0
    memory_mb: int = 1024
    cpu_s: int | None = None  # CPU seconds per test program (default: the timeout rounded up, plus 1)
    api_base: str | None = None  # an OpenAI-compatible server that generates instead of a local model

    @property
    def name(self) -> str:
        """The benchmark with its variant, as summaries and `compare` show it (`cruxeval/output`)."""
        return f"{self.benchmark}/{self.variant}" if self.variant else self.benchmark

    def identity(self) -> dict:
        d = asdict(self)
        return {k: d[k] for k in IDENTITY_KEYS}


def read_records(path: Path) -> list[dict]:
    """Records of a (possibly interrupted) run. A line cut short by a kill is dropped and the file repaired."""
    if not path.is_file():
        return []
    raw = path.read_text(encoding="utf-8")
    records, clean = [], True
    for line in raw.splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            clean = False
    if not clean or (raw and not raw.endswith("\n")):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        os.replace(tmp, path)
    return records


def _check_run_dir(out: Path, cfg: EvalConfig) -> None:
    cfg_file = out / "config.json"
    if cfg_file.is_file():
        old = json.loads(cfg_file.read_text())
        old_identity = {k: old.get(k) for k in IDENTITY_KEYS}
        if old_identity != cfg.identity():
            diff = [k for k in IDENTITY_KEYS if old_identity.get(k) != cfg.identity()[k]]
            raise ConfigError(
                f"{out} holds a run with other settings ({', '.join(diff)} differ), so it cannot be resumed; "
                "choose another --out, or delete that folder to start over"
            )
    out.mkdir(parents=True, exist_ok=True)
    cfg_file.write_text(json.dumps(asdict(cfg), indent=2) + "\n")


class _Progress:
    """Running pass rate and generated tokens/s on a tqdm bar."""

    def __init__(self, total: int, done_records: list[dict], enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="task", disable=not enabled, dynamic_ncols=True)
        self.passed = sum(r["passed"] for r in done_records)
        self.count = len(done_records)
        self.tokens = 0
        self.seconds = 0.0
        self.lock = threading.Lock()

    def generated(self, tokens: int, seconds: float) -> None:
        with self.lock:
            self.tokens += tokens
            self.seconds += seconds

    def finished(self, passed: bool) -> None:
        with self.lock:
            self.count += 1
            self.passed += int(passed)
            tps = self.tokens / self.seconds if self.seconds else 0.0
            self.bar.set_postfix(pass_rate=f"{self.passed / self.count:.3f}", tok_s=f"{tps:.1f}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class _Decoder:
    """Batched decoding of prompts (diffusion `generate` or AR `generate_ar`), with early stop per row
    (a stop string for base prompts, a finished code block for instruct ones) and per-row forward counts."""

    def __init__(self, model, tokenizer, cfg: EvalConfig):
        self.model, self.tok, self.cfg = model, tokenizer, cfg
        self.forwards = 0

    def _count(self, *_args) -> None:
        self.forwards += 1  # a fallback for decoders whose events carry no forward count

    def __call__(self, prompts: list[list[int]], tasks: list[Task], generator: torch.Generator | None):
        import diffcoder.decoding as decoding

        n = len(prompts)
        texts = [""] * n
        stopped = [False] * n
        done_at = [0] * n
        start = self.forwards
        style = self.cfg.prompt_style
        stops = [t.stop_strings(style) for t in tasks]
        ends = self._end_ids()
        eos = self._eos()
        middle_ends = ends - {eos}  # the decoder itself stops a row at EOS; these (FIM end-of-middle) it does not

        def on_event(ev) -> None:
            if ev.kind == "block":
                piece = self.tok.decode(ev.token_ids)
                texts[ev.row] += piece
                task = tasks[ev.row]
                if style == "instruct":
                    if "`" in piece:
                        stopped[ev.row] = has_complete_block(texts[ev.row], task.entry_point)
                else:
                    tail = texts[ev.row][-(len(piece) + max(map(len, stops[ev.row]), default=0)):]
                    stopped[ev.row] = (stopped[ev.row] or any(s in tail for s in stops[ev.row])
                                       or bool(middle_ends & set(ev.token_ids)))
            elif ev.kind == "done":
                # the decoder reports the batch's forwards so far (what this row cost); older decoders did not
                done_at[ev.row] = getattr(ev, "forwards", 0) or self.forwards - start

        kw = dict(self.cfg.decoding)
        hook = self.model.register_forward_hook(self._count)
        try:
            res = self._decode(decoding, kw, prompts, on_event, stopped, generator)
        finally:
            hook.remove()
        batch_forwards = res.forwards
        rows = []
        for i, g in enumerate(res.generated):
            ids = g.tolist()
            end = next((k for k, t in enumerate(ids) if t in ends), None)
            if end is not None:
                ids = ids[: end + 1]  # tokens up to and including the first end token (EOS) count as generated
            rows.append({"ids": ids, "forwards": done_at[i] or batch_forwards})
        return rows, batch_forwards

    def _end_ids(self) -> set[int]:
        """EOS, and for FIM prompts the checkpoint's end-of-middle tokens."""
        eos = self._eos()
        ends = {eos} if eos is not None else set()
        if self.cfg.prompt_style == "fim":
            from diffcoder.fim import require_fim_tokens

            ends |= set(require_fim_tokens(self.tok).end_ids)
        return ends

    def _decode(self, decoding, kw, prompts, on_event, stopped, generator):
        if self.cfg.ar:
            return decoding.generate_ar(
                self.model, prompts, max_new_tokens=kw.get("max_new_tokens", 384), eos_id=self._eos(),
                temperature=kw.get("temperature", 0.0) or 0.0, on_event=on_event,
                cancelled=lambda r: stopped[r], generator=generator, return_result=True)
        return decoding.generate(self.model, prompts, tokenizer=self.tok, eos_id=self._eos(), on_event=on_event,
                                 cancelled=lambda r: stopped[r], generator=generator, return_result=True, **kw)

    def _eos(self) -> int | None:
        if self.tok is not None and self.tok.eos_token_id is not None:
            return self.tok.eos_token_id
        return self.model.config.eos_token_id


def encode(tokenizer, task: Task, style: str, model_name: str = "this checkpoint") -> list[int]:
    """The prompt's token ids: FIM order for a gap (prefix and suffix around the checkpoint's FIM tokens; a
    checkpoint without them raises NoFimTokensError, which names the fix), the chat template for instruct."""
    from diffcoder.commands import encode_prompt
    from diffcoder.fim import infill_prompt_ids, require_fim_tokens

    suffix = task.fim_suffix(style)
    if suffix is not None:
        return infill_prompt_ids(tokenizer, task.prompt_text(style), suffix, require_fim_tokens(tokenizer, model_name))
    if style == "instruct" and (tokenizer is None or not tokenizer.chat_template):
        raise ConfigError("--prompt-style instruct needs a tokenizer with a chat template; use --prompt-style base")
    return encode_prompt(tokenizer, task.prompt_text(style), style == "instruct")


def select_tasks(tasks: list[Task], limit: int | None, spread: int | None) -> list[Task]:
    """The first `limit` tasks, then `spread` of them evenly spaced (a deterministic sample of a large split)."""
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {limit}")
        tasks = tasks[:limit]
    if spread is not None:
        if spread < 1:
            raise ConfigError(f"--spread must be at least 1, got {spread}")
        if spread < len(tasks):
            tasks = [tasks[i * len(tasks) // spread] for i in range(spread)]
    return tasks


def rescore_records(path: Path, tasks: list[Task], style: str, sandbox: Sandbox, workers: int) -> int:
    """Re-derive each finished record's code from its raw output and rerun its test (no generation): for a
    run made before a change to extraction or the sandbox. Rewrites the file atomically; returns the count."""
    by_id = {t.task_id: t for t in tasks}
    records = [r for r in read_records(path) if r["task_id"] in by_id]
    codes = [by_id[r["task_id"]].completion_code(r["raw_output"], style) for r in records]
    programs = [by_id[r["task_id"]].program(c, style) for r, c in zip(records, codes)]
    results = sandbox.run_many(programs, workers=workers)
    kept = []
    for r, c, res in zip(records, codes, results):
        if res.kind == "sandbox_error":
            continue  # left for the next run to redo
        r.update(code=c, passed=res.passed, kind=res.kind, detail=res.detail, exec_seconds=res.wall_s)
        kept.append(r)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)
    return len(kept)


def run_eval(cfg: EvalConfig, out_dir: str | Path, model=None, tokenizer=None, progress: bool = True,
             on_record: Callable[[dict], None] | None = None, rescore: bool = False, api_key: str | None = None,
             api_timeout: float = 600.0) -> dict:
    """Evaluate (resuming whatever `out_dir` already holds) and return the summary (also written there).

    rescore=True first reruns the tests of the finished records from their raw outputs. With `cfg.api_base` the
    prompts go to that server (`api_key`: its bearer token, never recorded) and no model is loaded."""
    _check_settings(cfg)
    out = Path(out_dir)
    tasks = select_tasks(load_tasks(cfg.benchmark, cfg.data, cfg.variant), cfg.limit, cfg.spread)
    _check_run_dir(out, cfg)
    records_path = out / "tasks.jsonl"
    sandbox = _open_sandbox(cfg)
    if rescore and records_path.is_file():
        rescore_records(records_path, tasks, cfg.prompt_style, sandbox, _sandbox_workers(cfg))
    records = read_records(records_path)
    pending = _pending_samples(records, tasks, cfg.samples)
    if pending:
        source = _open_source(cfg, tasks, pending, model, tokenizer, api_key, api_timeout)
        scorer = _Scorer(sandbox, records_path, _Progress(len(pending), records, progress), on_record)
        _generate_and_score(cfg, source, pending, scorer)
        records = read_records(records_path)
        scorer.warn_sandbox_errors()
    summary = summarize(records, cfg, tasks, sandbox)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _check_settings(cfg: EvalConfig) -> None:
    """Reject settings the benchmark cannot take before any file is written."""
    bench = get_benchmark(cfg.benchmark)
    if cfg.prompt_style not in bench.styles:
        raise ConfigError(f"{cfg.benchmark} takes --prompt-style {' or '.join(bench.styles)}, got {cfg.prompt_style!r}")
    if cfg.samples < 1 or cfg.batch_size < 1:
        raise ConfigError("--samples and --batch-size must be at least 1")


def _sandbox_workers(cfg: EvalConfig) -> int:
    return cfg.workers or os.cpu_count() or 1


def _open_sandbox(cfg: EvalConfig) -> Sandbox:
    """The sandbox for the test programs; says so on stderr when it cannot isolate them with namespaces."""
    sandbox = Sandbox(Limits(timeout_s=cfg.timeout_s, memory_mb=cfg.memory_mb, cpu_s=cfg.cpu_s))
    if sandbox.containment.mode != "bwrap":
        print("warning: the sandbox runs in its fallback mode, without namespaces: "
              + "; ".join(sandbox.containment.notes), file=sys.stderr)
    return sandbox


def _pending_samples(records: list[dict], tasks: list[Task], samples: int) -> list[tuple[Task, int]]:
    """The (task, sample index) pairs that have no record yet: what a resumed run still has to do."""
    done = {(r["task_id"], r["sample"]) for r in records}
    return [(t, j) for t in tasks for j in range(samples) if (t.task_id, j) not in done]


@dataclass
class _CompletionSource:
    """Where completions come from (a local model's `_Decoder` or an `ApiDecoder`), with each task's prompt text
    as its records show it."""

    decoder: Callable
    prompt_of: dict[str, str]
    tokenizer: object | None
    prompt_ids: dict[str, list[int]] | None = None  # local only: the API client encodes its own prompts

    def generate(self, batch: list[tuple[Task, int]], generator: torch.Generator | None) -> tuple[list[dict], int]:
        """One row per sample of the batch, and the forwards the batch took."""
        if self.prompt_ids is None:
            return self.decoder(batch)
        return self.decoder([self.prompt_ids[t.task_id] for t, _ in batch], [t for t, _ in batch], generator)

    def raw_text(self, row: dict) -> str:
        # a local row holds token ids; an API row holds the server's text
        return row["text"] if "text" in row else self.tokenizer.decode(row["ids"], skip_special_tokens=True)


def _open_source(cfg: EvalConfig, tasks: list[Task], pending: list[tuple[Task, int]], model, tokenizer,
                 api_key: str | None, api_timeout: float) -> _CompletionSource:
    """The API client when `cfg.api_base` is set; otherwise the given model, or the one `cfg.model` names."""
    if cfg.api_base:
        from diffcoder.evaluation.api_client import ApiDecoder

        decoder = ApiDecoder(cfg, api_key, api_timeout)
        return _CompletionSource(decoder, {t.task_id: decoder.prompt_record(t) for t in tasks}, tokenizer)
    if model is None:
        from diffcoder.loading import load

        model, tokenizer = load(cfg.model, dtype=cfg.dtype, device=cfg.device)
    if tokenizer is None:
        raise ConfigError(f"{cfg.model} has no tokenizer files; the benchmarks need text prompts")
    decoder = _Decoder(model, tokenizer, cfg)
    prompt_ids = {t.task_id: encode(tokenizer, t, cfg.prompt_style, cfg.model) for t in pending_tasks(pending)}
    return _CompletionSource(decoder, {k: tokenizer.decode(v) for k, v in prompt_ids.items()}, tokenizer, prompt_ids)


class _Scorer:
    """Runs each sample's test in the sandbox and appends its record; called from the thread pool."""

    def __init__(self, sandbox: Sandbox, records_path: Path, bar: _Progress,
                 on_record: Callable[[dict], None] | None):
        self.sandbox, self.records_path, self.bar, self.on_record = sandbox, records_path, bar, on_record
        self.lock = threading.Lock()
        self.sandbox_errors: list[str] = []

    def finish(self, rec: dict, program: str) -> None:
        result = self.sandbox.run(program)
        if result.kind == "sandbox_error":  # our failure, not the program's: leave it for a rerun
            with self.lock:
                self.sandbox_errors.append(result.detail)
            return
        rec.update(passed=result.passed, kind=result.kind, detail=result.detail, exec_seconds=result.wall_s)
        with self.lock:
            with open(self.records_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()
        self.bar.finished(result.passed)
        if self.on_record is not None:
            self.on_record(rec)

    def warn_sandbox_errors(self) -> None:
        if self.sandbox_errors:
            print(f"warning: {len(self.sandbox_errors)} test runs failed inside the sandbox itself and were not "
                  f"recorded (rerun the same command to retry them); first error: {self.sandbox_errors[0]}",
                  file=sys.stderr)


def _batch_generator(cfg: EvalConfig, batch: list[tuple[Task, int]]) -> torch.Generator:
    # seeded by the batch's first sample, so a resumed run samples what an uninterrupted one would have
    task, j = batch[0]
    seed = cfg.seed * 1_000_003 + zlib.crc32(f"{task.task_id}/{j}".encode())
    return torch.Generator(device=cfg.device).manual_seed(seed)


def _row_tokens(row: dict) -> int:
    return row.get("tokens", len(row.get("ids", ())))


def _generate_and_score(cfg: EvalConfig, source: _CompletionSource, pending: list[tuple[Task, int]],
                        scorer: _Scorer) -> None:
    """Generate batch by batch; each sample's test runs in a thread pool, overlapping the next batch's generation."""
    futures: list[Future] = []
    attempt = f"{int(time.time())}-{os.getpid()}"
    with ThreadPoolExecutor(max_workers=_sandbox_workers(cfg)) as pool:
        for b0 in range(0, len(pending), cfg.batch_size):
            batch = pending[b0 : b0 + cfg.batch_size]
            gen = _batch_generator(cfg, batch)
            t0 = time.perf_counter()
            rows, batch_forwards = source.generate(batch, gen if cfg.decoding.get("temperature") else None)
            seconds = time.perf_counter() - t0
            scorer.bar.generated(sum(_row_tokens(r) for r in rows), seconds)
            batch_info = {"seconds": seconds, "batch": f"{attempt}/{b0}", "batch_size": len(batch),
                          "batch_forwards": batch_forwards}
            for rec, program in _batch_records(cfg, source, batch, rows, batch_info):
                futures.append(pool.submit(scorer.finish, rec, program))
        for fut in futures:
            fut.result()
    scorer.bar.close()


def _batch_records(cfg: EvalConfig, source: _CompletionSource, batch: list[tuple[Task, int]], rows: list[dict],
                   batch_info: dict) -> Iterator[tuple[dict, str]]:
    """Each sample's record, short of its test result, with the test program to run; yielded one by one so each
    test starts while the rest of the batch is still being extracted."""
    for (task, j), row in zip(batch, rows):
        raw = source.raw_text(row)
        code = task.completion_code(raw, cfg.prompt_style)
        rec = {
            "task_id": task.task_id, "sample": j, "prompt": source.prompt_of[task.task_id],
            "raw_output": raw, "code": code, "tokens": _row_tokens(row), "forwards": row["forwards"],
            **batch_info,
        }
        yield rec, task.program(code, cfg.prompt_style)


def pending_tasks(pending: list[tuple[Task, int]]) -> list[Task]:
    """The distinct tasks of the pending samples, in order."""
    return list({t.task_id: t for t, _ in pending}.values())


def summarize(records: list[dict], cfg: EvalConfig, tasks: list[Task], sandbox: Sandbox | None = None) -> dict:
    wanted = {t.task_id for t in tasks}
    records = [r for r in records if r["task_id"] in wanted]
    by_task: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        by_task[r["task_id"]].append(bool(r["passed"]))
    complete = [(len(v), sum(v)) for v in by_task.values() if len(v) >= cfg.samples]
    batches = {r["batch"]: (r["seconds"], r["batch_forwards"], r["batch_size"]) for r in records}
    tokens = sum(r["tokens"] for r in records)
    gen_seconds = sum(s for s, _, _ in batches.values())
    row_forwards = sum(r["forwards"] for r in records)
    mode = "api" if cfg.api_base else "ar" if cfg.ar else "diffusion"
    summary = {
        "benchmark": cfg.name,
        "model": cfg.model,
        "mode": mode,
        "prompt_style": cfg.prompt_style,
        "tasks": len(by_task),
        "tasks_requested": len(tasks),
        "samples": cfg.samples,
        "pass_at_k": {f"pass@{k}": mean_pass_at_k(complete, k) for k in ks_for(cfg.samples)},
        "passed": sum(r["passed"] for r in records),
        "kinds": dict(sorted(Counter(r["kind"] for r in records).items())),
        "generated_tokens": tokens,
        "generation_seconds": gen_seconds,
        "tokens_per_second": tokens / gen_seconds if gen_seconds else 0.0,
        "tokens_per_forward": tokens / row_forwards if row_forwards else 0.0,
        "forwards": row_forwards,
        "batch_forwards": sum(f for _, f, _ in batches.values()),
        "batch_size": cfg.batch_size,
        "device": _device_name(cfg.device),
        "dtype": cfg.dtype,
        "torch_threads": torch.get_num_threads(),
        "decoding": {"mode": mode, **cfg.decoding},
    }
    if cfg.api_base:
        summary["api_base"] = cfg.api_base  # forwards are the server's business: tokens per forward reads 0
    if cfg.limit is not None or cfg.spread is not None:
        summary["selection"] = {"limit": cfg.limit, "spread": cfg.spread}
    if sandbox is not None:
        summary["sandbox"] = sandbox.describe()
    return summary


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"{device} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def format_summary(s: dict) -> str:
    rows = [("benchmark", f"{s['benchmark']} ({s['prompt_style']} prompts)"), ("model", s["model"]),
            ("decoding", ", ".join(f"{k}={v}" for k, v in s["decoding"].items())),
            ("tasks", f"{s['tasks']} of {s['tasks_requested']} x {s['samples']} samples")]
    rows += [(k, f"{v:.4f}") for k, v in s["pass_at_k"].items()]
    rows += [
        ("outcomes", ", ".join(f"{k} {v}" for k, v in s["kinds"].items())),
        ("generated tokens", str(s["generated_tokens"])),
        ("tokens/s (excl. prompt)", f"{s['tokens_per_second']:.2f}"),
        ("tokens per forward", f"{s['tokens_per_forward']:.3f}"),
        ("forwards (per row, total)", str(s["forwards"])),
        ("batch size", str(s["batch_size"])),
        ("device", f"{s['device']}, {s['dtype']}, {s['torch_threads']} torch threads"),
    ]
    if "sandbox" in s:
        rows.append(("sandbox", "; ".join(s["sandbox"]["isolation"]) or "process + rlimits only"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
