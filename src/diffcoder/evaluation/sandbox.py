"""Run untrusted generated code against trusted tests, and say how it went (docs/design.md §6.3).

A `Program` is the program's code (untrusted: it may be hostile) and the test that judges it (trusted: the
benchmark's). Each run goes through `_launcher.py` in its own process:

- the program runs inside bubblewrap (new user, PID, mount, network, IPC, UTS and cgroup namespaces; no nested
  user namespaces; a fresh /proc; the standard library and a size-capped tmpfs as its only files) in its own
  cgroup (one memory limit over all its processes, tmpfs and shared memory included, and a process limit),
  under rlimits (CPU, address space, file size, open files) and, as root, a fresh unprivileged uid;
- the test runs in a trusted checker process outside the sandbox, which calls into the program and receives
  its answers as plain values (`_wire`). The verdict is the checker's: the program's exit status, output and
  claims count for nothing, and the test code and expected values never enter the program's process or files.

Where bubblewrap or cgroups are missing, a weaker fallback runs and `Sandbox.isolation()` (and the run's
summary) says what was in force. Not a guarantee against kernel exploits or side channels: see
docs/evaluation.md for what is and is not contained.
"""

from __future__ import annotations

import ast
import builtins
import functools
import marshal
import math
import os
import queue
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from diffcoder.errors import ConfigError, DiffcoderError
from diffcoder.evaluation import _cgroup, containment

LAUNCHER = Path(__file__).with_name("_launcher.py")
RUNTIME = ("_wire", "_runner")  # what the sandboxed interpreter is sent to run

# How a run ended. "passed" is the only success; "sandbox_error" is our machinery's failure, never the program's.
KINDS = ("passed", "wrong_answer", "syntax_error", "runtime_error", "timeout", "cpu_limit", "memory_limit",
         "output_limit", "process_limit", "permission", "network", "early_exit", "stderr_output", "crashed",
         "sandbox_error")
UID_BASE = 1 << 20  # fresh uids are drawn from [UID_BASE, UID_BASE + 2**30)


class SandboxUnavailable(DiffcoderError):
    """No way to run programs here at all (not even the fallback)."""


@dataclass(frozen=True)
class Program:
    """The program's `code` (untrusted) and the trusted `test` that judges it. `context` is trusted code run
    before the test (e.g. the prompt's helper functions); the names the test uses that neither defines
    (builtins aside), and always `entry_point`, are taken from the program."""

    code: str
    test: str = ""
    context: str = ""
    entry_point: str = ""

    def names(self) -> tuple[str, ...]:
        return names_from_program(self.test, self.context, self.entry_point)


def _loaded_and_bound(source: str) -> tuple[set[str], set[str]]:
    loaded, bound = set(), set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.alias) and node.name != "*":
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return loaded, bound


@functools.lru_cache(maxsize=4096)
def names_from_program(test: str, context: str, entry_point: str) -> tuple[str, ...]:
    """What the test takes from the program. Builtins stay the checker's own (a program redefining `abs` or
    `isinstance` changes nothing in the test), unless the entry point itself has a builtin's name."""
    try:
        loaded, bound = _loaded_and_bound(test)
        bound |= _loaded_and_bound(context)[1]
    except SyntaxError:  # the checker reports a test that does not compile
        loaded, bound = set(), set()
    need = loaded - bound - set(dir(builtins))
    return tuple(sorted(need | ({entry_point} if entry_point else set())))


@dataclass
class Limits:
    timeout_s: float = 10.0  # wall clock, from start to verdict
    memory_mb: int = 1024  # per process (RLIMIT_AS) and, with a cgroup, over all processes, tmpfs included
    cpu_s: int | None = None  # RLIMIT_CPU; default: the timeout rounded up, plus 1
    file_size_mb: int = 16  # RLIMIT_FSIZE (stdout and stderr included) and the largest answer to the checker
    nproc: int = 32  # processes (cgroup pids.max and RLIMIT_NPROC of the fresh uid)
    nofile: int = 128  # RLIMIT_NOFILE
    tmpfs_mb: int = 64  # size of the private /tmp and of /dev/shm

    def resolved(self) -> dict:
        d = asdict(self)
        d["cpu_s"] = self.cpu_s if self.cpu_s is not None else math.ceil(self.timeout_s) + 1
        return d


