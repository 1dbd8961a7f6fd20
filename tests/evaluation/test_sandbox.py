"""The sandbox against hostile programs: each is contained, reported as the right kind, the machine unharmed."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from diffcoder.evaluation.sandbox import Limits, Sandbox

SANDBOX_UID_MIN = 1 << 20  # the launcher's fresh uids are drawn above this


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(Limits(timeout_s=4, memory_mb=1024, nproc=16))


def _has(sandbox: Sandbox, what: str) -> bool:
    return any(what in item for item in sandbox.isolation())


def _processes() -> dict[int, int]:
    """pid -> uid of every process on the machine."""
    out = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                out[int(pid)] = os.stat(f"/proc/{pid}").st_uid
            except OSError:
                pass
    return out


def _sandbox_processes() -> int:
    return sum(1 for uid in _processes().values() if uid >= SANDBOX_UID_MIN)


def test_plain_program_passes_and_failures_are_classified(sandbox):
    assert sandbox.run("print('hello')").kind == "passed"
    assert sandbox.run("print('hello')").stdout_tail.strip() == "hello"
    assert sandbox.run("assert 1 + 1 == 3").kind == "wrong_answer"
    assert sandbox.run("def f(:\n    pass").kind == "syntax_error"
    r = sandbox.run("raise KeyError('k')")
    assert (r.kind, r.passed) == ("runtime_error", False) and "KeyError" in r.detail


def test_infinite_loop_times_out(sandbox):
    t = time.monotonic()
    r = sandbox.run("while True:\n    pass")
    assert r.kind == "timeout" and not r.passed
    assert 3.5 < r.wall_s < 6 and time.monotonic() - t < 15


def test_cpu_time_limit_is_real():
    sb = Sandbox(Limits(timeout_s=20, cpu_s=1))
    r = sb.run("while True:\n    pass")
    assert r.kind == "cpu_limit" and r.wall_s < 19  # before the wall clock (slow on a loaded machine)


def test_huge_allocation_is_refused(sandbox):
    r = sandbox.run("x = bytearray(10 * 1024 ** 3)\nprint(len(x))")
    assert r.kind == "memory_limit" and not r.passed
    r = sandbox.run("x = [1] * (10 * 1024 ** 3 // 8)")
    assert r.kind == "memory_limit"


def test_printing_100mb_hits_the_output_limit(sandbox):
    r = sandbox.run("import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 2 ** 20)\n")
    assert r.kind == "output_limit" and not r.passed


def test_fork_bomb_is_contained_and_cleaned_up():
    nproc = 16
    sb = Sandbox(Limits(timeout_s=3, nproc=nproc))
    if not sb.uid_switch and os.geteuid() == 0:
        pytest.skip("no interpreter an unprivileged uid can run: RLIMIT_NPROC is not enforced for root")
    before = len(_processes())
    peak = {"total": before, "sandboxed": 0}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            procs = _processes()
            peak["total"] = max(peak["total"], len(procs))
            per_uid = Counter(u for u in procs.values() if u >= SANDBOX_UID_MIN)
            peak["sandboxed"] = max([peak["sandboxed"], *per_uid.values()])
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        plain = sb.run("import os\nwhile True:\n    os.fork()\n")
        # A resilient bomb: ignores fork errors and leaves its process group, so only the uid sweep gets it.
        stubborn = sb.run(
            "import os\nif os.fork() == 0:\n    os.setsid()\n    while True:\n        try:\n            os.fork()\n"
            "        except OSError:\n            pass\nwhile True:\n    pass\n"
        )
    finally:
        done.set()
        watcher.join()
    assert plain.kind == "process_limit" and not plain.passed
    assert stubborn.kind == "timeout" and not stubborn.passed
    assert peak["sandboxed"] <= nproc + 1  # the cap held per run (+1: the launcher's sweeper, same uid)
    assert peak["total"] - before < nproc + 40  # the machine's process count stayed bounded (others run too)
    time.sleep(0.2)
    assert _sandbox_processes() == 0  # nothing left behind


def test_escaped_background_process_is_killed(sandbox):
    if not sandbox.uid_switch:
        pytest.skip("leftover sweep needs the fresh-uid mode (root)")
    r = sandbox.run("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n")
    assert r.kind == "passed"
    time.sleep(0.2)
    assert _sandbox_processes() == 0


def test_writing_outside_the_work_directory_fails(sandbox):
    token = secrets.token_hex(6)
    targets = [f"/escape-{token}.txt", f"/tmp/../escape2-{token}.txt", f"/var/tmp/escape-{token}.txt",
               os.path.join(os.path.expanduser("~"), f"escape-{token}.txt")]
    for target in targets:
        try:
            r = sandbox.run(f"open({target!r}, 'w').write('owned')\n")
            assert not r.passed and r.kind in ("permission", "runtime_error"), (target, r.kind, r.detail)
            if _has(sandbox, "mount namespace") or sandbox.uid_switch:
                assert r.kind == "permission", (target, r.detail)
        finally:
            for host in (target, os.path.normpath(target)):
                assert not os.path.exists(host), f"the sandbox wrote {host}"
    # The working directory itself is writable and thrown away afterwards.
    r = sandbox.run(f"open('scratch-{token}.txt', 'w').write('ok')\nprint(open('scratch-{token}.txt').read())")
    assert r.kind == "passed" and r.stdout_tail.strip() == "ok"
    assert not list(Path("/tmp").glob("diffcoder-sbx-*/**/scratch-*"))


def test_deleting_files_in_the_parent_directory_fails(sandbox):
    if not (_has(sandbox, "mount namespace") or sandbox.uid_switch):
        pytest.skip("without a mount namespace or uid switch the user's own files are deletable")
    victim_dir = Path("/var/tmp") / f"diffcoder-victim-{secrets.token_hex(4)}"
    victim_dir.mkdir(mode=0o777)
    os.chmod(victim_dir, 0o777)  # world-writable: only the sandbox stands between it and the program
    victim = victim_dir / "keep.txt"
    victim.write_text("precious")
    os.chmod(victim, 0o666)
    try:
        program = (
            "import os, shutil\n"
            "for name in os.listdir('..'):\n"
            "    p = os.path.join('..', name)\n"
            "    shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)\n"
            f"os.remove({str(victim)!r})\n"
        )
        r = sandbox.run(program)
        assert not r.passed and r.kind == "permission", r.detail
        assert victim.read_text() == "precious"
    finally:
        victim.unlink(missing_ok=True)
        victim_dir.rmdir()


def test_network_connections_fail(sandbox):
    if not _has(sandbox, "network namespace"):
        pytest.skip("no network namespace on this machine (needs root or unprivileged user namespaces)")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        r = sandbox.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')\n")
        assert not r.passed and r.kind == "network", r.detail
        with pytest.raises(socket.timeout):
            server.accept()  # nothing got through to the host's loopback
        r = sandbox.run("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\n")
        assert r.kind == "network"
        r = sandbox.run("import socket\nsocket.getaddrinfo('pypi.org', 443)\n")
        assert r.kind == "network"
    finally:
        server.close()


def test_environment_has_no_inherited_secrets(sandbox, monkeypatch):
    monkeypatch.setenv("DIFFCODER_TEST_SECRET", "hunter2")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter3")
    r = sandbox.run(
        "import os\n"
        "assert 'DIFFCODER_TEST_SECRET' not in os.environ and 'AWS_SECRET_ACCESS_KEY' not in os.environ\n"
        "assert 'hunter' not in repr(dict(os.environ))\n"
        "print(sorted(os.environ))\n"
    )
    assert r.kind == "passed", r.detail


def test_run_many_is_parallel_and_ordered():
    sb = Sandbox(Limits(timeout_s=5))
    programs = [f"import time\ntime.sleep(0.6)\nassert {i} % 2 == 0" for i in range(4)]
    t = time.monotonic()
    results = sb.run_many(programs, workers=4)
    elapsed = time.monotonic() - t
    assert [r.passed for r in results] == [True, False, True, False]
    assert elapsed < 4 * 0.6 + 0.5  # ran concurrently, not one after another


def test_killing_every_process_it_can_reach_harms_nothing_outside(sandbox):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        r = sandbox.run("import os, signal\nos.kill(-1, signal.SIGKILL)\nprint('still here')\n")
        assert r.kind in ("passed", "crashed", "runtime_error")
        time.sleep(0.1)
        assert bystander.poll() is None  # the machine's other processes are untouched
    finally:
        bystander.kill()
        bystander.wait()
