"""LoRA: only adapters and the mask row learn; the adapter loads on its base by content hash, and merges."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_helpers import base_overrides

import diffcoder
from diffcoder.errors import CheckpointError
from diffcoder.training.config import load_config
from diffcoder.training.lora import lora_modules
from diffcoder.training.trainer import Trainer


def test_lora_train_load_merge(tiny_setup, tmp_path):
    cfg = load_config(None, base_overrides(tiny_setup, tmp_path / "run", **{
        "lora.enabled": True, "lora.rank": 4, "lora.alpha": 8, "optim.lr": 1e-2, "train.steps": 6,
        "objective.warmup_steps": 0}))
    tr = Trainer(cfg, quiet=True)
    base_emb = tr.model.model.embed_tokens.weight.detach().clone()
    base_q = tr.model.model.layers[0].self_attn.q_proj.base.weight.detach().clone()
    n_trainable = sum(p.numel() for p in tr.model.parameters() if p.requires_grad)
    tr.run()
    m = tr.model
    mid = m.config.mask_token_id
    emb = m.model.embed_tokens.weight.detach()
    others = torch.ones(emb.shape[0], dtype=torch.bool)
    others[mid] = False
    assert torch.equal(emb[others], base_emb[others])  # frozen rows untouched (weight decay included)
    assert not torch.equal(emb[mid], base_emb[mid])  # the mask row learned
    assert torch.equal(m.model.layers[0].self_attn.q_proj.base.weight, base_q)
    assert any(mod.lora_B.abs().sum() > 0 for mod in lora_modules(m).values())
    assert n_trainable < m.num_parameters()
    # the adapter directory is small and loads (merged) through diffcoder.load
    final = tmp_path / "run" / "final"
    cfgj = json.loads((final / "adapter_config.json").read_text())
    meta = json.loads((final / "diffcoder_adapter.json").read_text())
    assert cfgj["peft_type"] == "LORA" and cfgj["base_model_name_or_path"] == str(tiny_setup["base"].resolve())
    assert meta["base"] == {"path": str(tiny_setup["base"].resolve())} and len(meta["base_sha256"]) == 64
    assert (final / "adapter_model.safetensors").stat().st_size < (tiny_setup["base"] / "model.safetensors").stat().st_size
    m.eval()
    x = torch.randint(4, 300, (2, 16))
    with torch.no_grad():
        want = m(x)
    loaded, tok = diffcoder.load(final)
    assert tok is not None and not lora_modules(loaded)
    with torch.no_grad():
        assert torch.allclose(loaded(x), want, atol=1e-5)
    # diffcoder merge -> a full checkpoint with the same function
    from train_helpers import run_cli

    run_cli(["merge", str(final), "--out", str(tmp_path / "merged")])
    merged, _ = diffcoder.load(tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    with torch.no_grad():
        assert torch.allclose(merged(x), want, atol=1e-5)


def test_adapter_refuses_changed_base(tiny_setup, tmp_path):
    import shutil

    base = shutil.copytree(tiny_setup["base"], tmp_path / "base")
    cfg = load_config(None, base_overrides(tiny_setup, tmp_path / "run", **{
        "model.path": base, "lora.enabled": True, "train.steps": 2}))
    Trainer(cfg, quiet=True).run()
    final = tmp_path / "run" / "final"
    sd = load_file(str(base / "model.safetensors"))
    sd["model.norm.weight"] = sd["model.norm.weight"] * 2
    save_file(sd, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="has changed"):
        diffcoder.load(final)
    shutil.rmtree(base)
    with pytest.raises(CheckpointError, match="missing"):
        diffcoder.load(final)


def test_token_rows_hook_follows_a_move_after_apply_lora():
    """The gradient hook keeps only the chosen rows whatever the model was moved to after apply_lora (the CUDA
    crash was a CPU mask meeting a moved gradient; a dtype move shows the same bug on the CPU)."""
    from diffcoder.testing import tiny_model
    from diffcoder.training.config import LoraSection
    from diffcoder.training.lora import apply_lora

    model = tiny_model(seed=0, std=0.3)
    apply_lora(model, LoraSection(rank=2, alpha=4), train_token_rows=[7, 3, 7])
    assert model._lora_config["trainable_token_indices"] == [3, 7]
    model.to(torch.bfloat16)
    before = model.model.embed_tokens.weight.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    x = torch.randint(4, 300, (2, 12))
    x[0, 0], x[1, 5] = 3, 7  # the trained rows are looked up, so they get a gradient through the embedding too
    model(x).float().logsumexp(-1).sum().backward()
    grad = model.model.embed_tokens.weight.grad
    assert grad.dtype == torch.bfloat16
    nonzero_rows = grad.abs().sum(-1).nonzero().flatten().tolist()
    assert nonzero_rows == [3, 7]
    opt.step()
    changed = (model.model.embed_tokens.weight.detach() != before).any(-1).nonzero().flatten().tolist()
    assert changed == [3, 7]


def test_apply_lora_rejects_rows_outside_the_vocabulary():
    from diffcoder.errors import ConfigError
    from diffcoder.testing import tiny_model
    from diffcoder.training.config import LoraSection
    from diffcoder.training.lora import apply_lora

    with pytest.raises(ConfigError, match="outside the embedding"):
        apply_lora(tiny_model(), LoraSection(), train_token_rows=[384])
