#!/usr/bin/env bash
# One script for a lent GPU machine: install the carried wheels, run the GPU tests that can
# run there, and benchmark the PyTorch CUDA path (plain, with CUDA graphs of the UNet, with
# whole-step graphs, with each UNet switch) against diffusers (plain and with
# torch.compile) on SD-1.5 shapes, then profile the loop. `bash bench/gpu_check.sh` runs
# every stage; `bash bench/gpu_check.sh table switches` only those. A device call lasts 10
# minutes at most and none of these stages has run yet; estimates from the earlier stages
# (5 minutes on an H200 for tests and two bench runs): `tests table` first, then
# `switches profile`, then `compiled` (inductor compiles SD-1.5's UNet once per shape,
# four shapes at batches 1 and 4, each likely a minute or more).
#
# Prepare here (on the development machine), once:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl \
#     diffusers==0.42.1 polygraphy==0.53.6 onnx_graphsurgeon==0.6.1 importlib_metadata==8.7.0
# then run `bash bench/gpu_check.sh` there with `.whl` carried. The device image has
# PyTorch+CUDA, onnx, onnxruntime (CPU) and transformers, but not TensorRT, whose wheels
# are far too large to carry: the TensorRT tests skip there and say so.
# Each step runs even if an earlier one failed; the exit status is 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
fail() { echo "!! failed: $1"; status=1; }

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
# The package layout maps root folders to sdtrt.*: make it importable without installing
# (python3 -P: the checkout's own sdtrt/ folder must not shadow the copy).
rm -rf .sdtrt-src && mkdir -p .sdtrt-src/sdtrt
cp -r sdtrt/* .sdtrt-src/sdtrt/
for part in export engine runtime bench serve train; do cp -r "$part" ".sdtrt-src/sdtrt/$part"; done
export PYTHONPATH=/tmp/site:$PWD/.sdtrt-src
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"

stage_tests() {
  echo "== GPU tests (TensorRT ones skip without TensorRT) =="
  python3 -P -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -rs 2>&1 \
    | tee "$OUT/gpu_tests.txt"
}

bench() {  # name, extra bench args
  local name=$1; shift
  echo "== $name: sd15-random 512x512, 50 steps, strength 0.8, fp16 =="
  python3 -P -m sdtrt.cli bench --model sd15-random --device cuda --dtype fp16 \
    --height 512 --width 512 --steps 50 --strength 0.8 --batch 1,4 --warmup 2 --repeats 5 \
    --json "$OUT/bench_$name.json" "$@" | tee "$OUT/bench_$name.md"
}
# Issue 15's table, each stage one run (rows side by side, ratios against diffusers):
# plain, the UNet as a CUDA graph, whole steps as CUDA graphs.
stage_table() { bench table --backends torch,torch+cuda-graphs,torch+step-graphs,diffusers; }
# The UNet switches, each alone over step graphs: keep what measures faster.
stage_switches() {
  bench switches --batch 1 \
    --backends torch+step-graphs,torch+step-graphs+channels-last,torch+step-graphs+fuse-qkv,diffusers
}
# Inductor against diffusers' torch.compile peer (each compiles per shape in its first
# runs: first_run_ms - p50 is the compile).
stage_compiled() {
  bench compiled --backends torch+step-graphs+compile,diffusers,diffusers-compile
}
# Where the loop's time goes: GPU busy vs idle per step (traces in $OUT/traces, Perfetto).
stage_profile() {
  bench profile --batch 1 --repeats 2 --profile "$OUT/traces" \
    --backends torch+cuda-graphs,torch+step-graphs,diffusers \
    && gzip -f "$OUT"/traces/*.json
}

STAGES="tests table switches compiled profile"
[ $# -gt 0 ] || set -- $STAGES
for stage in "$@"; do
  case " $STAGES " in
    *" $stage "*) "stage_$stage" || fail "$stage" ;;
    *) echo "unknown stage $stage (stages: $STAGES)"; exit 2 ;;
  esac
done
exit $status
