#!/usr/bin/env bash
# One script for a lent GPU machine (about 8 minutes): install the carried wheels, run the
# GPU tests that can run there, and benchmark the PyTorch CUDA path against diffusers.
#
# Prepare here (on the development machine), once:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers polygraphy onnx-graphsurgeon onnxscript onnx-ir safetensors \
#     huggingface-hub tqdm
# then run `bash bench/gpu_check.sh` there with `.whl` carried. The device image has
# PyTorch+CUDA, onnx, onnxruntime (CPU) and transformers, but not TensorRT, whose wheels
# are far too large to carry: the TensorRT tests skip there and say so.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/.sdtrt-src
fi
# The package layout maps root folders to sdtrt.*: make it importable without installing.
mkdir -p .sdtrt-src/sdtrt
cp -r sdtrt/* .sdtrt-src/sdtrt/
for part in export engine runtime bench; do rm -rf ".sdtrt-src/sdtrt/$part"; cp -r "$part" ".sdtrt-src/sdtrt/$part"; done
export PYTHONPATH=${PYTHONPATH:-}:$PWD/.sdtrt-src
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

echo "== GPU tests (TensorRT ones skip without TensorRT) =="
python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -rs 2>&1 | tee "$OUT/gpu_tests.txt" || true

echo "== torch CUDA fp16 (plain, CUDA graphs) vs diffusers fp16: sd15-random 512x512, 50 steps, strength 0.8 =="
python3 -m sdtrt.cli bench --model sd15-random --backends torch,diffusers --device cuda --dtype fp16 \
  --height 512 --width 512 --steps 50 --strength 0.8 --batch 1 --warmup 1 --repeats 5 \
  --json "$OUT/bench_plain.json" | tee "$OUT/bench_plain.md"
python3 -m sdtrt.cli bench --model sd15-random --backends torch --device cuda --dtype fp16 \
  --cuda-graphs --height 512 --width 512 --steps 50 --strength 0.8 --batch 1 --warmup 1 \
  --repeats 5 --json "$OUT/bench_graphs.json" | tee "$OUT/bench_graphs.md"
