"""GGUF files (llama.cpp): config, dequantized weights (via the `gguf` package) and tokenizer.

llama.cpp stores Q and K projections with the rotary halves interleaved per head; we undo that permutation so the
weights match the Hugging Face rotate-half layout the model uses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffcoder.errors import CheckpointError
from diffcoder.model import ModelConfig

GGUF_TO_HF = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _reader(path: Path):
    import gguf

    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; run `diffcoder pull smollm2` or give a .gguf path")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable GGUF file ({exc}); re-download it") from exc


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    try:
        if parts[0] == "blk":
            return f"model.layers.{parts[1]}.{GGUF_TO_HF[parts[2]]}.{parts[3]}"
        return f"{GGUF_TO_HF[parts[0]]}.{parts[1]}"
    except (KeyError, IndexError):
        why = " (RoPE scaling, which is not supported yet)" if parts[0] == "rope_freqs" else ""
        raise CheckpointError(f"GGUF tensor {gguf_name!r} is not a weight of the llama/qwen2 layout we read{why}; "
                              "convert the original Hugging Face checkpoint instead") from None


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's convert-time permutation of q_proj/k_proj rows."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _vocab_from_tokens(reader, path: Path) -> int:
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise CheckpointError(f"{path.name} records neither a vocabulary size nor tokens; re-export the GGUF")
    return len(reader.fields["tokenizer.ggml.tokens"].data)


def read_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and float32 state dict (HF Llama names) of a llama-architecture GGUF file."""
    import gguf

    path = Path(path)
    reader = _reader(path)
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise CheckpointError(f"{path.name}: GGUF architecture {arch!r} is not supported (llama, qwen2)")

    def a(key: str, default=None):
        value = _field(reader, f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(f"{path.name} has no {arch}.{key} in its metadata, so its shape is unknown; "
                                  "re-export the GGUF with llama.cpp's converter")
        return value

    n_heads, n_kv = int(a("attention.head_count")), int(a("attention.head_count_kv", a("attention.head_count")))
    names = {t.name for t in reader.tensors}
    vocab = _field(reader, f"{arch}.vocab_size") or _vocab_from_tokens(reader, path)
    cfg = ModelConfig(
        vocab_size=int(vocab),
        hidden_size=int(a("embedding_length")),
        intermediate_size=int(a("feed_forward_length")),
        num_hidden_layers=int(a("block_count")),
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=int(a("attention.key_length", int(a("embedding_length")) // n_heads)),
        rope_theta=float(a("rope.freq_base", 10000.0)),
        rms_norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(a("context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias=arch == "qwen2",
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        mask_token_id=None,
    )
    state: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc=f"dequantizing {path.name}", unit="tensor"):
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as exc:
            raise CheckpointError(
                f"{path.name}: tensor {t.name} uses quantization {t.tensor_type.name}, which the installed `gguf` "
                f"package cannot dequantize ({exc}); use a Q4_0/Q4_1/Q5/Q8_0/F16/F32 file or upgrade `gguf`"
            ) from exc
        w = np.asarray(w, dtype=np.float32).reshape(tuple(reversed([int(x) for x in t.shape])))
        name = hf_name(t.name)
        if arch == "llama" and name.endswith("q_proj.weight"):
            w = unpermute_rope(w, n_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            w = unpermute_rope(w, n_kv)
        state[name] = torch.from_numpy(np.array(w, dtype=np.float32, copy=True))
    return cfg, state


def load_gguf_tokenizer(path: str | Path):
    """A `transformers` fast tokenizer (with the chat template) built from the GGUF metadata, or None if the
    file carries no tokenizer."""
    from transformers import AutoTokenizer

    path = Path(path)
    if "tokenizer.ggml.tokens" not in _reader(path).fields:
        return None
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as exc:
        raise CheckpointError(f"could not build a tokenizer from {path.name}: {exc}") from exc
