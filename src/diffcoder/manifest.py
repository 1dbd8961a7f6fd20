"""Checkpoint manifests: the size and sha256 of every file of a checkpoint directory, written when it is saved
and checked when it is loaded or resumed, so a file damaged or edited afterwards is named instead of trusted.

`manifest.json` = {"format": "diffcoder-manifest-v1", "files": {"relative/path": {"size": n, "sha256": hex}}}.
Files added to the directory later (a README, notes) are not checked; files listed and missing are damage.
A directory without a manifest (older checkpoints, official releases) is not checked at all.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from diffcoder.errors import CheckpointError

MANIFEST = "manifest.json"
FORMAT = "diffcoder-manifest-v1"


def sha256_of(path: Path) -> str:
    """sha256 of a file, hashed from a memory map in one call: the GIL is released for the whole file, so the
    hash runs beside a load that holds the GIL (safetensors) instead of waiting for it between chunks."""
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            return hashlib.sha256(b"").hexdigest()
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return hashlib.sha256(mm).hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def _hash_all(paths: list[Path]) -> list[str]:
    """sha256 of each file; several files hash in parallel (hashlib releases the GIL on large buffers)."""
    workers = min(len(paths), os.cpu_count() or 1, 8)
    if workers <= 1:
        return [sha256_of(p) for p in paths]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(sha256_of, paths))


def build_manifest(directory: Path) -> dict[str, Any]:
    directory = Path(directory)
    paths = _files(directory)
    digests = _hash_all(paths)
    files = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": d}
             for p, d in zip(paths, digests)}
    return {"format": FORMAT, "files": files}


def write_manifest(directory: Path, manifest: dict[str, Any] | None = None) -> Path:
    """Hash every file of `directory` (or take the given manifest) and write manifest.json by temp + rename."""
    directory = Path(directory)
    manifest = manifest if manifest is not None else build_manifest(directory)
    tmp = directory / (MANIFEST + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(json.dumps(manifest, indent=1, sort_keys=True))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, directory / MANIFEST)
    return directory / MANIFEST


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of `directory`, or None when it has none."""
    f = Path(directory) / MANIFEST
    if not f.is_file():
        return None
    try:
        m = json.loads(f.read_text())
        files = m["files"]
        if m.get("format") != FORMAT or not all({"size", "sha256"} <= set(v) for v in files.values()):
            raise ValueError(f"not a {FORMAT} manifest")
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{f} is damaged ({exc}), so the checkpoint cannot be checked; restore it from a "
                              "copy or re-save the checkpoint") from exc
    return m


def find_damage(directory: Path, manifest: dict[str, Any] | None = None) -> list[str]:
    """One line per listed file that is missing, of another size, or of other content; [] when all match (or
    there is no manifest). Sizes are checked first: a truncated file costs no hashing."""
    directory = Path(directory)
    manifest = manifest if manifest is not None else read_manifest(directory)
    if manifest is None:
        return []
    problems, to_hash = [], []
    for name, rec in sorted(manifest["files"].items()):
        p = directory / name
        if not p.is_file():
            problems.append(f"{name} is missing")
        elif p.stat().st_size != rec["size"]:
            problems.append(f"{name} changed after the checkpoint was saved ({p.stat().st_size} bytes now, "
                            f"{rec['size']} then)")
        else:
            to_hash.append((name, p, rec["sha256"]))
    for (name, _, want), got in zip(to_hash, _hash_all([p for _, p, _ in to_hash])):
        if got != want:
            problems.append(f"{name} changed after the checkpoint was saved (same size, but sha256 "
                            f"{got[:12]}… now, {want[:12]}… then)")
    return problems


def damage_error(directory: Path, problems: list[str], advice: str) -> CheckpointError:
    more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:3])})" if len(problems) > 1 else ""
    return CheckpointError(f"{directory} is damaged: {problems[0]}{more}; {advice}")


def verify(directory: Path, advice: str) -> bool:
    """Raise CheckpointError naming the damaged files of `directory` and `advice` (what to do); return whether
    a manifest was checked (False: the directory has none)."""
    manifest = read_manifest(directory)
    if manifest is None:
        return False
    problems = find_damage(directory, manifest)
    if problems:
        raise damage_error(directory, problems, advice)
    return True


__all__ = ["MANIFEST", "build_manifest", "write_manifest", "read_manifest", "find_damage", "damage_error", "verify",
           "sha256_of"]
