#!/usr/bin/env bash
# One script for a lent GPU machine: install the carried wheels, run the GPU tests that can
# run there, and benchmark the PyTorch CUDA path (plain, with CUDA graphs of the UNet, with
# whole-step graphs, compiled with inductor, with each UNet switch) against diffusers (plain
# and with torch.compile) on SD-1.5 shapes, then profile the loop.
#   bash bench/gpu_check.sh                        every stage: tests table profile compiled
#                                                  compiled4 lcm taesd cutoff previews
#   bash bench/gpu_check.sh tests:150 table:200    those stages, each cut off after N seconds
# A device call lasts 10 minutes at most: give each stage a limit, so that one slow stage
# (inductor compiles SD-1.5's UNet once per shape, not yet timed on a GPU) cannot starve
# the rest. A bench cut off leaves the rows it finished in bench_NAME.json ("complete":
# false) and its per-row log lines (p50, UNet ms/call, host ms/step) in bench_NAME.md.
# With PACK=FILE.tgz set, everything under $OUT but the traces is packed into FILE after
# each stage (the device tool brings back 8 files at most).
#
# Prepare here (on the development machine), once:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl \
#     diffusers==0.42.1 polygraphy==0.53.6 onnx_graphsurgeon==0.6.1 importlib_metadata==8.7.0
# then run `bash bench/gpu_check.sh` there with `.whl` carried. The device image has
# PyTorch+CUDA, onnx, onnxruntime (CPU) and transformers, but not TensorRT, whose wheels
# are far too large to carry: the TensorRT tests skip there and say so.
# Each stage runs even if an earlier one failed; the exit status is 1 if any failed.
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

stage_tests() {  # inductor's compile last: a stage cut off at its limit loses it alone
  echo "== GPU tests (TensorRT ones skip without TensorRT) =="
  local status=0
  for only in "not compile_unet" "compile_unet"; do
    python3 -P -m pytest -q -m gpu tests/test_gpu.py -k "$only" -p no:cacheprovider -rs \
      --durations=5 2>&1 | tee -a "$OUT/gpu_tests.txt" || status=1
  done
  return $status
}

bench() {  # name, extra bench args
  local name=$1; shift
  echo "== $name: sd15-random 512x512, 50 steps, strength 0.8, fp16 =="
  python3 -P -m sdtrt.cli bench --model sd15-random --device cuda --dtype fp16 \
    --height 512 --width 512 --steps 50 --strength 0.8 --batch 1,4 --warmup 2 --repeats 5 \
    --json "$OUT/bench_$name.json" "$@" 2>&1 | tee "$OUT/bench_$name.md"
}
# Issue 15's table, one run (rows side by side, ratios against diffusers): plain, the UNet
# as a CUDA graph, whole steps as CUDA graphs, and each UNet switch alone over step graphs
# (keep what measures faster).
stage_table() {
  bench table --backends torch,torch+cuda-graphs,torch+step-graphs,\
torch+step-graphs+channels-last,torch+step-graphs+fuse-qkv,diffusers
}
# Where the loop's time goes: GPU busy vs idle per step (traces in $OUT/traces, Perfetto).
stage_profile() {
  bench profile --batch 1 --repeats 2 --profile "$OUT/traces" \
    --backends torch+cuda-graphs,torch+step-graphs,diffusers \
    && gzip -f "$OUT"/traces/*.json
}
# Inductor under the step graphs against diffusers' torch.compile peer (which compiles a
# channels-last UNet), beside plain diffusers; then sdtrt's compile on a channels-last UNet
# too, last, so that a cut-off loses it alone. Each compiles per shape in its first run
# (first_run_ms - p50 is the compile): batch 1 only by default (`--batch 1,4` compiles
# each twice).
stage_compiled() {
  bench compiled --batch 1 --backends \
    diffusers,torch+step-graphs+compile,diffusers-compile,torch+step-graphs+channels-last+compile
}

# The same peers at batch 4 (issue 15's second batch size), for a call of its own.
stage_compiled4() {
  bench compiled4 --batch 4 --backends diffusers,torch+step-graphs+compile,diffusers-compile
}

# LCM-LoRA's recipe (4 steps at strength 0.5, guidance 1: two one-row UNet calls), where
# what runs around the UNet (text encoder, VAE, host work) is most of a request.
stage_lcm() {
  bench lcm --batch 1 --scheduler lcm --steps 4 --strength 0.5 --guidance 1 \
    --backends torch,torch+cuda-graphs,torch+step-graphs,diffusers
}

# TAESD's architecture (random weights: the same work) against SD's VAE in that recipe, one
# process (python -m sdtrt.bench.vae_ab): what the VAE's share becomes on a GPU.
stage_taesd() {
  python3 -P -m sdtrt.bench.vae_ab --model sd15-random --device cuda --dtype fp16 \
    --size 512 --repeats 5 2>&1 | tee "$OUT/vae_ab.txt"
}

# What the stream's previews cost a request on SD-1.5 shapes: SD's VAE against TAESD's
# architecture (--preview-vae), after every 5th and every step (python -m
# sdtrt.bench.preview_ab).
stage_previews() {
  python3 -P -m sdtrt.bench.preview_ab --model sd15-random --device cuda --dtype fp16 \
    --size 512 --steps 20 --repeats 5 2>&1 | tee "$OUT/preview_ab.txt"
}

# Guidance cut off after 40% of the steps (sdtrt's GuidanceCutoffCallback, diffusers' row
# running it too): the later steps on B rows, step graphs replaying a second capture.
stage_cutoff() {
  bench cutoff --guidance-cutoff 0.4 --backends torch+step-graphs,diffusers
}

STAGES="tests table profile compiled compiled4 lcm taesd cutoff previews"
[ $# -gt 0 ] || set -- $STAGES
for arg in "$@"; do
  stage=${arg%%:*}
  limit=$([ "$stage" = "$arg" ] && echo 0 || echo "${arg#*:}")  # 0: no limit
  case " $STAGES " in
    *" $stage "*) ;;
    *) echo "unknown stage $stage (stages: $STAGES)"; exit 2 ;;
  esac
  export -f "stage_$stage" bench
  export OUT
  timeout -k 10 "$limit" bash -o pipefail -c "stage_$stage" || fail "$stage (exit $?)"
  [ -z "${PACK:-}" ] || tar czf "$PACK" -C "$OUT" --exclude=traces .
done
exit $status
