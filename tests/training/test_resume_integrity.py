"""Resume trusts no damaged checkpoint: the manifest and the config are checked, the bad file and the previous
checkpoint are named, a NaN right after a resume points at the checkpoint. Runs go through `diffcoder train`."""

from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_helpers import base_overrides

from diffcoder.cli import main


def train_cli(*args: str) -> tuple[int, str]:
    """`diffcoder train ...` in this process (cli.main); (exit code, stderr)."""
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        rc = main(["train", *args])
    return rc, err.getvalue()


def recipe(tmp: Path) -> str:
    f = tmp / "recipe.yaml"
    f.write_text("train:\n  log_every: 1\n")
    return str(f)


def overrides(setup, out: Path, steps: int) -> list[str]:
    return base_overrides(setup, out, **{"train.steps": steps, "train.save_every": 4, "train.keep_checkpoints": 5,
                                         "objective.warmup_steps": 0})


@pytest.fixture(scope="module")
def two_checkpoints(tiny_setup, tmp_path_factory):
    """A finished 8-step run with checkpoints at steps 4 and 8 (resumed below with train.steps=12), kept as a
    pristine copy: train.out_dir is part of a run's identity, so each test gets it back at the same path."""
    root = tmp_path_factory.mktemp("resume")
    rc, err = train_cli(recipe(root), *overrides(tiny_setup, root / "run", 8), "--quiet")
    assert rc == 0, err
    shutil.move(root / "run", root / "pristine")
    return root / "pristine"


@pytest.fixture
def run(two_checkpoints):
    out = two_checkpoints.parent / "run"
    shutil.rmtree(out, ignore_errors=True)
    return Path(shutil.copytree(two_checkpoints, out))


def resume(setup, run: Path, steps: int = 12) -> tuple[int, str]:
    return train_cli(recipe(run.parent), *overrides(setup, run, steps), "--resume", "--quiet")


def newest(run: Path) -> Path:
    return run / "checkpoints" / "step_0000008"


def rewrite_config(ckpt: Path, how: str) -> None:
    f = ckpt / "config.json"
    if how == "random bytes":
        f.write_bytes(bytes(range(256)) * 4)
    else:
        cfg = json.loads(f.read_text())
        cfg.update({"hidden_size": 96} if how == "hidden_size" else {"num_hidden_layers": "2"})
        f.write_text(json.dumps(cfg))


@pytest.mark.parametrize("keep_manifest", [True, False])
@pytest.mark.parametrize("how", ["random bytes", "hidden_size", "layers as a string"])
def test_garbage_config_of_the_newest_checkpoint_is_refused(tiny_setup, run, how, keep_manifest):
    ck = newest(run)
    rewrite_config(ck, how)
    if not keep_manifest:  # an older checkpoint: the config checks alone must catch it
        (ck / "manifest.json").unlink()
    rc, err = resume(tiny_setup, run)
    line = err.strip().splitlines()[-1]
    assert rc == 2 and "Traceback" not in err, err
    assert str(ck) in line and "config.json" in line and "step_0000004" in line and "--resume" in line
    if keep_manifest:
        assert "changed after the checkpoint was saved" in line


def test_weights_damaged_in_place_are_refused_and_the_named_fallback_resumes(tiny_setup, run):
    ck = newest(run)
    data = bytearray((ck / "model.safetensors").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 16384] = bytes(16384)
    (ck / "model.safetensors").write_bytes(bytes(data))
    rc, err = resume(tiny_setup, run)
    line = err.strip().splitlines()[-1]
    assert rc == 2 and "model.safetensors changed after the checkpoint was saved" in line
    assert "resume from the previous checkpoint step_0000004" in line
    move = line.split("`mv ")[1].split("`")[0].split()  # do what the message says
    shutil.move(move[0], move[1])
    rc, err = resume(tiny_setup, run)
    assert rc == 0, err
    recs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(12))  # steps 4..7 redone, then on


def test_a_damaged_trainer_state_is_named(tiny_setup, run):
    f = newest(run) / "trainer_state.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    f.write_bytes(bytes(data))
    rc, err = resume(tiny_setup, run)
    line = err.strip().splitlines()[-1]
    assert rc == 2 and "trainer_state.pt changed after the checkpoint was saved" in line and "step_0000004" in line


def poison(ck: Path, value: float) -> None:
    """Set the final norm of a checkpoint to `value` and drop its manifest (damage an old checkpoint can carry)."""
    sd = load_file(str(ck / "model.safetensors"))
    sd["model.norm.weight"] = torch.full_like(sd["model.norm.weight"], value)
    save_file(sd, str(ck / "model.safetensors"), metadata={"format": "pt"})
    (ck / "manifest.json").unlink()


def test_nan_loss_right_after_resume_points_at_the_checkpoint(tiny_setup, run):
    poison(newest(run), 3e38)  # finite, but the first forward overflows
    rc, err = resume(tiny_setup, run)
    line = err.strip().splitlines()[-1]
    assert rc == 2, err
    assert "the first step after resuming from" in line and str(newest(run)) in line
    assert "step_0000004" in line and "lower optim.lr" not in line.split("would not help")[1]


def test_non_finite_weights_in_a_checkpoint_are_refused_before_training(tiny_setup, run):
    poison(newest(run), float("nan"))
    rc, err = resume(tiny_setup, run)
    line = err.strip().splitlines()[-1]
    assert rc == 2 and "non-finite values (NaN or inf) in model.norm.weight" in line and "step_0000004" in line


def test_a_checkpoint_without_manifest_still_resumes(tiny_setup, run):
    for ck in (run / "checkpoints").glob("step_*"):
        (ck / "manifest.json").unlink()
    rc, err = resume(tiny_setup, run)
    assert rc == 0, err


def test_the_final_export_carries_a_manifest_that_loads(run):
    import diffcoder

    files = json.loads((run / "final" / "manifest.json").read_text())["files"]
    assert "trainer_state.pt" not in files and "model.safetensors" in files
    diffcoder.load(run / "final")


def test_train_never_writes_into_a_folder_that_is_not_a_run(tiny_setup, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    (out / "log.jsonl").write_text("my own log\n")
    args = [recipe(tmp_path), *base_overrides(tiny_setup, out, **{"train.steps": 1}), "--quiet"]
    rc, err = train_cli(*args)
    assert rc == 2 and str(out) in err and "--force" in err and (out / "log.jsonl").read_text() == "my own log\n"
    rc, err = train_cli(*args, "--force")
    assert rc == 0, err
    assert (out / "notes.txt").read_text() == "keep" and (out / "final" / "config.json").is_file()
