"""Sandbox launcher: run one untrusted Python program under OS limits, then report how it ended.

Run as a separate script (`python -I -S _launcher.py JOB_DIR`), stdlib only, so that it starts
single-threaded: namespaces, mounts, rlimits and the uid switch are all set up here rather than in a
`preexec_fn` of the (multi-threaded, torch-loaded) evaluation process, where fork+Python is unsafe.

JOB_DIR/job.json holds the settings; JOB_DIR/prog.py is the program. The program's stdout/stderr go to
JOB_DIR/stdout, JOB_DIR/stderr (files, so RLIMIT_FSIZE caps them). One JSON status line goes to our stdout.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys
import time

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_CHILD_SUBREAPER = 36
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.unshare.argtypes = [ctypes.c_int]


def _unshare(flags: int) -> bool:
    return _libc.unshare(flags) == 0


def _mount(src, target, fstype, flags, data=None) -> bool:
    def enc(s):
        return s.encode() if isinstance(s, str) else s

    return _libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) == 0


def _mount_points() -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4]
            # mountinfo escapes space, tab, newline and backslash as octal
            points.append(mp.encode().decode("unicode_escape").encode("latin-1").decode())
    return sorted(set(points), key=len)


def _private_filesystem(tmpfs_mb: int, uid: int | None) -> str | None:
    """In a fresh mount namespace: every mount read-only, a new small tmpfs on /tmp with the work dir.

    Returns the work directory, or None when any step failed (the caller then uses a host directory)."""
    if not _mount(None, "/", None, MS_REC | MS_PRIVATE):
        return None
    points = _mount_points()  # before our tmpfs goes on /tmp, so it is not made read-only below
    if not _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmpfs_mb}m,mode=0755"):
        return None
    for mp in points:
        if mp.startswith(("/proc", "/sys")) or mp == "/tmp":
            continue
        _mount(None, mp, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID)  # best effort per mount
    work = "/tmp/work"
    os.mkdir(work, 0o700)
    if uid is not None:
        os.chown(work, uid, uid)
    return work


def _writable(path: str) -> bool:
    probe = os.path.join(path, ".diffcoder-ro-probe")
    try:
        with open(probe, "w"):
            pass
        os.unlink(probe)
        return True
    except OSError:
        return False


def _count_user_processes(uid: int) -> int:
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    n += 1
            except OSError:
                pass
    return n


def _kill_all_of(uid: int) -> None:
    """Kill every process owned by `uid` (escaped daemons, fork-bomb leftovers): kill(-1) from that uid."""
    for _ in range(3):
        pid = os.fork()
        if pid == 0:
            try:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                os.kill(-1, signal.SIGKILL)
            except OSError:
                pass
            os._exit(0)
        os.waitpid(pid, 0)
        if _count_user_processes(uid) == 0:
            return
        time.sleep(0.01)


def _reap_all(deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                time.sleep(0.002)
        except ChildProcessError:
            return


def main() -> None:
    job_dir = sys.argv[1]
    with open(os.path.join(job_dir, "job.json")) as f:
        job = json.load(f)
    with open(os.path.join(job_dir, "prog.py"), "rb") as f:
        program = f.read()
    out_fd = os.open(os.path.join(job_dir, "stdout"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    err_fd = os.open(os.path.join(job_dir, "stderr"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    lim = job["limits"]
    uid = job.get("uid")
    root = os.geteuid() == 0
    if not root:
        uid = None
    isolation: list[str] = []
    work = None
    pid_ns = False

    if job.get("isolate", True):
        if root and _unshare(CLONE_NEWNET):
            isolation.append("network namespace (no network)")
        elif not root:
            # Unprivileged: a user namespace lets us create the network and mount namespaces ourselves.
            real_uid, real_gid = os.getuid(), os.getgid()
            if _unshare(CLONE_NEWUSER | CLONE_NEWNET):
                for name, text in (("uid_map", f"{real_uid} {real_uid} 1"), ("setgroups", "deny"),
                                   ("gid_map", f"{real_gid} {real_gid} 1")):
                    try:
                        with open(f"/proc/self/{name}", "w") as f:
                            f.write(text)
                    except OSError:
                        pass
                isolation.append("network namespace (no network, via user namespace)")
        if _unshare(CLONE_NEWIPC):
            isolation.append("IPC namespace")
        # The program becomes PID 1 of a new PID namespace: when it ends, the kernel kills whatever it left.
        pid_ns = _unshare(CLONE_NEWPID)
        if pid_ns:
            isolation.append("PID namespace (leftover processes die with the program)")
        if _unshare(CLONE_NEWNS):
            work = _private_filesystem(int(lim["tmpfs_mb"]), uid)
            if work is not None:
                ro = "read-only filesystem" if not _writable("/") else "filesystem left writable"
                isolation.append(f"mount namespace ({ro}, fresh {lim['tmpfs_mb']} MiB tmpfs /tmp)")
    if work is None:
        work = os.path.join(job_dir, "work")
        os.mkdir(work, 0o700)
        if uid is not None:
            os.chown(work, uid, uid)
    with open(os.path.join(work, "prog.py"), "wb") as f:
        f.write(program)
    if uid is not None:
        os.chown(os.path.join(work, "prog.py"), uid, uid)
        isolation.append("a fresh unprivileged uid per program (process limit enforced)")

    if root and uid is None:
        isolation.append("WARNING: root without a uid switch: the process-count limit is not enforced")
    nproc = int(lim["nproc"])
    if uid is None:  # RLIMIT_NPROC counts all of this user's processes: allow ours plus the budget
        nproc += _count_user_processes(os.getuid())
    limits = {
        resource.RLIMIT_AS: int(lim["memory_mb"]) << 20,
        resource.RLIMIT_CPU: int(lim["cpu_s"]),
        resource.RLIMIT_FSIZE: int(lim["file_size_mb"]) << 20,
        resource.RLIMIT_NPROC: nproc,
        resource.RLIMIT_NOFILE: int(lim["nofile"]),
        resource.RLIMIT_CORE: 0,
    }
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}
    python = job["python"]
    # Orphans of the program (fork bombs, daemons) are re-parented to us, so we reap them all below.
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            os.setpgid(0, 0)
            os.chdir(work)
            os.dup2(null_fd, 0)
            os.dup2(out_fd, 1)
            os.dup2(err_fd, 2)
            for fd in (out_fd, err_fd, null_fd):
                os.close(fd)
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            for which, value in limits.items():
                # CPU: SIGXCPU at the soft limit (reported as such), SIGKILL a second later at the hard one
                hard = value + 1 if which == resource.RLIMIT_CPU else value
                resource.setrlimit(which, (value, hard))
            os.execve(python, [python, "-I", "-B", "prog.py"], env)
        except BaseException as exc:  # noqa: BLE001 - report any setup failure through stderr
            os.write(2, f"sandbox setup failed: {exc!r}\n".encode())
        os._exit(127)

    deadline = start + float(lim["timeout_s"])
    timed_out = False
    while True:
        wpid, status, usage = os.wait4(pid, os.WNOHANG)
        if wpid:
            break
        if time.monotonic() > deadline:
            timed_out = True
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
            wpid, status, usage = os.wait4(pid, 0)
            break
        time.sleep(0.005)
    wall = time.monotonic() - start
    try:
        os.killpg(pid, signal.SIGKILL)  # children left in the program's process group
    except OSError:
        pass
    if uid is not None and not pid_ns:
        _kill_all_of(uid)  # and any that left the group (setsid); a PID namespace needs no sweep
    _reap_all(time.monotonic() + 2.0)
    report = {
        "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "timed_out": timed_out,
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "max_rss_kb": usage.ru_maxrss,
        "isolation": isolation,
    }
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
