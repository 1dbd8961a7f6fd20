"""The trainer end to end on a tiny model: invariances, exact resume after a SIGKILL mid-checkpoint, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_helpers import base_overrides, run_cli

from diffcoder.errors import CheckpointError, ConfigError, DiffcoderError
from diffcoder.training.config import load_config
from diffcoder.training.trainer import Trainer, train


def losses(run: Path) -> list[float]:
    recs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["kind"] == "train"]


def test_accumulation_invariance(tiny_setup, tmp_path):
    """1 micro-batch of 4 == 4 micro-batches of 1 (same rows, same masks, per-token normalisation)."""
    runs = {}
    for name, mb, acc in (("1x4", 4, 1), ("4x1", 1, 4)):
        cfg = load_config(None, base_overrides(tiny_setup, tmp_path / name, **{
            "train.micro_batch_size": mb, "train.grad_accum": acc, "model.dtype": "float64", "train.steps": 5}))
        train(cfg, quiet=True)
        runs[name] = losses(tmp_path / name)
    assert len(runs["1x4"]) == 5
    assert runs["1x4"] == pytest.approx(runs["4x1"], rel=1e-10)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "1x4" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "4x1" / "final" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], rtol=1e-9, atol=1e-12) for k in a)


def test_training_reduces_loss_and_writes_hf_checkpoint(tiny_setup, tmp_path):
    cfg = load_config(None, base_overrides(tiny_setup, tmp_path / "run", **{"train.steps": 30,
                                                                            "objective.warmup_steps": 0}))
    res = train(cfg, quiet=True)
    ls = losses(tmp_path / "run")
    assert sum(ls[-5:]) / 5 < sum(ls[:5]) / 5
    assert res["eval"]["eval_nelbo"] > 0 and res["eval"]["eval_ar_nll"] > 0
    import diffcoder

    model, tok = diffcoder.load(tmp_path / "run" / "final")
    assert model.config.mask_token_id == 3 and tok is not None
    cfgj = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert cfgj["architectures"] == ["LlamaForCausalLM"] and cfgj["block_size"] == 4
    # The run directory stands for its final model, which now decodes with the block size it was trained for
    # (its converted AR start point defaulted to exact AR decoding: block 1 with shift).
    loaded = diffcoder.load(tmp_path / "run")
    again = loaded.model
    assert loaded.defaults["block_length"] == 4 and loaded.defaults["shift"] is False
    assert again.config.extra["diffusion_trained"] is True
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    import shutil

    shutil.rmtree(tmp_path / "run" / "final")  # a run still in progress: its latest complete checkpoint
    assert diffcoder.resolve_run_dir(tmp_path / "run") == tmp_path / "run" / "checkpoints" / latest


def test_kill_during_checkpoint_write_then_resume_matches(tiny_setup, tmp_path):
    ov = lambda out: base_overrides(tiny_setup, out, **{"train.steps": 12, "train.save_every": 4,  # noqa: E731
                                                         "train.eval_every": 4, "train.keep_checkpoints": 5})
    run_cli(["train", *_cfg(tmp_path), *ov(tmp_path / "ref"), "--quiet"])
    # SIGKILL in the middle of writing the second checkpoint (step 8): files written, not yet published
    p = run_cli(["train", *_cfg(tmp_path), *ov(tmp_path / "cut"), "--quiet"],
                {"DIFFCODER_KILL_AT": "save-before-rename:2"}, check=False)
    assert p.returncode == -9
    ck = tmp_path / "cut" / "checkpoints"
    assert (ck / "step_0000004" / "trainer_state.pt").is_file()
    assert not (ck / "step_0000008").exists() and (ck / ".step_0000008.partial").exists()
    assert (ck / "latest").read_text().strip() == "step_0000004"
    # the killed run logged steps 4..7 after its last checkpoint; resume redoes them identically
    run_cli(["train", *_cfg(tmp_path), *ov(tmp_path / "cut"), "--resume", "--quiet"])
    assert not (ck / ".step_0000008.partial").exists()
    assert losses(tmp_path / "cut") == losses(tmp_path / "ref")  # bit-identical curve
    ev = lambda r: [x for x in map(json.loads, (r / "log.jsonl").read_text().splitlines())  # noqa: E731
                    if x["kind"] == "eval"]
    assert ev(tmp_path / "cut") == ev(tmp_path / "ref")
    # a kill right after publishing (before the pointer moves) is also safe
    p = run_cli(["train", *_cfg(tmp_path), *ov(tmp_path / "cut2"), "--quiet"],
                {"DIFFCODER_KILL_AT": "save-after-rename:1"}, check=False)
    assert p.returncode == -9
    run_cli(["train", *_cfg(tmp_path), *ov(tmp_path / "cut2"), "--resume", "--quiet"])
    assert losses(tmp_path / "cut2") == losses(tmp_path / "ref")


def _cfg(tmp_path: Path) -> list[str]:
    """An (empty-ish) YAML recipe file: everything comes from overrides."""
    f = tmp_path / "recipe.yaml"
    f.write_text("train:\n  log_every: 1\n")
    return [str(f)]


def test_plot_cli(tiny_setup, tmp_path):
    cfg = load_config(None, base_overrides(tiny_setup, tmp_path / "run", **{"train.steps": 4}))
    train(cfg, quiet=True)
    run_cli(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "p.png")])
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_config_errors(tiny_setup, tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'optim.lr'"):
        load_config(None, ["optim.lrr=1e-4"])
    with pytest.raises(ConfigError, match="did you mean 'objective.u_init'"):
        load_config(None, ["objectve.u_init=0.1"])
    with pytest.raises(ConfigError, match="u_init must be in"):
        load_config(None, base_overrides(tiny_setup, tmp_path / "a", **{"objective.u_init": 0}))
    with pytest.raises(ConfigError, match="u_init must be in"):
        load_config(None, base_overrides(tiny_setup, tmp_path / "a", **{"objective.u_init": 1.5}))
    with pytest.raises(ConfigError, match="does not divide data.seq_len"):
        load_config(None, base_overrides(tiny_setup, tmp_path / "a", **{"model.block_size": 5}))
    with pytest.raises(ConfigError, match="does not divide"):  # the checkpoint's own block size (4) vs 30
        Trainer(load_config(None, base_overrides(tiny_setup, tmp_path / "a", **{"data.seq_len": 30})))
    with pytest.raises(ConfigError, match="must be an integer"):
        load_config(None, ["train.steps=ten"])
    with pytest.raises(ConfigError, match="shipped"):
        load_config("no-such-recipe")
    p = run_cli(["train", "cpt-small", "train.stepz=3"], check=False)
    assert p.returncode == 2 and "did you mean 'train.steps'" in p.stderr and "Traceback" not in p.stderr


def test_vocab_mismatch_and_other_run(tiny_setup, tmp_path):
    from diffcoder.testing import write_tiny_checkpoint

    small = write_tiny_checkpoint(tmp_path / "small", seed=0, with_tokenizer=False, vocab_size=100, mask_token_id=3)
    with pytest.raises(ConfigError, match="only 100 embeddings"):
        Trainer(load_config(None, base_overrides(tiny_setup, tmp_path / "r", **{"model.path": small})))
    # ids in range, but from another tokenizer
    other_tok = other_tokenizer()
    from train_helpers import make_code_corpus

    from diffcoder.training.data import build_corpus

    build_corpus([str(make_code_corpus(tmp_path / "src", n=20))], other_tok, tmp_path / "d2", val_fraction=0)
    with pytest.raises(ConfigError, match="different tokenizer"):
        Trainer(load_config(None, base_overrides(tiny_setup, tmp_path / "r", **{"data.path": tmp_path / "d2"})))
    # a checkpoint directory of another run
    train(load_config(None, base_overrides(tiny_setup, tmp_path / "r1", **{"train.steps": 2})), quiet=True)
    with pytest.raises(CheckpointError, match="--resume"):
        Trainer(load_config(None, base_overrides(tiny_setup, tmp_path / "r1", **{"train.steps": 2})))
    with pytest.raises(CheckpointError, match="optim.lr"):
        Trainer(load_config(None, base_overrides(tiny_setup, tmp_path / "r1", **{"optim.lr": 5e-4})), resume=True)
    # an empty corpus and a missing one
    (tmp_path / "empty").mkdir()
    p = run_cli(["data", "build", str(tmp_path / "empty"), "--out", str(tmp_path / "d3"), "--tokenizer",
                 str(tiny_setup["base"])], check=False)
    assert p.returncode == 2 and "no readable" in p.stderr
    with pytest.raises(DiffcoderError, match="not a built dataset"):
        Trainer(load_config(None, base_overrides(tiny_setup, tmp_path / "r", **{"data.path": tmp_path / "empty"})))


def test_ar_objective_runs(tiny_setup, tmp_path):
    cfg = load_config(None, base_overrides(tiny_setup, tmp_path / "ar", **{"objective.kind": "ar"}))
    res = train(cfg, quiet=True)
    assert res["last"]["mask_ratio"] == 0.0 and res["last"]["loss"] > 0


def other_tokenizer():
    """A word-level tokenizer with its own vocabulary (ids that mean other things than the model's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(200)] + ["def", "return", "x", "+", "(", ")", ":"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def test_sft_run_scores_only_responses(tiny_setup, tmp_path):
    """SFT end to end on mined pairs: prompt tokens are never masked, trailing EOS are."""
    from diffcoder.testing import tiny_tokenizer
    from diffcoder.training.data import build_sft

    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"m{i}.py").write_text(
            f'def add{i}(a, b):\n    """Add {i} to a plus b."""\n    s = a + b\n    return s + {i}\n')
    build_sft([str(src)], tiny_tokenizer(), tmp_path / "sft", mine=True, val_fraction=0.2)
    cfg = load_config(None, base_overrides(tiny_setup, tmp_path / "run", **{
        "data.kind": "sft", "data.path": tmp_path / "sft", "data.seq_len": 128, "train.steps": 3,
        "objective.warmup_steps": 0}))
    tr = Trainer(cfg, quiet=True)
    x0, elig = tr.global_batch_at(0)
    assert (~elig).any() and elig.any()
    from diffcoder.training.objective import sample_block_noise

    noise = sample_block_noise(elig, 4, generator=torch.Generator().manual_seed(0))
    assert not (noise.masked & ~elig).any()
    res = tr.run()
    assert res["last"]["loss"] > 0 and "eval_nelbo" in res["eval"]


