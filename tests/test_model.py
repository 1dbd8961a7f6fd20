"""The model against transformers' Llama/Qwen2 in float64 (independent reference), and checkpoint round trips.

transformers computes RoPE angles in float32 even for float64 models, so agreement is ~1e-6, not 1e-15;
any layout, masking or GQA mistake shows up as differences of order 0.1-1.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import diffcoder
from diffcoder.checkpoint import save_checkpoint
from diffcoder.model import block_causal_mask
from diffcoder.testing import tiny_model

ATOL = 2e-5

VARIANTS = {
    "untied-gqa": dict(tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=2),
    "tied-mha": dict(tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=4),
    "tied-mqa": dict(tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=1),
}


@pytest.fixture(params=list(VARIANTS))
def saved(request, tmp_path):
    model = tiny_model(seed=3, dtype=torch.float64, std=0.2, **VARIANTS[request.param])
    path = save_checkpoint(model, tmp_path / "ck")
    return model, path


def test_block_causal_mask_definition():
    for B in (1, 2, 3, 4, 8):
        pos = torch.arange(19)
        m = block_causal_mask(pos, pos, B)
        for i in range(19):
            for j in range(19):
                assert bool(m[i, j]) == (j // B <= i // B)
    pos = torch.arange(10)
    assert torch.equal(block_causal_mask(pos, pos, 1), torch.ones(10, 10, dtype=torch.bool).tril())


def test_causal_logits_match_transformers_llama(saved):
    model, path = saved
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(13)
    with torch.no_grad():
        ours = model(ids, attn_mask=block_causal_mask(pos, pos, 1)[None, None])
        ref = hf(ids).logits
    assert ref.abs().max() > 1.0  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("block", [2, 4])
def test_block_causal_logits_match_transformers_with_4d_mask(saved, block):
    model, path = saved
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(11)
    mask = block_causal_mask(pos, pos, block)[None, None]
    with torch.no_grad():
        ours = model(ids, attn_mask=mask)
        ref = hf(ids, attention_mask=mask.expand(2, 1, 11, 11)).logits
        causal = hf(ids).logits
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    assert (ours - causal).abs().max() > 1e-3  # the block mask really differs from causal


def test_qwen2_bias_layout_matches_transformers(tmp_path):
    cfg = Qwen2Config(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    ref = Qwen2ForCausalLM(cfg).to(torch.float64).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)  # non-zero biases, so a dropped bias would show
    ref.save_pretrained(tmp_path / "qwen")
    model, tok = diffcoder.load(tmp_path / "qwen", dtype="float64")
    assert tok is None and model.config.attention_bias
    ids = torch.randint(0, 200, (1, 9))
    pos = torch.arange(9)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attn_mask=block_causal_mask(pos, pos, 1)[None, None]),
                                   ref(ids).logits, atol=ATOL, rtol=0)


def test_saved_checkpoint_loads_in_transformers_and_back(tmp_path):
    model = tiny_model(seed=5, dtype=torch.float32, std=0.1)
    path = save_checkpoint(model, tmp_path / "ck", generation_defaults={"steps": 64})
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["mask_token_id"], cfg["block_size"], cfg["shift"]) == (3, 4, False)
    assert json.loads((path / "generation_config.json").read_text())["steps"] == 64
    hf = LlamaForCausalLM.from_pretrained(path).eval()
    loaded = diffcoder.load(path)
    again, _ = loaded
    ids = torch.randint(0, 384, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids))
        pos = torch.arange(7)
        torch.testing.assert_close(again(ids, attn_mask=block_causal_mask(pos, pos, 1)[None, None]),
                                   hf(ids).logits, atol=1e-4, rtol=0)
    assert loaded.defaults["steps"] == 64 and loaded.generation_config == {
        "steps": 64, "block_length": 4, "shift": False, "remasking": "low_confidence", "temperature": 0.0}


def test_sharded_checkpoint_round_trip(tmp_path):
    model = tiny_model(seed=6, std=0.1)
    path = save_checkpoint(model, tmp_path / "ck", max_shard_bytes=40_000)
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (path / "model.safetensors.index.json").is_file()
    again, _ = diffcoder.load(path)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    hf = LlamaForCausalLM.from_pretrained(path)  # transformers reads our index too
    assert hf.config.num_hidden_layers == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dtypes_run_and_agree(dtype):
    ref = tiny_model(seed=2, dtype=torch.float64, std=0.1)
    model = tiny_model(seed=2, dtype=dtype, std=0.1)
    ids = torch.randint(0, 384, (2, 8))
    with torch.no_grad():
        out = model(ids)
        want = ref(ids)
    assert out.dtype == dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-4, torch.bfloat16: 0.1}[dtype]
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=0)


def test_kv_cache_forward_equals_full_forward():
    model = tiny_model(seed=4, dtype=torch.float64, std=0.2)
    ids = torch.randint(0, 384, (2, 12))
    pos = torch.arange(12)
    mask = block_causal_mask(pos, pos, 4)[None, None]
    with torch.no_grad():
        full = model(ids, attn_mask=mask)
        cache = model.new_cache(2, 12)
        a = model(ids[:, :8], attn_mask=mask[..., :8, :8], cache=cache, cache_start=0)
        b = model(ids[:, 8:], attn_mask=mask[..., 8:, :12], cache=cache, cache_start=8)
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-12, rtol=0)
