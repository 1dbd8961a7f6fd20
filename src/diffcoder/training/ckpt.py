"""Training checkpoints: `OUT/checkpoints/step_NNNNNNN/` = a docs/design.md §4 model directory (or a LoRA adapter
directory) plus `trainer_state.pt` (optimizer, step, RNG and data position), published atomically.

Write protocol (a kill at any moment leaves the last good checkpoint intact):
1. everything goes into a hidden `.step_N.partial-PID` directory, files fsynced;
2. one `os.replace` renames it to `step_N` (a new name, so nothing old is ever replaced in place);
3. `latest` (a one-line pointer file) is rewritten by temp file + rename.
On resume the newest complete `step_N` (the pointer, else a scan) wins; partial directories are deleted.
Each checkpoint carries a manifest (size and sha256 of every file, written before the rename); resume checks it
and, when a file was damaged afterwards, names the file and the previous checkpoint to fall back to.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import diffcoder.manifest as manifest
from diffcoder.errors import CheckpointError

STATE_FILE = "trainer_state.pt"
STEP_RE = re.compile(r"^step_(\d{7})$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())


_FAULT_HITS: dict[str, int] = {}


def _fault_point(name: str) -> None:
    """Fault injection for the kill-during-save test: DIFFCODER_KILL_AT=<name>:<n> SIGKILLs this process the
    n-th time it passes here (a real, uncatchable kill in the middle of a checkpoint write)."""
    spec = os.environ.get("DIFFCODER_KILL_AT", "")
    if not spec.startswith(name + ":"):
        return
    _FAULT_HITS[name] = _FAULT_HITS.get(name, 0) + 1
    if _FAULT_HITS[name] == int(spec.split(":")[1]):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def write_checkpoint(root: Path, step: int, write_model: Callable[[Path], None], state: dict[str, Any],
                     keep: int, is_writer: bool = True, barrier: Callable[[], None] | None = None) -> Path:
    """Publish step_N atomically. write_model(dir) writes the model files into dir (every rank may write there,
    e.g. a distributed checkpoint); rank 0 (is_writer) writes the trainer state and does the renames."""
    ckpts = root / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    final = ckpts / f"step_{step:07d}"
    partial = ckpts / f".step_{step:07d}.partial"
    if is_writer:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    if barrier:
        barrier()
    write_model(partial)
    if is_writer:
        torch.save(state, partial / STATE_FILE)
        manifest.write_manifest(partial)  # over everything: model files, trainer state, dcp shards
        _fault_point("save-before-rename")
        _fsync_tree(partial)
    if barrier:
        barrier()
    if is_writer:
        if final.exists():  # a re-run of the same step after a resume: the old one is as good, replace it
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(ckpts)
        _fault_point("save-after-rename")
        tmp = ckpts / "latest.tmp"
        tmp.write_text(final.name + "\n")
        os.replace(tmp, ckpts / "latest")
        _fsync_dir(ckpts)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if barrier:
        barrier()
    return final


def list_checkpoints(root: Path) -> list[Path]:
    ckpts = root / "checkpoints"
    if not ckpts.is_dir():
        return []
    return sorted(p for p in ckpts.iterdir() if STEP_RE.match(p.name) and (p / STATE_FILE).is_file())


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint; leftovers of an interrupted write are removed."""
    ckpts = root / "checkpoints"
    if not ckpts.is_dir():
        return None
    for p in ckpts.iterdir():
        if p.name.startswith(".step_") or p.name == "latest.tmp":
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    found = list_checkpoints(root)
    pointer = ckpts / "latest"
    if pointer.is_file():
        named = ckpts / pointer.read_text().strip()
        if named in found and named == found[-1]:
            return named
    return found[-1] if found else None


