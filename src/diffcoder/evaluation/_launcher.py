"""Sandbox launcher: run one program in the sandbox and its test in the trusted checker, then report.

Runs in its own interpreter (`python -I -S`, importing this module), stdlib only and single-threaded: forking
from the (multi-threaded, torch-loaded) evaluation process would be unsafe. `serve()` runs the jobs named on
its stdin one after another, so an evaluation pays this interpreter's start-up once per worker, not per
program. Three processes take part in a job:

- the program: a sandboxed interpreter running `_runner` (bubblewrap, or the plain-process fallback), in its
  own cgroup, under rlimits and, as root, a fresh unprivileged uid;
- the checker (`_checker`), a fork of this launcher outside the sandbox: it runs the trusted test code against
  the program and writes the verdict to a pipe that only it and this launcher hold;
- this launcher: it enforces the wall-clock deadline, kills the program by its PID namespace (then its
  cgroup), removes the cgroup and reports.

JOB_DIR/job.marshal is the job and JOB_DIR/runtime.bin the runner's code; the program's stdout and stderr go to
JOB_DIR/stdout and JOB_DIR/stderr (files, so RLIMIT_FSIZE caps them). JOB_DIR is ours alone and never visible
inside the sandbox. Reports are marshalled dicts. (No `json` here: its import is a fifth of our start-up.)
"""

import marshal
import os
import resource
import select
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import _cgroup  # noqa: E402 - a sibling module (python -I leaves this folder off sys.path)

# Imported by the functions that use them (`signal`, `_checker`), after the program has been started: the
# sandbox's set-up then overlaps our own start-up.

# What the sandboxed interpreter runs: read _wire and _runner (sources, or code objects when its bytecode is
# ours) from the request pipe, then serve.
BOOTSTRAP = """import marshal, os, sys, types
r, w = int(sys.argv[1]), int(sys.argv[2])
def read(n):
    b = b''
    while len(b) < n:
        c = os.read(r, n - len(b))
        if not c:
            raise SystemExit(3)
        b += c
    return b
sources = marshal.loads(read(int.from_bytes(read(4), 'big')))
for name in ('_wire', '_runner'):
    m = sys.modules[name] = types.ModuleType(name)
    exec(sources[name], m.__dict__)
sys.modules['_runner'].serve(r, w)
"""
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


class Started:
    """A running program: its top process (bwrap or the interpreter) and what we need to talk to and kill it."""

    def __init__(self, pid: int, start: float, req_w: int, resp_r: int, status_r: int | None, workdir: str | None):
        self.pid, self.start, self.req_w, self.resp_r = pid, start, req_w, resp_r
        self.status_r, self.workdir = status_r, workdir
        self.init_pidfd: int | None = None  # the PID namespace's init (bwrap): killing it kills them all
        self.status: int | None = None
        self.usage = None
        self.ended_itself = False

    def close(self) -> None:
        """Release what this run holds (the launcher serves many runs: nothing may leak into the next)."""
        for fd in (self.status_r, self.init_pidfd):
            if fd is not None:
                os.close(fd)
        self.status_r = self.init_pidfd = None
        if self.workdir:
            import shutil

            shutil.rmtree(self.workdir, ignore_errors=True)


def _rlimits(lim: dict, uid_switched: bool) -> dict[int, tuple[int, int]]:
    nproc = int(lim["nproc"]) + 2  # + bwrap's monitor and the namespace's init
    if not uid_switched and os.geteuid() != 0:  # RLIMIT_NPROC counts all of this user's processes
        nproc += len(_processes_of(os.getuid()))
    cpu = int(lim["cpu_s"])
    return {resource.RLIMIT_AS: (int(lim["memory_mb"]) << 20,) * 2,
            resource.RLIMIT_CPU: (cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL a second later
            resource.RLIMIT_FSIZE: (int(lim["file_size_mb"]) << 20,) * 2,
            resource.RLIMIT_NPROC: (nproc, nproc),
            resource.RLIMIT_NOFILE: (int(lim["nofile"]),) * 2,
            resource.RLIMIT_CORE: (0, 0)}


def _processes_of(uid: int) -> list[int]:
    """Live processes (zombies aside: they are gone, only not yet reaped) owned by `uid`."""
    found = []
    for p in os.listdir("/proc"):
        try:
            if p.isdigit() and os.stat(f"/proc/{p}").st_uid == uid:
                with open(f"/proc/{p}/stat", "rb") as f:
                    if f.read().rpartition(b")")[2].split()[0] != b"Z":
                        found.append(int(p))
        except (OSError, IndexError):
            pass
    return found


def _program_argv(job: dict, req_r: int, resp_w: int, status_w: int | None) -> list[str]:
    interpreter = [job["python"], "-I", "-S", "-B", "-W", "ignore", "-c", BOOTSTRAP, str(req_r), str(resp_w)]
    if job["mode"] != "bwrap":
        return interpreter
    return [*job["bwrap"], "--json-status-fd", str(status_w), "--", *interpreter]


def _exec_program(job: dict, argv: list[str], cgroup, stdio: list[int], keep: list[int], workdir: str) -> None:
    """In the forked child: join the cgroup, take the limits, drop to the fresh uid, exec. Never returns."""
    try:
        os.setsid()
        if cgroup is not None:
            cgroup.join()
        uid = job["uid"]
        for which, value in _rlimits(job["limits"], uid is not None).items():
            resource.setrlimit(which, value)
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        os.chdir(workdir)
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)
        for fd in keep:
            os.set_inheritable(fd, True)
        os.execve(argv[0], argv, {**ENV, "HOME": workdir, "TMPDIR": workdir})
    except BaseException as exc:  # noqa: BLE001 - reported through the program's stderr file
        os.write(stdio[2], f"launcher: could not start the sandbox: {exc!r}\n".encode())
    os._exit(127)


