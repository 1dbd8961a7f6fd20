"""Tiny, self-contained models and tokenizers for tests and examples (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

from diffcoder.model import DiffusionLM, ModelConfig, init_weights

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
_SAMPLE_TEXT = [
    "def add(a, b):\n    return a + b\n",
    "def is_palindrome(s):\n    return s == s[::-1]\n",
    "for i in range(10):\n    print(i)\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
    "Write a Python function that sums a list of numbers.",
    "import os\nimport sys\n\nif __name__ == '__main__':\n    main()\n",
]


def tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer (trained on a few lines of code) with ChatML and a mask token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_SAMPLE_TEXT * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        mask_token="<|mask|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_config(**overrides) -> ModelConfig:
    cfg = dict(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
        mask_token_id=3,
        block_size=4,
        shift=False,
    )
    cfg.update(overrides)
    return ModelConfig(**cfg)


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, std: float = 0.02, **overrides) -> DiffusionLM:
    """A random tiny model. A larger `std` gives peakier, more varied predictions (useful for decoding tests)."""
    model = DiffusionLM(tiny_config(**overrides))
    init_weights(model, std=std, seed=seed)
    return model.to(dtype).eval()


def write_tiny_checkpoint(path: str | Path, seed: int = 0, with_tokenizer: bool = True, **overrides) -> Path:
    """A real checkpoint directory (config.json, model.safetensors, tokenizer files) of a random tiny model."""
    from diffcoder.checkpoint import save_checkpoint

    tokenizer = tiny_tokenizer() if with_tokenizer else None
    if tokenizer is not None:
        overrides.setdefault("vocab_size", len(tokenizer))
        overrides.setdefault("mask_token_id", tokenizer.mask_token_id)
        overrides.setdefault("eos_token_id", tokenizer.eos_token_id)
    model = tiny_model(seed=seed, std=overrides.pop("std", 0.5), **overrides)
    return save_checkpoint(model, path, tokenizer=tokenizer)


def tiny_fim_tokenizer(names: tuple[str, ...] | None = None, extra: tuple[str, ...] = (), bos: bool = False):
    """`tiny_tokenizer` plus FIM tokens (ours unless `names` gives another spelling) and `extra` special tokens
    (e.g. an end-of-middle token), appended in that order. bos=True: it puts its BOS before text, as Llama's do."""
    from tokenizers import processors

    from diffcoder.fim import FIM_TOKENS

    tok = tiny_tokenizer()
    tok.add_tokens(list(names or FIM_TOKENS) + list(extra), special_tokens=True)
    if bos:
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    return tok


def write_tiny_fim_checkpoint(path: str | Path, seed: int = 0, names: tuple[str, ...] | None = None,
                              extra: tuple[str, ...] = (), **overrides) -> Path:
    """A real checkpoint directory of a random tiny model whose tokenizer has FIM tokens (see tiny_fim_tokenizer)."""
    from diffcoder.checkpoint import save_checkpoint

    tokenizer = tiny_fim_tokenizer(names, extra)
    overrides.setdefault("vocab_size", len(tokenizer))
    overrides.setdefault("mask_token_id", tokenizer.mask_token_id)
    overrides.setdefault("eos_token_id", tokenizer.eos_token_id)
    model = tiny_model(seed=seed, std=overrides.pop("std", 0.5), **overrides)
    return save_checkpoint(model, path, tokenizer=tokenizer)
