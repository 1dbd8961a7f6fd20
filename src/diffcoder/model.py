"""The model: a Llama-family decoder with block-causal attention and a mask token.

RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP, optional q/k/v bias (Qwen2) and optional tied
embeddings. Attention takes an explicit boolean mask (True = may attend), so the same weights run causal (AR),
block-causal (inference) or the training mask over `[xt ; x0]`. A `KVCache` holds keys/values of earlier tokens;
a `StaticKVCache` is the same buffers with fixed shapes for the GPU decode path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffcoder.errors import ConfigError
from diffcoder.masks import block_causal_mask as block_causal_mask  # re-exported: callers build masks with it


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias as in Qwen2 (o_proj never has one)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # diffusion fields (docs/design.md §1.2)
    mask_token_id: int | None = None
    block_size: int = 4
    shift: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # other config.json keys, kept on save

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {self.block_size}")

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)} - {"extra"}
        kw = {k: d[k] for k in known if k in d and d[k] is not None}
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        # Qwen2 configs have no attention_bias key but always use q/k/v bias.
        if "attention_bias" not in d and d.get("model_type") == "qwen2":
            kw["attention_bias"] = True
        extra = {k: v for k, v in d.items() if k not in known}
        return cls(**kw, extra=extra)

    def to_hf_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "extra"}
        out = dict(self.extra)
        out.update(d)
        # A checkpoint we write is a plain Llama to `transformers` (docs/design.md §4).
        out["model_type"] = "llama"
        out["architectures"] = ["LlamaForCausalLM"]
        out["mlp_bias"] = False
        out["attention_dropout"] = 0.0
        out["hidden_act"] = "silu"
        for k in ("auto_map", "rope_scaling"):
            if out.get(k) is None:
                out.pop(k, None)
        return out


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 (at least) as Llama does, then cast back before the weight.
        dtype = x.dtype
        h = x.to(torch.promote_types(dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin of shape [batch, seq, head_dim] for the rotate-half RoPE layout used by HF Llama."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=position_ids.device) / head_dim))
    angles = position_ids.to(torch.float64)[..., None] * inv_freq  # [b, s, d/2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class KVCache:
    """Preallocated keys/values per layer: [batch, kv_heads, max_len, head_dim].

    A forward with `cache_start=s` writes its keys/values at [s, s + len) and attends to [0, s + len). What counts
    as committed is the caller's business (the decoder advances `s` only past clean blocks), so a step's scratch
    keys are simply overwritten by the next step.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop finished rows of a batch (rows: indices to keep)."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int):
        """Write this forward's keys/values at [start, start + len) and return keys/values [0, start + len)."""
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class StaticKVCache(KVCache):
    """The same buffers, written by index at the columns in a device tensor, and read over the first `visible`
    columns (the whole width unless set; the attention mask hides what is not valid yet). No shape depends on where
    decoding is, so a decode step has the same shapes every time and can be captured in a CUDA graph
    (`diffcoder.static_decoding`, which sets `visible` per graph from a few width buckets)."""

    visible: int | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, cols: torch.Tensor):  # type: ignore[override]
        self.k[layer].index_copy_(2, cols, k)
        self.v[layer].index_copy_(2, cols, v)
        return self.k[layer][:, :, : self.visible], self.v[layer][:, :, : self.visible]


def _is_block_mask(mask) -> bool:
    return mask is not None and type(mask).__name__ == "BlockMask"


_FLEX: dict[bool, Any] = {}


def _flex_attention(compiled: bool):
    """flex_attention, compiled once for CUDA (its eager form is a slow reference, fine for CPU tests)."""
    if compiled not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX[compiled] = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    return _FLEX[compiled]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, attn_mask, cache: KVCache | None, layer: int, cache_start: int | torch.Tensor):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v, cache_start)
        if _is_block_mask(attn_mask):  # flex_attention BlockMask (CUDA training); SDPA + dense bool mask otherwise
            y = _flex_attention(q.is_cuda)(q, k, v, block_mask=attn_mask, enable_gqa=self.n_kv != self.n_heads)
        else:
            y = attend(q, k, v, attn_mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, -1))