def test_activation_checkpointing_same_training(tiny_setup, tmp_path):
    curves = []
    for gc in (False, True):
        cfg = load_config(None, base_overrides(tiny_setup, tmp_path / f"gc{gc}", **{
            "model.gradient_checkpointing": gc, "model.dtype": "float64", "train.steps": 3}))
        train(cfg, quiet=True)
        curves.append(losses(tmp_path / f"gc{gc}"))
    assert curves[0] == pytest.approx(curves[1], rel=1e-12)


def test_ar_start_point_gets_a_mask_token(tiny_setup, tmp_path):
    """An AR checkpoint without a mask token is given one (a new mean-embedding row) and trains."""
    from diffcoder.testing import write_tiny_checkpoint

    ar = write_tiny_checkpoint(tmp_path / "ar", seed=1, with_tokenizer=False, std=0.02, mask_token_id=None)
    tr = Trainer(load_config(None, base_overrides(tiny_setup, tmp_path / "run", **{"model.path": ar,
                                                                                   "train.steps": 2})), quiet=True)
    assert tr.mask_id == 384 and tr.model.config.vocab_size == 385
    emb = tr.model.model.embed_tokens.weight.detach()
    assert torch.allclose(emb[384], emb[:384].mean(0), atol=1e-6)
    tr.run()
    import diffcoder

    m, _ = diffcoder.load(tmp_path / "run" / "final")
    assert m.config.mask_token_id == 384 and m.config.vocab_size == 385
