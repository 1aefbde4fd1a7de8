#!/usr/bin/env bash
# The prefill/decode benchmark end to end on a GPU machine, in one command:
#
#     bash benchmarks/gpu.sh                # set up .venv (PyPI's default torch wheel: a CUDA build), then run
#     FASTKV_PYTHON=python3 bash benchmarks/gpu.sh   # use an environment that already has torch with CUDA
#
# qwen2.5-0.5b at 8K, 16K and 32K tokens: prefill and decode for FullKV, SnapKV and FastKV against
# transformers, timed (CUDA-synchronized) in one run, then peak CUDA memory in a second run (the
# allocator's peak beyond what was held before each prefill). Results go to benchmarks/results/gpu-*.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${FASTKV_PYTHON:-}" ]; then
  bash scripts/setup.sh
  FASTKV_PYTHON=.venv/bin/python
elif ! "$FASTKV_PYTHON" -c "import fastkv" 2>/dev/null; then
  echo "fastkv is not importable from $FASTKV_PYTHON: pip install -e . into that environment first" >&2
  exit 2
fi
"$FASTKV_PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: torch ' + torch.__version__)"
name=$("$FASTKV_PYTHON" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")
out=benchmarks/results/gpu-$name
args=(--device cuda --lengths 8192,16384,32704 --decode-lengths 8192,16384,32704 --methods fullkv,snapkv,fastkv)
for dtype in bfloat16 float32; do
  "$FASTKV_PYTHON" benchmarks/prefill_decode.py "${args[@]}" --dtype "$dtype" --json "$out-$dtype.json" | tee "$out-$dtype.txt"
  "$FASTKV_PYTHON" benchmarks/prefill_decode.py "${args[@]}" --dtype "$dtype" --memory --decode-lengths "" \
    | tee "$out-$dtype-memory.txt"
done
echo "results: $out-*"