@dataclass
class ExecResult:
    passed: bool
    kind: str  # one of KINDS
    detail: str  # the failing test line, the program's error, or what limit hit
    exit_code: int | None = None
    signal: int | None = None
    wall_s: float = 0.0
    cpu_s: float = 0.0
    stdout_tail: str = ""
    stderr_tail: str = ""
    isolation: list[str] = field(default_factory=list)
    uid: int | None = None  # the program's uid on the host (fresh per run as root)
    leftover: int = 0  # processes that could not be removed afterwards (0 unless containment failed)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _ended_early(report: dict, stderr: str, cpu_limit: float) -> tuple[str, str]:
    """The kind of a program whose process ended (or closed its channel) before the test finished."""
    sig, code = report.get("signal"), report.get("exit_code")
    said = f"; its stderr ends: {_last_line(stderr)}" if stderr.strip() else ""
    if sig == signal.SIGXCPU or report.get("cpu_s", 0.0) >= cpu_limit - 0.1:
        return "cpu_limit", f"CPU time limit ({cpu_limit:g} s){said}"
    if sig == signal.SIGXFSZ:
        return "output_limit", f"file size limit{said}"
    if sig is not None:
        return "crashed", f"killed by signal {sig} ({signal.Signals(sig).name}){said}"
    if code is not None and report.get("ended_itself"):
        return "early_exit", f"the program exited with status {code} before the test finished{said}"
    return "early_exit", f"the program closed its channel before the test finished{said}"


def classify(report: dict, stderr: str, cpu_limit: float) -> tuple[str, str]:
    """(kind, detail) from the launcher's report. Only the checker's verdict can say "passed"."""
    if "error" in report:
        return "sandbox_error", f"launcher failed: {_last_line(report['error'])}"
    verdict = report.get("verdict") or {}
    status = verdict.get("status")
    if status in ("setup_failed", "test_error", "internal"):
        return "sandbox_error", verdict.get("detail", "")
    if report.get("timed_out"):
        if report.get("cpu_s", 0.0) >= cpu_limit - 0.1:
            return "cpu_limit", f"CPU time limit ({cpu_limit:g} s)"
        return "timeout", "wall-clock timeout"
    if status is None:
        return "sandbox_error", "the checker ended without a verdict"
    if report.get("oom_kills"):
        return "memory_limit", "the kernel killed a process at the cgroup's memory limit"
    if status == "passed":
        if stderr.strip():
            return "stderr_output", f"the program wrote to stderr: {_last_line(stderr)}"
        return "passed", ""
    if status == "failed" and verdict.get("kind") in KINDS and verdict["kind"] not in ("passed", "sandbox_error"):
        return verdict["kind"], str(verdict.get("detail", ""))
    if status == "gone":
        return _ended_early(report, stderr, cpu_limit)
    return "sandbox_error", f"unknown verdict {str(verdict)[:200]}"


@functools.lru_cache(maxsize=2)
def runtime_blob(precompiled: bool) -> bytes:
    """The runner's modules, marshalled: code objects when the sandboxed interpreter shares our bytecode
    (it then skips compiling them, a few ms of every run), else sources."""
    out = {}
    for name in RUNTIME:
        source = LAUNCHER.with_name(f"{name}.py").read_text(encoding="utf-8")
        out[name] = compile(source, f"{name}.py", "exec", dont_inherit=True) if precompiled else source
    return marshal.dumps(out)