def fallback_advice(ckpt: Path) -> str:
    """What to do about a damaged checkpoint: resume from the one before it (named), or start over."""
    earlier = [p for p in list_checkpoints(ckpt.parent.parent) if p.name < ckpt.name]
    aside = ckpt.parent / f"damaged-{ckpt.name}"
    if earlier:
        return (f"resume from the previous checkpoint {earlier[-1].name} instead: move this one aside "
                f"(`mv {ckpt} {aside}`) and rerun with --resume")
    return (f"there is no earlier checkpoint to fall back to: move it aside (`mv {ckpt} {aside}`) and rerun "
            "without --resume to start over, or use a new train.out_dir")


def verify_checkpoint(ckpt: Path) -> bool:
    """Check a training checkpoint against its manifest; False when it has none (written before manifests)."""
    return manifest.verify(ckpt, fallback_advice(ckpt))


def load_state(ckpt: Path) -> dict[str, Any]:
    try:
        return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as exc:  # a checkpoint that was published is complete; this means outside damage
        raise CheckpointError(f"{ckpt / STATE_FILE} is unreadable ({exc}); {fallback_advice(ckpt)}") from exc


def export_model_files(ckpt: Path, dest: Path) -> None:
    """Copy a checkpoint's model files (not the trainer state or distributed shards) with their manifest."""
    shutil.copytree(ckpt, dest, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(STATE_FILE, "dcp", manifest.MANIFEST))
    m = manifest.read_manifest(ckpt)
    if m is not None:
        m["files"] = {k: v for k, v in m["files"].items() if (dest / k).is_file()}
        manifest.write_manifest(dest, m)


# Config fields that fix the shape or meaning of the weights: a resumed checkpoint must match the run's model.
MODEL_IDENTITY_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                         "num_key_value_heads", "head_dim", "tie_word_embeddings", "attention_bias", "mask_token_id",
                         "block_size", "shift")


def check_same_model(ckpt: Path, cfg) -> None:
    """The checkpoint's config.json must parse and describe the run's model (catches damage without a manifest)."""
    from diffcoder.checkpoint import read_config

    try:
        d = read_config(ckpt)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} — {fallback_advice(ckpt)}") from exc
    diff = [f"{k}={d.get(k)!r} (the run's model: {getattr(cfg, k)!r})" for k in MODEL_IDENTITY_FIELDS
            if k in d and d[k] != getattr(cfg, k)]
    if diff:
        raise CheckpointError(f"{ckpt}/config.json does not describe this run's model: {'; '.join(diff[:3])}; it "
                              f"was damaged or edited; {fallback_advice(ckpt)}")


@torch.no_grad()
def check_finite(model, opt, ckpt: Path) -> None:
    """Every weight and optimizer moment of a resumed checkpoint must be finite."""
    tensors = [(n, p) for n, p in model.named_parameters()]
    for i, st in enumerate(opt.state.values()):
        tensors += [(f"optimizer state {i}.{k}", v) for k, v in st.items() if torch.is_tensor(v) and v.ndim]
    for name, t in tensors:
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{ckpt} holds non-finite values (NaN or inf) in {name}; the checkpoint is "
                                  f"damaged; {fallback_advice(ckpt)}")


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def write_hf_dir(model, dest: Path, tokenizer=None, diffusion_trained: bool = True,
                 generation_config: dict[str, Any] | None = None) -> None:
    """The docs/design.md §4 files of `model` written into an existing directory, keeping the start point's
    decoding defaults (`generation_config`, from `load_start_model`). A diffusion-trained model decodes by default
    with the block size and shift it was trained for (a converted AR start point defaulted to exact AR)."""
    from diffcoder.checkpoint import save_checkpoint

    defaults = dict(generation_config or {})
    if diffusion_trained:
        model.config.extra["diffusion_trained"] = True
        defaults.update(block_length=model.config.block_size, shift=model.config.shift)
    tmp = dest / ".hf"
    save_checkpoint(model, tmp, tokenizer=tokenizer, generation_defaults=defaults)
    for f in tmp.iterdir():
        os.replace(f, dest / f.name)
    tmp.rmdir()


def load_model_weights(model, ckpt: Path) -> None:
    from diffcoder.checkpoint import read_weights, weight_files

    state = read_weights(weight_files(ckpt))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (model.config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
                              "; it was written by another run")
