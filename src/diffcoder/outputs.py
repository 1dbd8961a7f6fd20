"""Where commands write: a command never replaces or writes into data it did not create unless told `--force`.

A target folder is fine when it does not exist, is empty, or is one the same command made before (a run it may
resume: the caller says how to recognise one). A target file is fine when it does not exist or the same command
wrote it (a plot it redraws). Anything else is a `TargetExistsError` naming the target and the flag.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from diffcoder.errors import TargetExistsError

PNG_SOFTWARE = "diffcoder"  # the PNG text chunk our plots carry, so a redraw may replace them


def _listing(path: Path, limit: int = 3) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    more = f", … ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_output_dir(path: str | Path, force: bool, action: str = "write into it",
                     ours: Callable[[Path], bool] | None = None, flag: str = "--force") -> Path:
    """Refuse a non-empty folder (or a file) at `path` unless `force`, or `ours(path)` says this command made it.

    `action` says what the command would do to it ("replace it", "write into it"), for the message."""
    path = Path(path)
    if not path.exists():
        return path
    if not path.is_dir():
        raise TargetExistsError(f"{path} is a file, not a folder; choose a folder path for the output")
    if force or not any(path.iterdir()) or (ours is not None and ours(path)):
        return path
    raise TargetExistsError(f"{path} is not empty (it holds {_listing(path)}) and this command would {action}; "
                            f"choose a new or empty folder, or pass {flag} to {action} anyway")


def check_output_file(path: str | Path, force: bool, ours: Callable[[Path], bool] | None = None,
                      flag: str = "--force") -> Path:
    """Refuse to overwrite an existing file unless `force` or `ours(path)` (this command wrote it)."""
    path = Path(path)
    if path.is_dir():
        raise TargetExistsError(f"{path} is a folder; give a file path for the output")
    if not path.exists() or force or (ours is not None and ours(path)):
        return path
    raise TargetExistsError(f"{path} already exists and this command did not write it; choose another file, or "
                            f"pass {flag} to overwrite it")


def png_metadata() -> dict[str, str]:
    """Metadata for `savefig` that marks a PNG as ours (see `is_our_png`)."""
    return {"Software": PNG_SOFTWARE}


def is_our_png(path: Path) -> bool:
    """Whether a PNG was written by one of our plots (its tEXt chunk Software=diffcoder)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError:
        return False
    return head.startswith(b"\x89PNG") and b"Software\x00" + PNG_SOFTWARE.encode() in head


__all__ = ["check_output_dir", "check_output_file", "png_metadata", "is_our_png"]
