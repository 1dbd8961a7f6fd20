"""LoRA adapter directories (diffcoder.adapters): save, reload and merge with several trained embedding rows (the
mask token plus three added FIM tokens), PEFT loading the same files onto transformers' LlamaForCausalLM, the older
diffcoder-lora-v1 layout, and every missing / corrupt / mismatched adapter error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffcoder
from diffcoder.adapters import read_adapter, save_adapter
from diffcoder.convert import add_special_tokens
from diffcoder.errors import CheckpointError
from diffcoder.fim import FIM_TOKENS
from diffcoder.model import block_causal_mask
from diffcoder.testing import write_tiny_checkpoint
from diffcoder.training.lora import LoRALinear

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 4, 8.0


def causal_logits(model, ids: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(ids.shape[1])
    with torch.no_grad():
        return model(ids, attn_mask=block_causal_mask(pos, pos, 1)[None, None])


def wrap_with_lora(model, rows: list[int], seed: int = 0) -> None:
    """A trained-looking LoRA model: every target linear wrapped, A and B random (B non-zero), the rows changed.

    Built from LoRALinear directly, as apply_lora does, so the test does not depend on apply_lora's signature."""
    gen = torch.Generator().manual_seed(seed)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if name in TARGETS:
                    lora = LoRALinear(child, RANK, ALPHA)
                    with torch.no_grad():
                        lora.lora_A.copy_(torch.randn(lora.lora_A.shape, generator=gen) * 0.1)
                        lora.lora_B.copy_(torch.randn(lora.lora_B.shape, generator=gen) * 0.1)
                    setattr(parent, name, lora)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[rows] = torch.randn(len(rows), emb.shape[1], generator=gen)
    model._lora_config = {"rank": RANK, "alpha": ALPHA, "targets": TARGETS, "dropout": 0.0,
                          "trainable_token_indices": rows}


@pytest.fixture
def trained(tmp_path):
    """A tiny tied-embedding base on disk, and an adapter trained on it that added the three FIM tokens."""
    base = write_tiny_checkpoint(tmp_path / "base", seed=1, tie_word_embeddings=True)
    model, tok = diffcoder.load(base)
    base_vocab = model.config.vocab_size
    fim_ids = add_special_tokens(model, tok, FIM_TOKENS)
    rows = [model.config.mask_token_id, *fim_ids]
    wrap_with_lora(model, rows)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_adapter(model, adapter, base, tok)
    return {"base": base, "adapter": adapter, "live": model, "rows": rows, "fim_ids": fim_ids,
            "base_vocab": base_vocab, "tmp": tmp_path}


