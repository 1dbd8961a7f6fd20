"""What containment this machine offers for untrusted programs, and the words the summary uses for it.

Found once per `Sandbox`: bubblewrap (`bwrap`, Debian package `bubblewrap`) and the mounts it gets, the
interpreter the programs run under (its standard library only: site-packages folders are hidden), the cgroups
we may create, and whether each program can get a fresh unprivileged uid (as root).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field

from diffcoder.evaluation import _cgroup

TOP_LEVEL = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")  # often links into /usr


@dataclass
class Containment:
    mode: str  # "bwrap" (namespaces) or "process" (the fallback: rlimits, uid, cgroup only)
    python: str  # the interpreter programs run under
    uid_switch: bool  # a fresh unprivileged uid per program (needs root and an interpreter it can run)
    same_bytecode: bool = False  # it runs our compiled code objects (same bytecode magic as this interpreter)
    bwrap: list[str] = field(default_factory=list)  # bwrap and its options, up to the command
    cgroup_parents: dict[str, str] = field(default_factory=dict)  # where program cgroups are made
    notes: list[str] = field(default_factory=list)  # why something weaker is in force


def world_executable(path: str) -> bool:
    """True if an unprivileged uid can execute `path` (every directory on the way searchable by others)."""
    real = os.path.realpath(path)
    if not os.path.isfile(real) or not os.stat(real).st_mode & stat.S_IXOTH:
        return False
    d = os.path.dirname(real)
    while True:
        if not os.stat(d).st_mode & stat.S_IXOTH:
            return False
        if os.path.dirname(d) == d:
            return True
        d = os.path.dirname(d)


def choose_python(root: bool) -> tuple[str, bool]:
    """(interpreter, uid switch): our own base interpreter (not the venv: no site-packages), or as root a
    system one when ours is not reachable by an unprivileged uid."""
    own = os.path.realpath(sys.executable)
    base = os.path.join(sys.base_exec_prefix, "bin", f"python{sys.version_info.major}.{sys.version_info.minor}")
    if sys.prefix != sys.base_prefix and os.path.isfile(base):  # a venv (even one with copied binaries)
        own = os.path.realpath(base)
    if not root:
        return own, False
    for cand in (own, "/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(cand) and world_executable(cand):
            return os.path.realpath(cand), True
    return own, False


@functools.lru_cache(maxsize=8)
def interpreter_layout(python: str) -> tuple[list[str], list[str], bool]:
    """(prefixes the interpreter needs, its site-packages folders, whether its bytecode is ours), as the
    interpreter reports them."""
    probe = ("import importlib.util, json, site, sys; print(json.dumps([[sys.base_prefix, sys.base_exec_prefix], "
             "site.getsitepackages() + [site.getusersitepackages()], importlib.util.MAGIC_NUMBER.hex()]))")
    out = subprocess.run([python, "-I", "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    prefixes, sites, magic = json.loads(out.stdout)
    return (sorted({os.path.realpath(p) for p in prefixes}), [s for s in sites if os.path.isdir(s)],
            magic == importlib.util.MAGIC_NUMBER.hex())


def bwrap_argv(bwrap: str, python: str, tmpfs_mb: int) -> list[str]:
    """bubblewrap's options: every namespace new (user, PID, mount, network, IPC, UTS, cgroup), no nested user
    namespaces, no capabilities, a fresh /proc, /usr and the interpreter read-only with site-packages hidden,
    size-capped tmpfs /tmp and /dev/shm, read-only everything else, a clean environment."""
    size = str(tmpfs_mb << 20)
    argv = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
            "--cap-drop", "ALL", "--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
    for top in TOP_LEVEL:
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    prefixes, sites, _ = interpreter_layout(python)
    for p in prefixes:
        if not (p == "/usr" or p.startswith("/usr/")):
            argv += ["--ro-bind", p, p]
    for s in sites:  # the standard library only: no third-party packages, no benchmark data shipped in one
        argv += ["--tmpfs", s, "--remount-ro", s]
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", size, "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
             "--size", size, "--tmpfs", "/tmp", "--remount-ro", "/", "--chdir", "/tmp", "--clearenv"]
    for key, value in (("PATH", "/usr/local/bin:/usr/bin:/bin"), ("HOME", "/tmp"), ("TMPDIR", "/tmp"),
                       ("LANG", "C.UTF-8")):
        argv += ["--setenv", key, value]
    return argv


def find(tmpfs_mb: int, isolate: bool = True) -> Containment:
    """The strongest containment available here (the caller confirms it by running a program)."""
    root = os.geteuid() == 0
    python, uid_switch = choose_python(root)
    c = Containment("process", python, uid_switch, same_bytecode=interpreter_layout(python)[2])
    if root and not uid_switch:
        c.notes.append("no interpreter an unprivileged uid can run: programs keep the launcher's uid")
    c.cgroup_parents = _cgroup.usable_parents(f"diffcoder-probe-{secrets.token_hex(4)}")
    if not c.cgroup_parents:
        c.notes.append("no writable cgroup: memory is limited per process (RLIMIT_AS) only")
    bwrap = shutil.which("bwrap")
    if not isolate:
        c.notes.append("isolation switched off by the caller")
    elif bwrap is None:
        c.notes.append("bubblewrap not found (install the `bubblewrap` package)")
    elif uid_switch and not world_executable(bwrap):
        c.notes.append(f"{bwrap} is not executable by an unprivileged uid")
    else:
        c.mode, c.bwrap = "bwrap", bwrap_argv(bwrap, python, tmpfs_mb)
    return c


def describe(c: Containment, report: dict, limits: dict) -> list[str]:
    """The isolation in force, as the summary lists it, from the containment and a launcher report."""
    out = []
    if c.mode == "bwrap":
        out += ["bubblewrap: new user, PID, mount, network, IPC, UTS and cgroup namespaces; nested user "
                "namespaces disabled; no capabilities",
                "killed by PID namespace: nothing the program started outlives it",
                f"fresh /proc; read-only /usr and interpreter, standard library only (site-packages hidden); no "
                f"host files; {limits['tmpfs_mb']} MiB tmpfs /tmp and /dev/shm; no network"]
    else:
        out.append("FALLBACK without namespaces: the program can read the host's files, reach the network and "
                   "see the host's processes")
    cgroup = report.get("cgroup") or []
    if "memory" in cgroup:
        out.append(f"cgroup memory limit {limits['memory_mb']} MiB over all its processes, tmpfs and shared "
                   "memory included")
    if "pids" in cgroup:
        out.append(f"cgroup process limit {limits['nproc']}")
    if c.uid_switch:
        out.append("a fresh unprivileged uid per program")
    out.append("verdict from a trusted checker outside the sandbox: the test code runs there, on plain values")
    return out + [f"note: {n}" for n in c.notes]