def start_program(job: dict, job_dir: str, cgroup) -> Started:
    req_r, req_w = os.pipe()
    resp_r, resp_w = os.pipe()
    status_r, status_w = os.pipe() if job["mode"] == "bwrap" else (None, None)
    workdir = None
    if job["mode"] != "bwrap":  # the fallback needs a host directory the program may write
        import tempfile

        workdir = tempfile.mkdtemp(prefix="diffcoder-work-")
        if job["uid"] is not None:
            os.chown(workdir, job["uid"], job["uid"])
    stdio = [os.open(os.devnull, os.O_RDONLY)] + [
        os.open(os.path.join(job_dir, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        for name in ("stdout", "stderr")]
    keep = [fd for fd in (req_r, resp_w, status_w) if fd is not None]
    argv = _program_argv(job, req_r, resp_w, status_w)
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _exec_program(job, argv, cgroup, stdio, keep, workdir or "/")
    for fd in stdio + keep:
        os.close(fd)
    return Started(pid, start, req_w, resp_r, status_r, workdir)


def namespace_init(status_r: int, parent: int, deadline: float) -> int | None:
    """A pidfd of the sandbox's PID 1, from bwrap's first status line `{ "child-pid": N, ... }`, checked to be
    the child of bwrap's monitor `parent` (so not a reused pid); None if bwrap failed to set up."""
    data = b""
    while b"\n" not in data and time.monotonic() < deadline:
        if select.select([status_r], [], [], max(0.0, deadline - time.monotonic()))[0]:
            chunk = os.read(status_r, 4096)
            if not chunk:
                return None
            data += chunk
    _, found, rest = data.partition(b'"child-pid":')
    digits = rest.lstrip().split(b",")[0].split(b"}")[0].strip()
    if not (found and digits.isdigit()):
        return None
    import signal

    try:
        pidfd = os.pidfd_open(int(digits))
    except OSError:
        return None
    try:
        with open(f"/proc/{int(digits)}/stat", "rb") as f:
            ppid = int(f.read().rpartition(b")")[2].split()[1])
        signal.pidfd_send_signal(pidfd, 0)  # still alive after the check: the /proc entry was this process
        if ppid == parent:
            return pidfd
    except (OSError, ValueError, IndexError):
        pass
    os.close(pidfd)
    return None


def _read_until_eof(fd: int, deadline: float) -> tuple[bytes, bool]:
    """(data, timed_out)"""
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return data, True
        chunk = os.read(fd, 65536)
        if not chunk:
            return data, False
        data += chunk


def fork_checker(job: dict, job_dir: str, started: Started) -> tuple[int, int]:
    """Start the checker on the program's channel: (its pid, the read end of its verdict pipe)."""
    import _checker

    with open(os.path.join(job_dir, "runtime.bin"), "rb") as f:
        runtime = f.read()
    verdict_r, verdict_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(verdict_r)
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 1)  # the launcher's stdout is the report channel: the test's prints must not reach it
            os.dup2(null, 2)
            vm = int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmSize")))
            memory = (vm << 10) + (int(job["limits"]["memory_mb"]) << 20)
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
            _checker.main(job, started.resp_r, started.req_w, verdict_w, runtime)
        finally:
            os._exit(0)
    for fd in (verdict_w, started.req_w, started.resp_r):  # the checker holds the program's channel alone
        os.close(fd)
    return pid, verdict_r


def await_verdict(pid: int, verdict_r: int, deadline: float) -> tuple[dict | None, bool]:
    """The checker's verdict by the deadline (killing it if it is late): (verdict or None, timed_out)."""
    import signal

    data, timed_out = _read_until_eof(verdict_r, deadline)
    os.close(verdict_r)
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    try:
        return (marshal.loads(data) if data else None), timed_out
    except (ValueError, EOFError, TypeError):
        return None, timed_out


def _wait(started: Started, deadline: float) -> bool:
    """Reap the program's top process by `deadline`; True once it has been."""
    while started.status is None:
        pid, status, usage = os.wait4(started.pid, os.WNOHANG)
        if pid:
            started.status, started.usage = status, usage
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.002)
    return True


