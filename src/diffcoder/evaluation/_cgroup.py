"""Per-program cgroups: one memory limit over all of a program's processes (tmpfs, shared memory and kernel
memory included), a process-count limit, and a way to kill whatever is left. Stdlib only (used by the
launcher); cgroup v1 (memory, pids controllers) and v2 (its `cgroup.kill`, memory and pids where delegated).

A program's cgroups are created as children of this process's own cgroups, named by the caller, and removed
once empty. Which of them are usable is found by `usable_parents` (root, or a delegated subtree).
"""

import os
import time

CONTROLLERS = ("memory", "pids", "cpuacct")  # v1 controllers we use (cpuacct: CPU time of the whole group)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, value: object) -> None:
    with open(path, "w") as f:
        f.write(str(value))


def own_dirs() -> dict[str, str]:
    """This process's cgroup directories: {"memory": ..., "pids": ...} (v1) and {"v2": ...}."""
    mounts: dict[str, str] = {}
    for line in _read("/proc/self/mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        fstype, _source, options = (right.split() + ["", "", ""])[:3]
        point = left.split()[4]
        if fstype == "cgroup2":
            mounts.setdefault("v2", point)
        elif fstype == "cgroup":
            for c in CONTROLLERS:
                if c in options.split(","):
                    mounts.setdefault(c, point)
    dirs = {}
    for line in _read("/proc/self/cgroup").splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        keys = ["v2"] if hierarchy == "0" else [c for c in controllers.split(",") if c in CONTROLLERS]
        for key in keys:
            if key in mounts and os.path.isdir(mounts[key] + path):
                dirs[key] = os.path.normpath(mounts[key] + path)
    return dirs


def usable_parents(probe_name: str) -> dict[str, str]:
    """Own cgroup directories under which a child can be made (tried by making and removing one)."""
    usable = {}
    for key, parent in own_dirs().items():
        probe = os.path.join(parent, probe_name)
        try:
            os.mkdir(probe)
            os.rmdir(probe)
            usable[key] = parent
        except OSError:
            continue
    return usable


class Cgroup:
    """A program's cgroup in each usable hierarchy."""

    def __init__(self, dirs: dict[str, str]):
        self.dirs = dirs

    @classmethod
    def create(cls, parents: dict[str, str], name: str, memory_bytes: int, pids: int) -> "Cgroup":
        group = cls({})
        try:
            for key, parent in parents.items():
                path = os.path.join(parent, name)
                os.mkdir(path)
                group.dirs[key] = path
            group._limit(memory_bytes, pids)
        except OSError:
            group.remove()
            raise
        return group

    def _v2_has(self, controller: str) -> bool:
        d = self.dirs.get("v2")
        return d is not None and controller in _read(os.path.join(d, "cgroup.controllers")).split()

    def _limit(self, memory_bytes: int, pids: int) -> None:
        if "memory" in self.dirs:
            _write(os.path.join(self.dirs["memory"], "memory.limit_in_bytes"), memory_bytes)
            memsw = os.path.join(self.dirs["memory"], "memory.memsw.limit_in_bytes")
            if os.path.exists(memsw):  # no swapping out to get around the limit
                _write(memsw, memory_bytes)
        if "pids" in self.dirs:
            _write(os.path.join(self.dirs["pids"], "pids.max"), pids)
        if self._v2_has("memory"):
            _write(os.path.join(self.dirs["v2"], "memory.max"), memory_bytes)
            _write(os.path.join(self.dirs["v2"], "memory.swap.max"), 0)
        if self._v2_has("pids"):
            _write(os.path.join(self.dirs["v2"], "pids.max"), pids)

    def limits(self) -> list[str]:
        """Which limits this group enforces: 'memory', 'pids' (and 'kill' for v2's cgroup.kill)."""
        out = [c for c in ("memory", "pids") if c in self.dirs or self._v2_has(c)]
        if "v2" in self.dirs and os.path.exists(os.path.join(self.dirs["v2"], "cgroup.kill")):
            out.append("kill")
        return out

    def join(self) -> None:
        """Move the calling process in (before it drops privileges and execs)."""
        for d in self.dirs.values():
            _write(os.path.join(d, "cgroup.procs"), os.getpid())

    def pids(self) -> set[int]:
        found: set[int] = set()
        for d in self.dirs.values():
            try:
                found.update(int(p) for p in _read(os.path.join(d, "cgroup.procs")).split())
            except OSError:
                pass
        return found

    def kill(self) -> None:
        """SIGKILL every process in the group (at once with v2's cgroup.kill; else each listed one)."""
        import signal  # here, not at the top: the launcher starts the program before paying for it

        kill_file = os.path.join(self.dirs.get("v2", "/nonexistent"), "cgroup.kill")
        if os.path.exists(kill_file):
            _write(kill_file, 1)
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def oom_kills(self) -> int:
        """Processes the kernel killed for exceeding the memory limit."""
        files = [os.path.join(self.dirs[k], f) for k, f in (("memory", "memory.oom_control"),
                                                             ("v2", "memory.events")) if k in self.dirs]
        total = 0
        for path in files:
            try:
                for line in _read(path).splitlines():
                    key, _, value = line.partition(" ")
                    total += int(value) if key == "oom_kill" else 0
            except OSError:
                pass
        return total

    def cpu_seconds(self) -> float | None:
        """CPU time used by all of the group's processes, reaped or not (rusage misses what bwrap's init reaps)."""
        try:
            if "v2" in self.dirs:
                for line in _read(os.path.join(self.dirs["v2"], "cpu.stat")).splitlines():
                    if line.startswith("usage_usec "):
                        return int(line.split()[1]) / 1e6
            if "cpuacct" in self.dirs:
                return int(_read(os.path.join(self.dirs["cpuacct"], "cpuacct.usage"))) / 1e9
        except (OSError, ValueError):
            pass
        return None

    def memory_peak(self) -> int | None:
        for key, name in (("memory", "memory.max_usage_in_bytes"), ("v2", "memory.peak")):
            try:
                return int(_read(os.path.join(self.dirs[key], name)))
            except (KeyError, OSError, ValueError):
                continue
        return None

    def remove(self, wait_s: float = 5.0) -> int:
        """Kill what is left, remove the directories; returns how many processes could not be removed."""
        deadline = time.monotonic() + wait_s
        while self.pids() and time.monotonic() < deadline:
            self.kill()
            time.sleep(0.01)
        left = len(self.pids())
        for key, d in list(self.dirs.items()):
            for _ in range(50):
                try:
                    os.rmdir(d)
                    del self.dirs[key]
                    break
                except FileNotFoundError:
                    del self.dirs[key]
                    break
                except OSError:  # busy for a moment after its last process exits
                    time.sleep(0.01)
        return left
