"""Fill-in-the-middle (FIM): the special tokens that put a document's suffix before its middle.

Under block-causal attention a span sees only what precedes it, so infilling reorders the document as
prefix, suffix, middle (the middle is generated last and ends with EOS). A checkpoint without FIM tokens
gets ours, added like the mask token (mean-row init), and learns them from FIM-transformed CPT data.
"""

from __future__ import annotations

# Our names, in prompt order: <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|> middle EOS.
FIM_PREFIX = "<|fim_prefix|>"
FIM_SUFFIX = "<|fim_suffix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_TOKENS = (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE)

__all__ = ["FIM_PREFIX", "FIM_SUFFIX", "FIM_MIDDLE", "FIM_TOKENS"]