def _kill_uid(uid: int) -> None:
    """Fallback sweep: kill(-1) from the program's uid reaches every process it owns, wherever it went."""
    import signal

    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def kill_program(job: dict, started: Started, cgroup) -> None:
    """Everything the program started: by its PID namespace (bwrap's monitor then reaps the namespace's init and
    exits, leaving no orphan), then by its cgroup, its uid (fallback) or its process group (last resort)."""
    import signal

    if started.init_pidfd is not None:
        try:
            signal.pidfd_send_signal(started.init_pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if _wait(started, time.monotonic() + 5.0):
            if cgroup is not None:
                cgroup.kill()  # nothing should be left: a namespace dies with its init
            return
    if cgroup is not None:
        cgroup.kill()
    elif job["mode"] != "bwrap":
        if job["uid"] is not None:
            _kill_uid(job["uid"])
        try:
            os.killpg(started.pid, signal.SIGKILL)
        except OSError:
            pass


def stop_program(job: dict, started: Started, cgroup, grace_s: float) -> None:
    """Let the program end on its own for `grace_s`, then kill everything it started and reap it."""
    import signal

    started.ended_itself = _wait(started, time.monotonic() + grace_s)
    kill_program(job, started, cgroup)
    if not _wait(started, time.monotonic() + 5.0):
        os.kill(started.pid, signal.SIGKILL)  # bwrap's monitor itself, outside the namespace
        _wait(started, time.monotonic() + 5.0)


def _exit_facts(job: dict, started: Started) -> dict:
    status = started.status
    code = os.WEXITSTATUS(status) if status is not None and os.WIFEXITED(status) else None
    sig = os.WTERMSIG(status) if status is not None and os.WIFSIGNALED(status) else None
    if job["mode"] == "bwrap" and code is not None and code > 128:  # bwrap exits 128+N for a signal N
        code, sig = None, code - 128
    usage = started.usage
    return {"exit_code": code, "signal": sig, "ended_itself": started.ended_itself,
            "cpu_s": usage.ru_utime + usage.ru_stime if usage else 0.0,
            "max_rss_kb": usage.ru_maxrss if usage else 0}


def run(job: dict, job_dir: str) -> dict:
    cg = job.get("cgroup")
    cgroup = None
    if cg:
        cgroup = _cgroup.Cgroup.create(cg["parents"], cg["name"], int(job["limits"]["memory_mb"]) << 20,
                                       int(job["limits"]["nproc"]) + 2)
    started, report = None, {}
    try:
        started = start_program(job, job_dir, cgroup)
        checker, verdict_r = fork_checker(job, job_dir, started)  # it starts talking while bwrap sets up
        deadline = started.start + float(job["limits"]["timeout_s"])
        if started.status_r is not None:
            started.init_pidfd = namespace_init(started.status_r, started.pid, deadline)
        verdict, timed_out = await_verdict(checker, verdict_r, deadline)
        wall = time.monotonic() - started.start
        status = (verdict or {}).get("status")
        stop_program(job, started, cgroup, 1.0 if status == "gone" and not timed_out else 0.0)
        report = {"verdict": verdict, "timed_out": timed_out, "wall_s": wall, **_exit_facts(job, started),
                  "oom_kills": cgroup.oom_kills() if cgroup else 0,
                  **({"cpu_s": cgroup.cpu_seconds()} if cgroup and cgroup.cpu_seconds() is not None else {}),
                  "memory_peak": cgroup.memory_peak() if cgroup else None,
                  "cgroup": cgroup.limits() if cgroup else [], "uid": job["uid"], "mode": job["mode"]}
    finally:
        if started is not None and started.status is None:  # we failed midway: the program must not stay
            stop_program(job, started, cgroup, 0.0)
        report["leftover"] = cgroup.remove() if cgroup is not None else 0
        if job["mode"] != "bwrap" and job["uid"] is not None:
            report["leftover"] += len(_processes_of(job["uid"]))
        if started is not None:
            started.close()
    return report


def job_report(job_dir: str) -> dict:
    try:
        with open(os.path.join(job_dir, "job.marshal"), "rb") as f:
            job = marshal.load(f)
        return run(job, job_dir)
    except Exception:  # noqa: BLE001 - our own failure: the harness records it as sandbox_error
        import traceback

        return {"error": traceback.format_exc()[-2000:]}


def serve() -> None:
    """Run the jobs named on stdin (a folder per line) until EOF; each report goes to stdout as a marshalled
    dict after its 4-byte length."""
    for line in sys.stdin.buffer:
        data = marshal.dumps(job_report(line.decode().strip()))
        sys.stdout.buffer.write(len(data).to_bytes(4, "big") + data)
        sys.stdout.flush()
