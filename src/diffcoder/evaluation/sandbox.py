"""Run untrusted generated code in a separate, limited process (DESIGN §6).

Each program runs through `_launcher.py` in its own process with: a wall-clock timeout, RLIMIT_CPU,
RLIMIT_AS (memory), RLIMIT_FSIZE (files and captured output), RLIMIT_NPROC (processes), RLIMIT_NOFILE, no
core dumps, a clean environment, and a fresh working directory that disappears afterwards. Where the OS
allows (root, or unprivileged user namespaces) it also gets a private network namespace (no network at
all), a private mount namespace in which every filesystem is read-only except a small fresh tmpfs on /tmp,
and (as root) a fresh unprivileged uid so that RLIMIT_NPROC is enforced and every leftover process can be
killed. `Sandbox.isolation()` says which of these were in force. This contains buggy and careless code; it
is not a security boundary against a determined attacker (kernel bugs, side channels, resource use of the
kernel itself).
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from diffcoder.errors import ConfigError

LAUNCHER = Path(__file__).with_name("_launcher.py")

# How a run ended. "passed" is the only success.
KINDS = ("passed", "wrong_answer", "syntax_error", "runtime_error", "timeout", "cpu_limit", "memory_limit",
         "output_limit", "process_limit", "permission", "network", "crashed", "sandbox_error")


@dataclass
class Limits:
    timeout_s: float = 10.0  # wall clock
    memory_mb: int = 1024  # address space (RLIMIT_AS)
    cpu_s: int | None = None  # RLIMIT_CPU; default: the timeout rounded up, plus 1
    file_size_mb: int = 16  # RLIMIT_FSIZE: any file written, stdout and stderr included
    nproc: int = 32  # RLIMIT_NPROC for the sandbox uid
    nofile: int = 128  # RLIMIT_NOFILE
    tmpfs_mb: int = 64  # size of the private /tmp (when a mount namespace is available)

    def resolved(self) -> dict:
        d = asdict(self)
        d["cpu_s"] = self.cpu_s if self.cpu_s is not None else math.ceil(self.timeout_s) + 1
        return d


@dataclass
class ExecResult:
    passed: bool
    kind: str  # one of KINDS
    detail: str  # the last line of the error, or what limit hit
    exit_code: int | None = None
    signal: int | None = None
    wall_s: float = 0.0
    cpu_s: float = 0.0
    stdout_tail: str = ""
    stderr_tail: str = ""
    isolation: list[str] = field(default_factory=list)


def _world_executable(path: str) -> bool:
    """True if an unprivileged uid can execute `path` (every directory on the way searchable by others)."""
    real = os.path.realpath(path)
    if not os.path.isfile(real) or not os.stat(real).st_mode & stat.S_IXOTH:
        return False
    d = os.path.dirname(real)
    while True:
        if not os.stat(d).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(d)
        if parent == d:
            return True
        d = parent


def sandbox_python() -> str:
    """The interpreter for sandboxed programs: ours if an unprivileged uid can run it, else a system one."""
    if os.geteuid() != 0:
        return sys.executable
    for cand in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if cand and _world_executable(cand):
            return cand
    return sys.executable  # no uid switch is possible then (see Sandbox.uid_switch)


_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning|error))\b(.*)$")


def _last_error(stderr: str) -> tuple[str, str]:
    for line in reversed(stderr.strip().splitlines()):
        m = _ERROR_LINE.match(line.strip())
        if m:
            return m.group(1), line.strip()
    return "", (stderr.strip().splitlines() or [""])[-1]


def classify(report: dict, stderr: str, cpu_limit: float | None = None) -> tuple[str, str]:
    """Map how the program ended (launcher report + stderr) to (kind, detail)."""
    import signal as sig

    if report.get("timed_out"):
        return "timeout", "wall-clock timeout"
    s = report.get("signal")
    if s == sig.SIGXCPU or (s == sig.SIGKILL and cpu_limit and report.get("cpu_s", 0) >= cpu_limit - 0.05):
        return "cpu_limit", "CPU time limit"
    if s == sig.SIGXFSZ:
        return "output_limit", "file size limit"
    if report.get("exit_code") == 0:
        return "passed", ""
    exc, line = _last_error(stderr)
    name = exc.rsplit(".", 1)[-1]
    low = line.lower()
    if stderr.startswith("sandbox setup failed"):
        return "sandbox_error", line
    if name in ("SyntaxError", "IndentationError", "TabError"):
        return "syntax_error", line
    if name == "AssertionError":
        return "wrong_answer", line
    if name == "MemoryError" or "cannot allocate memory" in low:
        return "memory_limit", line
    if "file too large" in low or "errno 27" in low:
        return "output_limit", line
    if name == "BlockingIOError" or "resource temporarily unavailable" in low:
        return "process_limit", line
    if ("network is unreachable" in low or "name resolution" in low or name in ("gaierror", "ConnectionRefusedError")
            or "name or service not known" in low):
        return "network", line
    if name == "PermissionError" or "read-only file system" in low or "permission denied" in low:
        return "permission", line
    if s is not None:
        # SIGKILL/SIGSEGV/SIGABRT with no Python error: usually an allocation the address-space limit refused
        return "crashed", f"killed by signal {s}"
    if exc:
        return "runtime_error", line
    return "runtime_error", line or f"exit code {report.get('exit_code')}"


def _tail(path: Path, n: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


class Sandbox:
    """Runs programs under `limits`. Thread-safe: `run_many` runs them in parallel processes."""

    def __init__(self, limits: Limits | None = None, isolate: bool = True, python: str | None = None):
        self.limits = limits or Limits()
        if self.limits.timeout_s <= 0 or self.limits.memory_mb < 64 or self.limits.nproc < 1:
            raise ConfigError("sandbox limits must be positive (timeout_s > 0, memory_mb >= 64, nproc >= 1)")
        self.isolate = isolate
        self.python = python or sandbox_python()
        self.uid_switch = os.geteuid() == 0 and _world_executable(self.python)
        self._isolation: list[str] | None = None

    def isolation(self) -> list[str]:
        """What isolation is in force here (probed once by running an empty program)."""
        if self._isolation is None:
            self._isolation = self.run("pass").isolation
        return self._isolation

    def describe(self) -> dict:
        return {"isolation": self.isolation(), "limits": self.limits.resolved(), "python": self.python,
                "note": "contains careless code; not a security boundary against a determined attacker"}

    def run(self, program: str) -> ExecResult:
        job = Path(tempfile.mkdtemp(prefix="diffcoder-sbx-"))  # 0700, owned by us
        try:
            (job / "prog.py").write_text(program, encoding="utf-8")
            uid = secrets.randbelow(1 << 30) + (1 << 20) if self.uid_switch else None  # fresh, unused uid
            spec = {"limits": self.limits.resolved(), "uid": uid, "python": self.python, "isolate": self.isolate}
            (job / "job.json").write_text(json.dumps(spec))
            try:
                proc = subprocess.run(
                    [sys.executable, "-I", "-S", str(LAUNCHER), str(job)],
                    capture_output=True, text=True, timeout=self.limits.timeout_s + 30, start_new_session=True,
                    env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                )
            except subprocess.TimeoutExpired:
                return ExecResult(False, "sandbox_error", "the launcher did not return")
            try:
                report = json.loads(proc.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                return ExecResult(False, "sandbox_error", f"launcher failed: {proc.stderr.strip()[-500:]}")
            stderr = _tail(job / "stderr")
            kind, detail = classify(report, stderr, self.limits.resolved()["cpu_s"])
            return ExecResult(
                passed=kind == "passed", kind=kind, detail=detail[:500], exit_code=report["exit_code"],
                signal=report["signal"], wall_s=report["wall_s"], cpu_s=report["cpu_s"],
                stdout_tail=_tail(job / "stdout", 1000), stderr_tail=stderr[-1000:], isolation=report["isolation"],
            )
        finally:
            shutil.rmtree(job, ignore_errors=True)

    def run_many(self, programs: Sequence[str], workers: int | None = None,
                 on_result: Callable[[int, ExecResult], None] | None = None) -> list[ExecResult]:
        """Run programs in parallel (default: one per CPU core); results in input order."""
        workers = workers or os.cpu_count() or 1
        results: list[ExecResult | None] = [None] * len(programs)

        def one(i: int) -> None:
            results[i] = self.run(programs[i])
            if on_result is not None:
                on_result(i, results[i])

        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(one, range(len(programs))))
        return results  # type: ignore[return-value]
