"""What a sandboxed run may leave on the host: nothing. `HostState` snapshots the host and says what a run
left behind: sandbox processes, mounts, program cgroups, shared memory. (A module of its own, not conftest.py:
other test folders have a conftest of that name too.)"""

from __future__ import annotations

import os
import time

from diffcoder.evaluation import _cgroup

BOOTSTRAP_MARKER = b"import marshal, os, sys, types"  # the first line of the sandboxed runner's bootstrap


def sandbox_processes() -> list[int]:
    """Processes of our sandboxes (the bootstrap interpreter and bwrap), whatever their uid."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if BOOTSTRAP_MARKER in cmdline or cmdline.split(b"\0")[0].endswith(b"/bwrap"):
            found.append(int(pid))
    return found


def processes_of(uid: int) -> list[int]:
    """Live processes of `uid`. Zombies do not count: they are dead and hold nothing but a PID until their new
    parent reaps them, and the init of some hosts (a Firecracker VM's, for one) reaps orphans only now and then."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == uid:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    if f.read().rpartition(b")")[2].split()[0] != b"Z":
                        found.append(int(pid))
        except (OSError, IndexError):
            pass
    return found


def mount_points() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {line.split()[4] for line in f}


def program_cgroups() -> set[str]:
    found = set()
    for parent in _cgroup.own_dirs().values():
        try:
            found |= {os.path.join(parent, d) for d in os.listdir(parent) if d.startswith("diffcoder-")}
        except OSError:
            pass
    return found


def shmem_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) / 1024
    return 0.0


class HostState:
    def __init__(self):
        self.mounts, self.cgroups, self.shmem = mount_points(), program_cgroups(), shmem_mb()

    def leftovers(self, settle_s: float = 1.0) -> dict:
        """What appeared since the snapshot and is still there (after `settle_s` for the kernel to finish)."""
        deadline = time.monotonic() + settle_s
        while True:
            left = {"processes": sandbox_processes(), "mounts": sorted(mount_points() - self.mounts),
                    "cgroups": sorted(program_cgroups() - self.cgroups)}
            if shmem_mb() - self.shmem > 256:  # a program's tmpfs or memfd still held (others' noise is small)
                left["shmem_mb"] = round(shmem_mb() - self.shmem)
            left = {k: v for k, v in left.items() if v}
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.05)
