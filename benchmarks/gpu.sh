#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md in one command, so that one run on a GPU machine yields
# them all with the reference rows from the same run (ratios need both in one run).
#
#   OUT=/tmp/gpu ANCHORS=.bench/anchors.py bash benchmarks/gpu.sh
#   DRY_RUN=1 OUT=/tmp/x bash benchmarks/gpu.sh      # every stage on CPU, tiny shapes, ~4 min
#                                                    # (~20 min where torch imports: anchors.py)
#
# OUT: where the JSON results, the profile summaries, the optimized HLO and the loss curves go.
# ANCHORS: the reference script, `anchors.py` (PyTorch eager, torch.compile and ModernBERT
# rows; default .bench/anchors.py, a folder git ignores, where only the repository reaches
# the GPU machine). STAGES: a subset of the stages below (default all), run in the
# order given: the most wanted first, so that a run cut short leaves the rest for a rerun.
# PACK: a folder to receive the few files worth bringing back (the device returns at most 8):
# summary.json, loss_curves.png and results.tgz (every JSON, the profile summaries and the HLO;
# not the raw traces); `gpu_summary.py OUT --pack DIR` does the same after a run cut short.
# DRY_RUN=1: tiny shapes and 2 steps everywhere (the ModernBERT stage and the curves too), no
# nvidia-smi, and the anchors.py rows only where torch imports (eager only: torch.compile on
# CPU takes minutes); it checks the plumbing, not the figures.
#
# Time on one H200 (estimates: jax compiles a variant in ~20-60 s, torch.compile a row in ~1
# min, and each jax process spends ~10 s starting), about 8 minutes in all:
#   anchors128  ~2.5 min  torch eager + 2 torch.compile rows, our bf16 step profiled
#   modernbert  ~2   min  torch-modernbert eager + compile, our bf16 step
#   variants128 ~1.5 min  three jax variants
#   seq512      ~0.7 min  torch eager rows only (COMPILE=0), our bf16 step
#   curves      ~1   min  two 200-step runs of the default config
#   modernbert8k ~3  min  ModernBERT-base, 1 x 8192, bf16: ours (auto, cudnn) vs PyTorch sdpa
#                         and FlashAttention-2 where flash-attn imports (long_context.py)
#   modernbert_cudnn ~1 min  our ModernBERT step, global layers through cuDNN (if time is left)
#   rbg128      ~0.5 min  the bf16 step with 'rbg' keys, random bits not by Threefry (ditto)
# Each stage prints its elapsed seconds; wrap the command in `timeout 540` so that a run over
# its estimate still returns its log (then pack with gpu_summary.py), and rerun the missing
# stages with STAGES.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a folder for the results}
ANCHORS=${ANCHORS:-.bench/anchors.py}
STAGES=${STAGES:-anchors128 modernbert variants128 seq512 curves modernbert8k modernbert_cudnn rbg128}
DRY_RUN=${DRY_RUN:-0}
PACK=${PACK:-}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# JAX's compiled programs kept outside OUT (not packed), on the machine's disk: a rerun of the
# stages a timeout cut short, on the still-warm machine, compiles nothing the first run did.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-${TMPDIR:-/tmp}/mlm_jax_gpu_cache}

if [ "$DRY_RUN" = 1 ]; then
  STEPS=2 CURVE_STEPS=6
  small="--warmup=1 --pipeline_blocks=200 --pipeline_batches=5 --profile_steps=2"
  # Appended after each stage's own flags, so that these win.
  TINY="--layers=2 --hidden=64 --heads=4 --intermediate=128 --vocab=512 --seq=32 --batch=4 $small"
  TINY_MB="--layers=3 --hidden=64 --heads=4 --intermediate=96 --vocab=512 --seq=64 --window=16"
  TINY_MB="$TINY_MB --batch=2 $small"
  export COMPILE=0  # anchors.py: eager rows only.
  CUDNN=""  # No cuDNN off GPU: the stage runs XLA's attention.
  LONG="--shape=small --seqs 512 --impls auto"  # On CPU: no --gpu, no cuDNN.
  if python3 -c 'import torch' 2>/dev/null; then
    COMPARE="--compare --anchors=$ANCHORS --force"  # --force: off GPU and at tiny shapes.
  else
    COMPARE=""
    echo "dry run: torch does not import here, so the anchors.py rows are skipped"
  fi