def test_adapter_files_are_peft_layout_with_sidecar(trained):
    d, rows = trained["adapter"], trained["rows"]
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == RANK and cfg["lora_alpha"] == ALPHA
    assert sorted(cfg["target_modules"]) == sorted(TARGETS) and cfg["trainable_token_indices"] == rows
    assert cfg["base_model_name_or_path"] == str(trained["base"].resolve())
    sd = load_file(str(d / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in sd
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in sd
    assert len([k for k in sd if k.endswith(".lora_A.weight")]) == 2 * len(TARGETS)
    token_rows = sd["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert torch.equal(token_rows, trained["live"].model.embed_tokens.weight.detach()[rows])
    meta = json.loads((d / "diffcoder_adapter.json").read_text())
    assert meta["added_tokens"] == dict(zip(FIM_TOKENS, trained["fim_ids"]))
    assert meta["base_vocab_size"] == trained["base_vocab"] and meta["vocab_size"] == trained["base_vocab"] + 3
    assert meta["mask_token_id"] == rows[0] and meta["block_size"] == 4 and meta["shift"] is False


def test_merge_equals_base_plus_scaled_product_and_rows(trained):
    base_model, _ = diffcoder.load(trained["base"])
    merged, tok = diffcoder.load(trained["adapter"])
    live, rows = trained["live"], trained["rows"]
    scale = ALPHA / RANK
    for i, layer in enumerate(merged.model.layers):
        for parent, name in [(p, n) for p in ("self_attn", "mlp") for n in TARGETS if hasattr(getattr(layer, p), n)]:
            lora = getattr(getattr(live.model.layers[i], parent), name)
            want = (getattr(getattr(base_model.model.layers[i], parent), name).weight.double()
                    + lora.lora_B.double() @ lora.lora_A.double() * scale)
            got = getattr(getattr(layer, parent), name).weight
            torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
    emb = merged.model.embed_tokens.weight
    assert emb.shape[0] == trained["base_vocab"] + 3
    assert torch.equal(emb[rows], live.model.embed_tokens.weight.detach()[rows])
    keep = torch.ones(trained["base_vocab"], dtype=torch.bool)
    keep[rows[0]] = False
    assert torch.equal(emb[: trained["base_vocab"]][keep], base_model.model.embed_tokens.weight[keep])
    assert merged.lm_head.weight is merged.model.embed_tokens.weight  # still tied
    assert [tok.convert_tokens_to_ids(t) for t in FIM_TOKENS] == trained["fim_ids"]
    ids = torch.tensor([[1, rows[1], 7, rows[2], 9, rows[3], 11, rows[0]]])
    merged64, _ = diffcoder.load(trained["adapter"], dtype="float64")  # merged vs unmerged: no float32 rounding
    torch.testing.assert_close(causal_logits(merged64, ids), causal_logits(live.double().eval(), ids),
                               atol=1e-9, rtol=1e-9)


def test_merge_command_writes_the_same_model(trained):
    from diffcoder.loading import merge_adapter

    out = merge_adapter(trained["adapter"], trained["tmp"] / "merged")
    assert not (out / "adapter_config.json").exists()
    merged, _ = diffcoder.load(out)
    again, _ = diffcoder.load(trained["adapter"])
    assert merged.config.vocab_size == again.config.vocab_size and merged.config.mask_token_id == trained["rows"][0]
    for (name, a), (_, b) in zip(merged.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("with_fim", [False, True])
def test_peft_loads_the_adapter_with_the_same_logits(tmp_path, with_fim):
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    base = write_tiny_checkpoint(tmp_path / "base", seed=2, tie_word_embeddings=True)
    model, tok = diffcoder.load(base)
    rows = [model.config.mask_token_id]
    if with_fim:
        rows += add_special_tokens(model, tok, FIM_TOKENS)
    wrap_with_lora(model, rows, seed=3)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_adapter(model, adapter, base, tok)
    hf = LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float64).eval()  # merged vs unmerged: exact
    if with_fim:  # PEFT's trainable tokens replace rows that must exist: grow the base first, as PEFT users do
        hf.resize_token_embeddings(model.config.vocab_size)
    peft_model = peft.PeftModel.from_pretrained(hf, str(adapter)).eval()
    ours, _ = diffcoder.load(adapter, dtype="float64")
    ids = torch.tensor([[1, *rows, 7, 9, 11, 13, 2]])
    with torch.no_grad():
        want = peft_model(ids).logits
    # transformers computes RoPE angles in float32: the same tolerance as test_model's plain comparison
    torch.testing.assert_close(causal_logits(ours, ids), want, atol=2e-5, rtol=0)
    plain, _ = diffcoder.load(base, dtype="float64")  # and the adapter matters far beyond that tolerance
    common = torch.tensor([[1, 7, 9, 11, 13, 2]])
    with torch.no_grad():
        adapted = peft_model(common).logits[..., : plain.config.vocab_size]
    assert (causal_logits(plain, common) - adapted).abs().max() > 0.1


def test_old_v1_layout_still_loads(trained, tmp_path):
    """The first layout: our key names, everything in adapter_config.json, only the mask row."""
    live, mid = trained["live"], trained["rows"][0]
    old = tmp_path / "v1"
    old.mkdir()
    sd = {}
    for name, m in live.named_modules():
        if isinstance(m, LoRALinear):
            sd[f"{name}.lora_A"], sd[f"{name}.lora_B"] = m.lora_A.detach(), m.lora_B.detach()
    sd["mask_token_embedding"] = live.model.embed_tokens.weight.detach()[mid].clone()
    save_file(sd, str(old / "adapter_model.safetensors"))
    from diffcoder.adapters import base_content_hash

    (old / "adapter_config.json").write_text(json.dumps({
        "format": "diffcoder-lora-v1", "rank": RANK, "alpha": ALPHA, "targets": TARGETS, "dropout": 0.0,
        "base_model": str(trained["base"]), "base_sha256": base_content_hash(trained["base"]),
        "mask_token_id": mid, "vocab_size": trained["base_vocab"], "block_size": 4, "shift": False}))
    merged, _ = diffcoder.load(old, dtype="float64")
    assert torch.equal(merged.model.embed_tokens.weight[mid].float(), sd["mask_token_embedding"])
    ids = torch.tensor([[1, 5, mid, 9, 11]])  # no FIM tokens: v1 knew only the mask row
    v = trained["base_vocab"]
    torch.testing.assert_close(causal_logits(merged, ids)[..., :v], causal_logits(live.double().eval(), ids)[..., :v],
                               atol=1e-9, rtol=1e-9)


# ----------------------------------------------------------------------------------------------------- errors


def test_missing_weights_file(trained):
    (trained["adapter"] / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors; copy the weights file"):
        diffcoder.load(trained["adapter"])


def test_truncated_weights_file(trained):
    f = trained["adapter"] / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated.*copy the adapter again"):
        diffcoder.load(trained["adapter"])


def test_weights_missing_a_factor(trained):
    f = trained["adapter"] / "adapter_model.safetensors"
    sd = load_file(str(f))
    sd.pop("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight")
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match="without .*up_proj.lora_B.weight; the file is incomplete"):
        diffcoder.load(trained["adapter"])


def test_changed_base_is_refused(trained):
    f = trained["base"] / "model.safetensors"
    sd = load_file(str(f))
    sd["model.norm.weight"] = sd["model.norm.weight"] * 2
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not the one adapter .* was trained on .*use the original base"):
        diffcoder.load(trained["adapter"])


def test_base_with_another_vocabulary_is_refused(trained):
    shutil.rmtree(trained["base"])
    write_tiny_checkpoint(trained["base"], seed=1, tie_word_embeddings=True, with_tokenizer=False, vocab_size=300,
                          mask_token_id=3)
    with pytest.raises(CheckpointError, match=f"trained on a base with {trained['base_vocab']} embeddings.*has 300"):
        diffcoder.load(trained["adapter"])


def test_missing_base_names_where_it_should_be(trained):
    shutil.rmtree(trained["base"])
    with pytest.raises(CheckpointError, match="base checkpoint of adapter .* is missing at .*restore it there"):
        diffcoder.load(trained["adapter"])


def test_plain_peft_adapter_without_sidecar(trained):
    (trained["adapter"] / "diffcoder_adapter.json").unlink()
    with pytest.raises(CheckpointError, match="no diffcoder_adapter.json.*load it with peft"):
        diffcoder.load(trained["adapter"])


def test_adapter_of_another_architecture(trained, tmp_path):
    from diffcoder.adapters import merge_into

    other = write_tiny_checkpoint(tmp_path / "wide", seed=1, hidden_size=96, num_attention_heads=4)
    model, _ = diffcoder.load(other)
    with pytest.raises(CheckpointError, match="has shapes A .* but the base's weight is"):
        merge_into(model, read_adapter(trained["adapter"]))


def test_resume_copies_factors_and_rows_into_live_lora(trained):
    from diffcoder.adapters import load_adapter_weights

    fresh, tok = diffcoder.load(trained["base"])
    add_special_tokens(fresh, tok, FIM_TOKENS)
    wrap_with_lora(fresh, trained["rows"], seed=9)  # other random factors and rows
    load_adapter_weights(fresh, trained["adapter"])
    live = dict(trained["live"].named_modules())
    for name, m in fresh.named_modules():
        if isinstance(m, LoRALinear):
            assert torch.equal(m.lora_A, live[name].lora_A) and torch.equal(m.lora_B, live[name].lora_B)
    rows = trained["rows"]
    assert torch.equal(fresh.model.embed_tokens.weight[rows], trained["live"].model.embed_tokens.weight[rows])


def test_loading_an_adapter_needs_nothing_from_training(trained):
    """diffcoder.load of an adapter reads the format from diffcoder.adapters alone (issue 12)."""
    import subprocess
    import sys

    code = ("import sys, diffcoder; diffcoder.load(sys.argv[1]); "
            "print(sorted(m for m in sys.modules if m.startswith(('diffcoder.training', 'peft'))))")
    p = subprocess.run([sys.executable, "-c", code, str(trained["adapter"])], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "[]"