def _tail(path: Path, n: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


class _Launcher:
    """A launcher interpreter (`_launcher.serve`) that runs jobs one after another: its start-up (a third of
    a run's cost) is paid once per worker, not once per program."""

    def __init__(self):
        boot = f"import sys; sys.path.insert(0, {str(LAUNCHER.parent)!r}); import _launcher; _launcher.serve()"
        self.proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", boot], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
                                     env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})

    def run(self, job_dir: Path, timeout_s: float) -> object:
        self.proc.stdin.write(f"{job_dir}\n".encode())
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout_s
        size = int.from_bytes(self._read(4, deadline), "big")
        return marshal.loads(self._read(size, deadline))

    def _read(self, n: int, deadline: float) -> bytes:
        fd, data = self.proc.stdout.fileno(), b""
        while len(data) < n:
            if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError("the launcher did not answer in time")
            chunk = os.read(fd, n - len(data))
            if not chunk:
                raise EOFError(f"the launcher ended (exit {self.proc.poll()})")
            data += chunk
        return data

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the launcher and its checker
        except OSError:
            pass
        self.proc.wait()

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # the launcher ends at EOF
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.kill()


def _close_launchers(launchers: list[_Launcher]) -> None:
    while launchers:
        launchers.pop().close()


class Sandbox:
    """Runs programs under `limits`. Thread-safe: `run_many` runs them in parallel processes."""

    def __init__(self, limits: Limits | None = None, isolate: bool = True):
        self.limits = limits or Limits()
        lim = self.limits
        if lim.timeout_s <= 0 or lim.memory_mb < 64 or lim.nproc < 1 or lim.tmpfs_mb < 1 or lim.file_size_mb < 1:
            raise ConfigError("sandbox limits must be positive (timeout_s > 0, memory_mb >= 64, nproc >= 1, "
                              "tmpfs_mb >= 1, file_size_mb >= 1)")
        self.isolate = isolate
        self._containment: containment.Containment | None = None
        self._isolation: list[str] | None = None
        self._probe_lock = threading.Lock()
        self._prober: int | None = None  # the thread probing, whose runs use the setting on trial
        self._launchers: list[_Launcher] = []  # every launcher process of this sandbox
        self._idle: queue.SimpleQueue[_Launcher] = queue.SimpleQueue()  # those waiting for a job
        weakref.finalize(self, _close_launchers, self._launchers)

    @property
    def containment(self) -> containment.Containment:
        """What this machine offers, confirmed by running an empty program: what fails to start here (bubblewrap,
        the cgroups) makes way for the next weaker setting, with the reason in the notes."""
        if self._prober == threading.get_ident():  # the probe's own runs
            return self._containment  # type: ignore[return-value]
        with self._probe_lock:
            if self._isolation is None:
                self._prober = threading.get_ident()
                try:
                    self._isolation = self._probe().isolation
                finally:
                    self._prober = None
        return self._containment  # type: ignore[return-value]

    def _probe(self) -> ExecResult:
        c = found = containment.find(self.limits.tmpfs_mb, self.isolate)
        for without in ([], ["cgroup"], ["bwrap"], ["bwrap", "cgroup"]):
            if ("bwrap" not in without or found.mode == "bwrap") and ("cgroup" not in without or found.cgroup_parents):
                c = replace(found, notes=list(found.notes))
                if "bwrap" in without:
                    c.mode, c.bwrap = "process", []
                if "cgroup" in without:
                    c.cgroup_parents = {}
                self._containment = c
                probe = self.run(Program("pass"))
                if probe.kind != "sandbox_error":
                    break
                found.notes.append(f"with {c.mode} and {'cgroups' if c.cgroup_parents else 'no cgroup'} the sandbox "
                                   f"failed here ({probe.detail[:200]})")
        if probe.kind != "passed":
            raise SandboxUnavailable(f"cannot run programs in the sandbox here: {probe.kind}: {probe.detail}")
        c.notes = found.notes
        return probe

    @property
    def uid_switch(self) -> bool:
        return self.containment.uid_switch

    def isolation(self) -> list[str]:
        """What isolation is in force here (probed once by running an empty program)."""
        self.containment  # noqa: B018 - probes
        return list(self._isolation or [])

    def describe(self) -> dict:
        c = self.containment
        return {"isolation": self.isolation(), "mode": c.mode, "limits": self.limits.resolved(), "python": c.python,
                "note": "contains hostile programs as far as listed; not a defence against kernel exploits"}

    def _job(self, program: Program, cgroup_name: str) -> dict:
        c = self._containment
        assert c is not None
        return {"limits": self.limits.resolved(), "mode": c.mode, "bwrap": c.bwrap, "python": c.python,
                "uid": secrets.randbelow(1 << 30) + UID_BASE if c.uid_switch else None,
                "cgroup": {"parents": c.cgroup_parents, "name": cgroup_name} if c.cgroup_parents else None,
                "code": program.code, "test": program.test, "context": program.context,
                "entry_point": program.entry_point, "names": list(program.names())}

    def run(self, program: Program | str) -> ExecResult:
        """Run one program (a bare string: code with no test, passing if it loads cleanly)."""
        if isinstance(program, str):
            program = Program(program)
        c = self.containment
        job_dir = Path(tempfile.mkdtemp(prefix="diffcoder-sbx-"))  # 0700, ours alone
        cgroup_name = f"diffcoder-{secrets.token_hex(6)}"
        try:
            job = self._job(program, cgroup_name)
            (job_dir / "job.marshal").write_bytes(marshal.dumps(job))
            (job_dir / "runtime.bin").write_bytes(runtime_blob(c.same_bytecode))
            report = self._launch(job_dir)
            stderr = _tail(job_dir / "stderr")
            kind, detail = classify(report, stderr, float(job["limits"]["cpu_s"]))
            return ExecResult(
                passed=kind == "passed", kind=kind, detail=detail[:500], exit_code=report.get("exit_code"),
                signal=report.get("signal"), wall_s=report.get("wall_s", 0.0), cpu_s=report.get("cpu_s", 0.0),
                stdout_tail=_tail(job_dir / "stdout", 1000), stderr_tail=stderr[-1000:],
                isolation=containment.describe(c, report, job["limits"]), uid=job["uid"],
                leftover=int(report.get("leftover", 0)))
        finally:
            if c.cgroup_parents:  # normally gone already; left only if the launcher itself was killed
                _cgroup.Cgroup({k: os.path.join(p, cgroup_name) for k, p in c.cgroup_parents.items()
                                if os.path.isdir(os.path.join(p, cgroup_name))}).remove()
            shutil.rmtree(job_dir, ignore_errors=True)

    def _launch(self, job_dir: Path) -> dict:
        """The launcher's report on one job, from an idle launcher of the pool (or a new one)."""
        try:
            launcher = self._idle.get_nowait()
        except queue.Empty:
            launcher = _Launcher()
            self._launchers.append(launcher)
        try:
            report = launcher.run(job_dir, self.limits.timeout_s + 30)
        except (OSError, EOFError, TimeoutError, ValueError, TypeError) as exc:
            launcher.kill()  # with its checker; the program dies with them (bwrap --die-with-parent)
            self._launchers.remove(launcher)
            return {"error": f"the launcher failed: {type(exc).__name__}: {exc}"}
        self._idle.put(launcher)
        return report if type(report) is dict else {"error": "the launcher's report is not a dict"}

    def close(self) -> None:
        """End the launcher processes (also done when the Sandbox is garbage-collected or at exit)."""
        _close_launchers(self._launchers)

    def run_many(self, programs: Sequence[Program | str], workers: int | None = None,
                 on_result: Callable[[int, ExecResult], None] | None = None) -> list[ExecResult]:
        """Run programs in parallel (default: one per CPU core); results in input order."""
        self.containment  # noqa: B018 - probe once, before the threads start
        workers = workers or os.cpu_count() or 1
        results: list[ExecResult | None] = [None] * len(programs)

        def one(i: int) -> None:
            results[i] = self.run(programs[i])
            if on_result is not None:
                on_result(i, results[i])

        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(one, range(len(programs))))
        return results  # type: ignore[return-value]