FOLD_MAX_QUERIES = 64


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA with grouped-query attention. q: [b, heads, s, d]; k, v: [b, kv_heads, t, d]; mask [b or 1, 1, s, t].

    The query heads that share a KV head are folded into the query axis, so the kernel reads each KV head once:
    a masked `enable_gqa` call has no fused CUDA kernel and falls back to the math kernel, which copies the keys
    and values once per query head and materialises every score. Folded, a boolean mask (grown by the group)
    takes the memory-efficient kernel. Done for short queries everywhere (decode steps) and for any masked call on
    CUDA; long unmasked or CPU calls keep `enable_gqa`."""
    b, heads, s, d = q.shape
    group = heads // k.shape[1]
    if group == 1 or not (s <= FOLD_MAX_QUERIES or (q.is_cuda and attn_mask is not None)):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=group > 1)
    folded = q.reshape(b, k.shape[1], group * s, d)  # head h uses KV head h // group: group-major, then query
    if attn_mask is not None:
        t = attn_mask.shape[-1]
        attn_mask = attn_mask.expand(b, 1, s, t)[:, :, None].expand(b, 1, group, s, t).reshape(b, 1, group * s, t)
    # reshape, not view: CUDA kernels may return a transposed layout
    return F.scaled_dot_product_attention(folded, k, v, attn_mask=attn_mask).reshape(b, heads, s, d)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_mask, cache, layer, cache_start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache, layer, cache_start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Named `model` inside `DiffusionLM` so parameter names match HF Llama (`model.layers.0...`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DiffusionLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attn_mask: torch.Tensor | None,
        cache: KVCache | None = None,
        cache_start: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """Final-norm hidden states. attn_mask: bool [batch or 1, 1, q_len, k_len] (True = attend), or None
        for full bidirectional attention. With a `KVCache`, k_len = cache_start + q_len; with a `StaticKVCache`,
        cache_start is the tensor of the columns being written and k_len is the cache's width."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope_table(x.dtype, x.device)
        cos, sin = cos[position_ids], sin[position_ids]
        for i, layer in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(
                    layer, x, cos, sin, attn_mask, None, i, 0, use_reentrant=False
                )
            else:
                x = layer(x, cos, sin, attn_mask, cache, i, cache_start)
        return self.model.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        cache_start: int = 0,
    ) -> torch.Tensor:
        """Logits [batch, seq, vocab]. Without position_ids, positions are cache_start + 0..seq-1."""
        if position_ids is None:
            s = input_ids.shape[1]
            position_ids = torch.arange(cache_start, cache_start + s, device=input_ids.device)[None].expand(
                input_ids.shape[0], s
            )
        return self.lm_head(self.hidden_states(input_ids, position_ids, attn_mask, cache, cache_start))

    def rope_table(self, dtype: torch.dtype, device: torch.device):
        """cos/sin for every position, computed once per dtype/device (decoding calls forward per token)."""
        key = (dtype, device)
        table = getattr(self, "_rope_table", None)
        if table is None or table[0] != key:
            pos = torch.arange(self.config.max_position_embeddings, device=device)[None]
            cos, sin = rope_cos_sin(pos, self.config.head_dim, self.config.rope_theta, dtype)
            self._rope_table = table = (key, cos[0], sin[0])
        return table[1], table[2]

    def new_cache(self, batch: int, max_len: int, static: bool = False) -> KVCache:
        return (StaticKVCache if static else KVCache)(self.config, batch, max_len, self.dtype, self.device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(self, input_ids, **kwargs):
        """The official Stable-DiffCoder `generate` call, served by `diffcoder.decoding.generate`."""
        from diffcoder.decoding import generate

        return generate(self, input_ids, **kwargs)


def init_weights(model: DiffusionLM, std: float = 0.02, seed: int | None = None) -> None:
    """Random init for tests and from-scratch runs (normal(0, std) linears and embeddings, unit norms)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * std)

