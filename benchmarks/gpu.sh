#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md in one command, so that one lease of a GPU machine yields
# them all with the reference rows from the same run (ratios need both in one run).
#
#   OUT=/tmp/gpu ANCHORS=../shared/bench/anchors.py bash benchmarks/gpu.sh
#
# OUT: where the JSON results, the profile summaries, the optimized HLO and the loss curves go.
# ANCHORS: the reference script (copy it inside the repository where only the repository
# travels to the GPU machine). STAGES: a subset of "anchors128 variants128 seq512 curves"
# (default all), in the order they run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a folder for the results}
ANCHORS=${ANCHORS:-../shared/bench/anchors.py}
STAGES=${STAGES:-anchors128 variants128 seq512 curves}
mkdir -p "$OUT"
step() { python3 benchmarks/train_step.py --steps=30 "$@" 2>&1 | grep -v -i 'warn\|deprecat'; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -c 'import jax, jaxlib; print("jax", jax.__version__, "jaxlib", jaxlib.__version__, jax.devices())'

for stage in $STAGES; do
  echo "=== $stage"
  case $stage in
    anchors128)  # The bf16 step with the masked-only head against every reference row, profiled.
      step --dtype=bfloat16 --masked_head --compare --anchors="$ANCHORS" \
        --json="$OUT/bf16_128.json" --profile="$OUT/profile_bf16_128" ;;
    variants128)  # What each lever is worth, at the same shape.
      step --dtype=bfloat16 --json="$OUT/bf16_fullhead_128.json"
      step --masked_head --json="$OUT/f32_128.json"
      step --json="$OUT/f32_fullhead_128.json" ;;
    seq512)
      step --dtype=bfloat16 --masked_head --seq=512 --batch=32 --compare \
        --anchors="$ANCHORS" --json="$OUT/bf16_512.json" ;;
    curves)  # float32 vs the bf16 step over a few hundred steps of the default run.
      python3 benchmarks/loss_curves.py --out="$OUT/curves" --steps=400 2>&1 | tail -12 ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