else
  STEPS=30 CURVE_STEPS=200 TINY="" TINY_MB="" CUDNN="--attention=cudnn"
  LONG="--gpu --shape=base --seqs 8192 --impls auto cudnn"
  COMPARE="--compare --anchors=$ANCHORS"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
fi
python3 -c 'import jax, jaxlib; print("jax", jax.__version__, "jaxlib", jaxlib.__version__, jax.devices())'

# The package's train step; $TINY (a dry run's shape) last. MFU against 790 and 989 TFLOP/s.
step() {
  python3 benchmarks/train_step.py --steps=$STEPS --peak_tflops 790 989 "$@" $TINY 2>&1 |
    grep -v -i 'warn\|deprecat' || { echo "FAILED: train_step.py $*"; status=1; }
}

run_stage() {
  case $1 in
    anchors128)  # The bf16 step with the masked-only head against every reference row, profiled.
      step --dtype=bfloat16 --masked_head $COMPARE \
        --json="$OUT/bf16_128.json" --profile="$OUT/profile_bf16_128" ;;
    modernbert)  # ModernBERT-base, 8 x 1024, against anchors.py torch-modernbert (eager, compile).
      TINY=$TINY_MB step --preset=modernbert-base --dtype=bfloat16 --masked_head $COMPARE \
        --json="$OUT/modernbert_bf16_1024.json" ;;
    variants128)  # What each lever is worth, at the same shape.
      step --dtype=bfloat16 --json="$OUT/bf16_fullhead_128.json"
      step --masked_head --json="$OUT/f32_128.json"
      step --json="$OUT/f32_fullhead_128.json" ;;
    seq512)  # Eager reference rows only: two more torch.compile rows would not fit the lease.
      COMPILE=0 step --dtype=bfloat16 --masked_head --seq=512 --batch=32 $COMPARE \
        --json="$OUT/bf16_512.json" ;;
    modernbert_cudnn)  # Its global layers through cuDNN's fused attention (no dropout there;
      # the sliding-window layers stay XLA's): does it pay at 1024 tokens?
      TINY=$TINY_MB step --preset=modernbert-base --dtype=bfloat16 --masked_head $CUDNN \
        --json="$OUT/modernbert_bf16_1024_cudnn.json" ;;
    rbg128)  # Dropout and masking bits from XLA's RngBitGenerator ('rbg' keys), not Threefry.
      JAX_DEFAULT_PRNG_IMPL=rbg step --dtype=bfloat16 --masked_head --json="$OUT/bf16_128_rbg.json" ;;
    modernbert8k)  # ModernBERT-base at 8,192 tokens, one train step (full logits), in bf16:
      # ours (auto: blocked attention; cudnn: its global layers fused) against PyTorch sdpa and
      # FlashAttention-2 where flash-attn imports. Each side in its own process, peak memory its own.
      if python3 -c 'import torch' 2>/dev/null; then
        fa2=$(python3 -c 'import flash_attn' 2>/dev/null && echo flash_attention_2)
        python3 benchmarks/long_context.py $LONG --dtype=bfloat16 --torch-attn sdpa $fa2 \
          --steps=5 --json="$OUT/modernbert_8192.json" 2>&1 | grep -v -i 'warn\|deprecat\|shards'
      else
        echo "modernbert8k: torch does not import here; the stage needs it"
      fi ;;
    curves)  # float32 vs the bf16 step over the default run, on the same batches.
      python3 benchmarks/loss_curves.py --out="$OUT/curves" --steps=$CURVE_STEPS 2>&1 | tail -12 ;;
    *) echo "unknown stage $1"; return 2 ;;
  esac
}

status=0
for stage in $STAGES; do
  echo "=== $stage"
  start=$SECONDS
  run_stage "$stage" || status=1
  echo "=== $stage done in $((SECONDS - start)) s"
done

python3 benchmarks/gpu_summary.py "$OUT" ${PACK:+--pack "$PACK"} || status=1
exit $status
