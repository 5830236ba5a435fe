"""Throughput of the package's real train step, and of the host input pipeline that feeds it.

The step is `mlm_jax.steps.compile_steps(...).train`: on-device masking, forward and
backward through a `FlaxAutoModelForMaskedLM` (RoBERTa, or ModernBERT with
--preset=modernbert-base; random init, sized from the flags), the package's optimizer (clip + AdamW with the decay mask) and the non-finite
guard, jit-compiled over the package's mesh (`sharding.make_mesh(--fsdp)`) with the state
created sharded by `steps.init_train_state` and donated. Its input is a [grad_accum_steps=1, rows, seq]
batch of random token ids placed with `sharding.shard_batch(..., batch_axis=1)`, as the
training loop places its batches.

Timing, after `--warmup` steps (the first of which compiles):
  * synced: each of `--steps` steps is timed alone, ending in `block_until_ready`;
    median and mean are reported;
  * back-to-back: `--steps` steps dispatched in a row, one `block_until_ready` at the
    end (the way the training loop and the reference rows of anchors.py run).

FLOPs the step executes (the standard full-model accounting, as in ../shared/bench/anchors.py,
with the head counted where it runs):
  flops_per_token = 6 * (N_body + N_head * head_share) + 12 * layers * seq * hidden
  N_body = every parameter outside the embedding tables and the LM head (encoder layers with
      their biases and LayerNorms) but the last layer's past its attention's query, key and
      value; N_head = those (which with the masked-only head run on its rows alone,
      `layers.LayerStack`) + the LM head's dense + LayerNorm + output bias + the vocabulary
      projection (vocab * hidden: the decoder, tied to the word embeddings).
  6 * N is the forward (2) + backward (4) matmul FLOPs per token; the second term is the
  attention scores (Q K^T) and context (A V): 2 * 2 * seq * hidden per token per layer
  forward, times 3 for forward + backward. head_share is 1 for the full head (the step
  computes every position's logits) and max_predictions(seq, rate) / seq with
  --masked_head (the head runs on that many gathered tokens per row, masked or not): MFU
  counts what the step computes, not the full head it no longer runs.
  ModernBERT's names differ (layers/N/attn/Wqkv and attn_norm run on every token, head and
  decoder on the head's rows) but the count is the same, except that a local layer's
  attention term counts its window's keys (min(window, seq)) instead of seq, as anchors.py
  does (XLA's attention still computes every logit: MFU counts the model's work).
  MFU = tokens/s per device * flops_per_token / (peak * 1e12), once per peak of
  --peak_tflops (default on GPU: 790 bf16 TFLOP/s, the anchors' figure, and 989, the
  datasheet's dense bf16; on other platforms MFU is only printed when --peak_tflops is given).

The host pipeline figure is how many batches per second `input_pipeline.train_batches`
+ `sharding.shard_batch` produce at this shape from a synthetic array of
`--pipeline_blocks` blocks, measured alone (not overlapped with steps); its ratio to the
step's consumption rate (steps/s, from the median step) says whether the host keeps up
(> 1) or starves the device (< 1).

`--compare` runs ../shared/bench/anchors.py (mode torch for RoBERTa, torch-modernbert for
ModernBERT, or --anchor_modes; each a subprocess, at this --batch, --seq and --steps) before this process touches the accelerator, so each
gets the whole GPU; anchors.py's own environment knobs (VARIANTS, COMPILE, NODROP) pass
through. The ratio printed per row is our back-to-back tokens/s per device over the row's.

Usage:
  python benchmarks/train_step.py --preset=cpu-small            # seconds on 2 CPU cores
  python benchmarks/train_step.py                               # distilroberta-base shape, float32
  python benchmarks/train_step.py --dtype=bfloat16 --steps=50 --json=/tmp/step.json
  python benchmarks/train_step.py --compare                     # + anchors.py rows (GPU)
  python benchmarks/train_step.py --preset=modernbert-base --dtype=bfloat16 --masked_head --compare
  python benchmarks/train_step.py --preset=cpu-small --layers=4 --batch=64   # flags override a preset
  python benchmarks/train_step.py --preset=cpu-small --masking=whole_word    # vs token masking
"""

import argparse
import dataclasses
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
import transformers
from flax import traverse_util

import profile_summary
from mlm_jax.data import input_pipeline
from mlm_jax import host_memory
from mlm_jax import masking
from mlm_jax import model as model_lib
from mlm_jax import optim
from mlm_jax import sharding
from mlm_jax import steps as steps_lib
from mlm_jax import validation
from mlm_jax.data import tokenizer as tokenizer_lib
from mlm_jax.models import FlaxAutoModelForMaskedLM
from mlm_jax.models import layers

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
ANCHORS = REPO_ROOT.parent / 'shared' / 'bench' / 'anchors.py'
GPU_PEAK_TFLOPS = 790.0  # bf16 dense, the figure anchors.py divides by.
SEED = 0


@dataclasses.dataclass(frozen=True)
class Shape:
  layers: int
  hidden: int
  heads: int
  intermediate: int
  vocab: int
  seq: int
  batch: int  # Rows per device per step.
  dtype: str = 'float32'
  masked_head: bool = False  # The vocabulary head on masked positions only (config.masked_lm_head).
  attention: str = 'auto'  # config.attention_impl (models/attention.py; docs/long_context.md).
  masking: str = 'token'  # config.masking: 'token' or 'whole_word'.
  model_type: str = 'roberta'  # 'roberta' or 'modernbert' (the registry's model_type).
  mask_probability: float = 0.15  # config.mlm_probability (ModernBERT trains with 0.3).
  window: int = 128  # ModernBERT's local_attention: the whole sliding window, in tokens.
  global_every: int = 3  # ModernBERT's global_attn_every_n_layers.
  remat_policy: str = 'none'  # config.remat_policy (see layers.REMAT_POLICIES).

  def describe(self) -> str:
    family = self.model_type
    if self.model_type == 'modernbert':
      family += f' (window {self.window}, global every {self.global_every})'
    return (f'{family}, {self.layers} layers, hidden {self.hidden}, {self.heads} heads, '
            f'intermediate {self.intermediate}, vocab {self.vocab}, seq {self.seq}, batch '
            f'{self.batch}/device, {self.dtype}, {"masked-only" if self.masked_head else "full"} '
            f'vocabulary head, {self.attention} attention, {self.masking} masking at '
            f'{self.mask_probability:g}, remat {self.remat_policy}')

  def keys_per_layer(self) -> list[int]:
    """Keys each query attends to, per layer: a local layer sees its window (as anchors.py
    counts it; XLA's attention still computes every [seq, seq] logit, cuDNN's need not)."""
    if self.model_type != 'modernbert':
      return [self.seq] * self.layers
    return [self.seq if i % self.global_every == 0 else min(self.window, self.seq)
            for i in range(self.layers)]


PRESETS = {
    'distilroberta-base': Shape(layers=6, hidden=768, heads=12, intermediate=3072, vocab=50265,
                                seq=128, batch=128),
    # ModernBERT-base's encoder (answerdotai/ModernBERT-base's config.json) at anchors.py
    # torch-modernbert's shape: 8 x 1024 tokens, masking rate 0.3 as it was pretrained.
    'modernbert-base': Shape(layers=22, hidden=768, heads=12, intermediate=1152, vocab=50368,
                             seq=1024, batch=8, model_type='modernbert', mask_probability=0.3),
    'cpu-small': Shape(layers=2, hidden=128, heads=4, intermediate=512, vocab=4096, seq=64,
                       batch=32),
}
# The shapes anchors.py measures (their batch and sequence length are settable), and its modes
# that measure them. Its `jax` mode (transformers' Flax RoBERTa) needs transformers < 5: pass
# --anchor_modes=jax,torch where that is installed (fetch-wheels.sh --flax-anchor).
ANCHOR_DIMS = {
    'roberta': dict(layers=6, hidden=768, heads=12, intermediate=3072, vocab=50265),
    'modernbert': dict(layers=22, hidden=768, heads=12, intermediate=1152, vocab=50368,
                       window=128, global_every=3),
}
ANCHOR_MODES = {'roberta': 'torch', 'modernbert': 'torch-modernbert'}
# Per-device bf16 peaks MFU is given against on GPU: anchors.py's measured 790 TFLOP/s and the
# H100/H200 datasheet's dense 989.
GPU_PEAKS_TFLOPS = (GPU_PEAK_TFLOPS, 989.0)


# ----------------------------------------------------------------------------
# Flags.


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--preset', choices=sorted(PRESETS), default='distilroberta-base',
                      help='base shape; the shape flags below override its fields')
  for field in ('layers', 'hidden', 'heads', 'intermediate', 'vocab', 'seq', 'batch', 'window',
                'global_every'):
    parser.add_argument(f'--{field}', type=int, default=None)
  parser.add_argument('--mask_probability', type=float, default=None,
                      help="masking rate; default the preset's (0.15, ModernBERT 0.3)")
  parser.add_argument('--dtype', choices=sorted(model_lib.DTYPES), default=None,
                      help='computation dtype (parameters stay float32); default float32')
  parser.add_argument('--attention', choices=sorted(layers.ATTENTION_IMPLS), default=None,
                      help='config.attention_impl (cudnn: GPU only); default auto')
  parser.add_argument('--remat_policy', choices=sorted(layers.REMAT_POLICIES), default=None,
                      help="each layer rematerialised under this policy (config.remat_policy)")
  parser.add_argument('--masking', choices=masking.SCHEMES, default=None,
                      help='the masking scheme (config.masking); default token')
  parser.add_argument('--masked_head', action='store_true',
                      help='train the vocabulary head on masked positions only')
  parser.add_argument('--fsdp', type=int, default=1,
                      help='devices per fsdp group (sharding.make_mesh); 1 = data parallel')
  parser.add_argument('--steps', type=int, default=20, help='timed steps (each way)')
  parser.add_argument('--warmup', type=int, default=3, help='untimed steps, the first compiles')
  parser.add_argument('--peak_tflops', type=float, nargs='+', default=None,
                      help='per-device peak(s) for MFU, one figure each; default '
                           f'{" ".join(f"{p:g}" for p in GPU_PEAKS_TFLOPS)} on GPU')
  parser.add_argument('--pipeline_blocks', type=int, default=20_000,
                      help='blocks in the synthetic array the host pipeline draws from')
  parser.add_argument('--pipeline_batches', type=int, default=200,
                      help='batches the host-pipeline measurement produces')
  parser.add_argument('--compare', action='store_true',
                      help='also run the reference rows of --anchors (GPU)')
  parser.add_argument('--anchors', type=pathlib.Path, default=ANCHORS,
                      help='the reference script (default: ../shared/bench/anchors.py beside '
                           'the repository; a copy inside it where only the repository travels)')
  parser.add_argument('--anchor_modes', default=None,
                      help='anchors.py modes to run, comma-separated; default torch for '
                           'RoBERTa, torch-modernbert for ModernBERT')
  parser.add_argument('--force', action='store_true',
                      help='--compare even off GPU or at a shape other than the anchors\'')
  parser.add_argument('--json', default=None, metavar='PATH', help='write the results here')
  parser.add_argument('--profile', default=None, metavar='DIR',
                      help='also trace --profile_steps steps with jax.profiler into DIR, print '
                           'the top ops by device time and write the optimized HLO there')
  parser.add_argument('--profile_steps', type=int, default=5)
  args = parser.parse_args(argv)
  if args.steps < 1 or args.warmup < 1:
    parser.error('--steps and --warmup must be at least 1')
  return args


def resolve_shape(args: argparse.Namespace) -> Shape:
  # model_type has no flag: a preset picks the family.
  overrides = {field.name: getattr(args, field.name, None) for field in dataclasses.fields(Shape)
               if getattr(args, field.name, None) is not None}
  return dataclasses.replace(PRESETS[args.preset], **overrides)


# ----------------------------------------------------------------------------
# The step, built from the package.


def model_config(shape: Shape) -> transformers.PretrainedConfig:
  return (modernbert_config if shape.model_type == 'modernbert' else roberta_config)(shape)


def roberta_config(shape: Shape) -> transformers.RobertaConfig:
  """RoBERTa as `model.scratch_model_config` builds it, with the tokenizer's special ids."""
  return transformers.RobertaConfig(
      vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
      num_attention_heads=shape.heads, intermediate_size=shape.intermediate,
      max_position_embeddings=validation.SCRATCH_MAX_LENGTH + 2,  # After pad id 1, as RoBERTa.
      type_vocab_size=1, layer_norm_eps=1e-5, bos_token_id=0, pad_token_id=1, eos_token_id=2)


def modernbert_config(shape: Shape) -> transformers.ModernBertConfig:
  """ModernBERT as answerdotai/ModernBERT-base's config.json has it (8192 positions, the
  config's defaults otherwise), sized from the shape. Its special ids are the BPE tokenizer's
  (pad 0), which `masking_spec` also uses: random ids avoid them either way."""
  return transformers.ModernBertConfig(
      vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
      local_attention=shape.window, global_attn_every_n_layers=shape.global_every,
      max_position_embeddings=max(8192, shape.seq), pad_token_id=0, bos_token_id=1,
      eos_token_id=2, cls_token_id=1, sep_token_id=2)


def optimizer_config() -> ml_collections.ConfigDict:
  """The optimizer fields `optim.make_optimizer` reads, at configs/default.py's values."""
  return ml_collections.ConfigDict(dict(
      learning_rate=2e-3, warmup_steps=50, lr_schedule='linear', max_grad_norm=1.0,
      weight_decay=0.01))


# The fraction of ids that start a word in the run's byte-level BPE (4096 ids, the sample).
WORD_START_FRACTION = 0.66


def masking_spec(shape: Shape) -> masking.MaskingSpec:
  """Masking as for the package's BPE tokenizer: <s> <pad> </s> <unk> <mask> are ids 0-4.

  Whole-word masking gets a random word-start table with the run's BPE's fraction of starts
  (its cost does not depend on which ids start words: a gather and a cumulative sum)."""
  special = tuple(range(len(tokenizer_lib.SPECIAL_TOKENS)))
  table = np.random.default_rng(SEED).random(shape.vocab) < WORD_START_FRACTION
  table[list(special)] = True
  return masking.MaskingSpec(
      mask_token_id=tokenizer_lib.SPECIAL_TOKENS.index('<mask>'), special_ids=special,
      vocab_size=shape.vocab, probability=shape.mask_probability, scheme=shape.masking,
      word_starts=np.packbits(table).tobytes() if shape.masking == 'whole_word' else b'')


def build_step(shape: Shape, mesh: jax.sharding.Mesh,
               total_steps: int) -> tuple[steps_lib.Steps, steps_lib.TrainState, Any]:
  """(compiled steps, replicated train state, float32 params as initialised)."""
  config = model_config(shape)
  model_lib.check_block_size(shape.seq, config)
  model = FlaxAutoModelForMaskedLM.from_config(
      config, seed=SEED, dtype=model_lib.compute_dtype(shape.dtype),
      attention_impl=shape.attention, remat_policy=shape.remat_policy)
  tx, schedule = optim.make_optimizer(optimizer_config(), total_steps)
  state, state_shardings = steps_lib.init_train_state(model, tx, SEED, mesh)
  spec = masking_spec(shape)
  dispersion = masking.count_dispersion(random_ids(shape, 1024, np.random.default_rng(SEED))[0],
                                        spec)
  steps = steps_lib.compile_steps(
      model, tx, schedule, spec, SEED, mesh, state_shardings,
      head_fn=model_lib.head_fn(model) if shape.masked_head else None,
      max_predictions=model_lib.max_predictions(shape.seq, spec.probability, dispersion))
  return steps, state, model.params


def random_ids(shape: Shape, rows: int, rng: np.random.Generator) -> np.ndarray:
  """[1, rows, seq] int32 token ids, none of them special (as real blocks mostly are)."""
  low = len(tokenizer_lib.SPECIAL_TOKENS)
  return rng.integers(low, shape.vocab, (1, rows, shape.seq), dtype=np.int32)


# ----------------------------------------------------------------------------
# FLOPs.


# Parameter-path names, RoBERTa's and ModernBERT's: the encoder layers' container, what a
# layer runs on every token even with the masked-only head (its attention's inputs), and what
# runs on the head's rows alone past the layers.
LAYER_CONTAINERS = ('layer', 'layers')
ATTENTION_INPUTS = ('self', 'Wqkv', 'attn_norm')
HEAD_NAMES = ('lm_head', 'head', 'decoder', 'final_norm')


def _layer_index(path: tuple[str, ...]) -> int | None:
  for name in LAYER_CONTAINERS:
    if name in path:
      return int(path[path.index(name) + 1])
  return None


def flop_params(params: Any, vocab: int, hidden: int) -> tuple[int, int]:
  """(N_body, N_head) of the docstring."""
  flat = traverse_util.flatten_dict(params)
  size = lambda keep: sum(int(np.prod(v.shape)) for path, v in flat.items() if keep(path))
  last = max(i for i in map(_layer_index, flat) if i is not None)
  on_rows = lambda path: (any(name in path for name in HEAD_NAMES) or (
      _layer_index(path) == last and not any(name in path for name in ATTENTION_INPUTS)))
  body = size(lambda path: 'embeddings' not in path and not on_rows(path))
  # A tied decoder is the word table, outside the sum; an untied one counts itself there.
  untied = any('decoder' in path and path[-1] == 'kernel' for path in flat)
  return body, size(on_rows) + (0 if untied else vocab * hidden)


def head_share(shape: Shape) -> float:
  """The share of a device's tokens the vocabulary head runs on: with the masked-only head,
  the bound of its rows pooled (`steps.micro_batch_predictions`)."""
  if not shape.masked_head:
    return 1.0
  rate = shape.mask_probability
  pooled = steps_lib.micro_batch_predictions(
      shape.batch, shape.seq, rate, model_lib.max_predictions(shape.seq, rate))
  return pooled / (shape.batch * shape.seq)


def flops_per_token(params: Any, shape: Shape) -> float:
  """The FLOPs per token the step executes (see the module docstring)."""
  body, head = flop_params(params, shape.vocab, shape.hidden)
  attention = 12 * sum(shape.keys_per_layer()) * shape.hidden
  return 6 * (body + head * head_share(shape)) + attention


def default_peaks(platform: str, given: list[float] | None) -> list[float]:
  if given:
    return list(given)
  return list(GPU_PEAKS_TFLOPS) if platform == 'gpu' else []


# ----------------------------------------------------------------------------
# Measurements.


@dataclasses.dataclass
class StepTimes:
  first_step_s: float  # Compile + one step.
  synced_ms: list[float]
  back_to_back_ms: float  # Mean over the back-to-back steps.

  @property
  def median_ms(self) -> float:
    return statistics.median(self.synced_ms)

  @property
  def mean_ms(self) -> float:
    return statistics.fmean(self.synced_ms)


def time_steps(steps: steps_lib.Steps, state: steps_lib.TrainState, batch: jax.Array,
               warmup: int, count: int) -> tuple[StepTimes, steps_lib.TrainState]:
  """The step's timings, and the state after them (the one passed in is donated)."""
  start = time.perf_counter()
  state, metrics = steps.train(state, batch)
  jax.block_until_ready((state, metrics))
  first = time.perf_counter() - start
  for _ in range(warmup - 1):
    state, metrics = steps.train(state, batch)
  jax.block_until_ready((state, metrics))

  synced = []
  for _ in range(count):
    start = time.perf_counter()
    state, metrics = steps.train(state, batch)
    jax.block_until_ready((state, metrics))
    synced.append((time.perf_counter() - start) * 1e3)

  start = time.perf_counter()
  for _ in range(count):
    state, metrics = steps.train(state, batch)
  jax.block_until_ready((state, metrics))
  back_to_back = (time.perf_counter() - start) * 1e3 / count
  if int(metrics['nonfinite']):
    print(f'warning: the last {int(metrics["nonfinite"])} step(s) were non-finite', flush=True)
  return StepTimes(first, synced, back_to_back), state


def time_masking(spec: masking.MaskingSpec, batch: jax.Array, count: int) -> float:
  """Mean ms of the step's masking alone (`steps.mask_micro_batches`), compiled on its own."""
  mask = jax.jit(lambda rng, ids: steps_lib.mask_micro_batches(rng, ids, spec))
  rng = jax.random.PRNGKey(SEED)
  jax.block_until_ready(mask(rng, batch))
  start = time.perf_counter()
  for i in range(count):
    jax.block_until_ready(mask(jax.random.fold_in(rng, i), batch))
  return (time.perf_counter() - start) * 1e3 / count


def host_pipeline_rate(shape: Shape, mesh: jax.sharding.Mesh, num_blocks: int,
                       num_batches: int) -> float:
  """Batches/s from `train_batches` + `shard_batch`, each batch placed before the next."""
  blocks = random_ids(shape, num_blocks, np.random.default_rng(SEED + 1))[0]
  global_batch = shape.batch * mesh.size
  batches = input_pipeline.train_batches(blocks, global_batch, 1, SEED)
  jax.block_until_ready(sharding.shard_batch(next(batches), mesh, batch_axis=1))
  start = time.perf_counter()
  for _ in range(num_batches):
    jax.block_until_ready(sharding.shard_batch(next(batches), mesh, batch_axis=1))
  return num_batches / (time.perf_counter() - start)


def profile_steps(steps: steps_lib.Steps, state: steps_lib.TrainState, batch: jax.Array,
                  trace_dir: str, count: int) -> dict:
  """Traces `count` back-to-back steps; writes the step's optimized HLO beside the trace."""
  path = pathlib.Path(trace_dir)
  path.mkdir(parents=True, exist_ok=True)
  (path / 'train_step.hlo.txt').write_text(steps.train.lower(state, batch).compile().as_text())
  state = jax.block_until_ready(steps.train(state, batch)[0])
  with jax.profiler.trace(str(path)):
    for _ in range(count):
      state, metrics = steps.train(state, batch)
    jax.block_until_ready((state, metrics))
  return profile_summary.summarize(str(path), count)


def peak_device_memory(device: jax.Device) -> int | None:
  stats = device.memory_stats() or {}
  return stats.get('peak_bytes_in_use')


def load_average() -> list[float]:
  """The host's 1/5/15-minute load averages: other work on the machine skews CPU figures."""
  return [round(x, 2) for x in os.getloadavg()]


def host_peak_rss() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB.


# ----------------------------------------------------------------------------
# Reference rows (anchors.py), run before this process touches the accelerator.


def probe_platform() -> str:
  """The platform JAX picks, asked in a child so this process leaves the accelerator untouched."""
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE='false')
  out = subprocess.run([sys.executable, '-c', 'import jax; print(jax.devices()[0].platform)'],
                       env=env, capture_output=True, text=True, check=True)
  return out.stdout.strip().splitlines()[-1]


def compare_skip_reason(shape: Shape, platform: str, force: bool,
                        anchors: pathlib.Path) -> str | None:
  if not anchors.is_file():
    return f'{anchors} does not exist'
  if force:
    return None
  if platform != 'gpu':
    return (f'the reference rows are GPU figures (anchors.py\'s torch modes use CUDA where '
            f'there is one); this is {platform}. --force runs them anyway')
  mismatched = anchor_mismatch(shape)
  if mismatched:
    return (f'anchors.py measures only the {shape.model_type} dims '
            f'{ANCHOR_DIMS[shape.model_type]}; this shape differs in {mismatched}. --force runs '
            'them anyway')
  return None


def anchor_mismatch(shape: Shape) -> dict[str, tuple]:
  """{field: (ours, the anchors')} where this shape is not the one anchors.py measures."""
  return {k: (getattr(shape, k), v) for k, v in ANCHOR_DIMS[shape.model_type].items()
          if getattr(shape, k) != v}


def run_anchors(shape: Shape, steps: int, anchors: pathlib.Path,
                modes: Sequence[str]) -> dict[str, dict]:
  """{row name: {step_ms, ktok_s, ...}} from anchors.py's `modes`, each a subprocess."""
  rows = {}
  for mode in modes:
    with tempfile.TemporaryDirectory() as out:
      env = dict(os.environ, B=str(shape.batch), L=str(shape.seq), STEPS=str(steps), OUT=out)
      print(f'--- anchors.py {mode} (B={shape.batch} L={shape.seq} STEPS={steps})', flush=True)
      done = subprocess.run([sys.executable, str(anchors), mode], env=env, check=False)
      result = pathlib.Path(out) / f'{mode}_B{shape.batch}_L{shape.seq}.json'
      if done.returncode != 0 or not result.is_file():
        print(f'    anchors.py {mode} failed (exit {done.returncode}); its rows are left out',
              flush=True)
        continue
      rows.update(json.loads(result.read_text()))
  return rows


# ----------------------------------------------------------------------------
# Report.


def results(shape: Shape, device: jax.Device, num_devices: int, times: StepTimes,
            fpt: float, n_flop_params: int, n_params: int, peaks: list[float],
            pipeline_batches_s: float, peak_bytes: int | None, load_before: list[float],
            masking_ms: float) -> dict:
  tokens_per_step = shape.batch * num_devices * shape.seq
  tps_median = tokens_per_step / (times.median_ms / 1e3)
  tps_b2b = tokens_per_step / (times.back_to_back_ms / 1e3)

  def mfu(tps: float, peak: float) -> float:
    return tps / num_devices * fpt / (peak * 1e12)

  steps_per_s = 1e3 / times.median_ms
  return {
      'device_kind': device.device_kind, 'platform': device.platform,
      'num_devices': num_devices, 'shape': dataclasses.asdict(shape),
      'params': n_params, 'flop_params': n_flop_params, 'flops_per_token': fpt,
      'first_step_s': times.first_step_s,
      'step_ms_median': times.median_ms, 'step_ms_mean': times.mean_ms,
      'step_ms_back_to_back': times.back_to_back_ms, 'step_ms_synced': times.synced_ms,
      'masking_ms': masking_ms,
      'tokens_per_s_median': tps_median, 'tokens_per_s_back_to_back': tps_b2b,
      'mfu': {f'{peak:g}': {'median': mfu(tps_median, peak), 'back_to_back': mfu(tps_b2b, peak)}
              for peak in peaks},
      'peak_device_bytes': peak_bytes, 'host_peak_rss_bytes': host_peak_rss(),
      'pipeline_batches_per_s': pipeline_batches_s, 'steps_per_s': steps_per_s,
      'pipeline_to_step_ratio': pipeline_batches_s / steps_per_s,
      'load_average_before': load_before, 'load_average_after': load_average(),
  }


def _gib(n: int | None) -> str:
  return 'n/a' if n is None else f'{n / 2**30:.2f} GiB'


def print_report(r: dict, steps: int) -> None:
  shape = Shape(**r['shape'])
  print(f'device: {r["device_kind"]} ({r["platform"]}) x {r["num_devices"]}; host load average '
        f'(1/5/15 min) {r["load_average_before"]} before, {r["load_average_after"]} after')
  print(f'shape: {shape.describe()}')
  print(f'params: {r["params"] / 1e6:.2f}M total, N = {r["flop_params"] / 1e6:.2f}M for FLOPs '
        f'(the head and the last layer past its attention counted on {head_share(shape):.0%} of '
        f'the tokens, where they run); '
        f'{r["flops_per_token"] / 1e6:,.1f} MFLOP/token executed (6N + 12*L*s*h)')
  print(f'first step (compile + run): {r["first_step_s"]:.2f} s')
  print(f'step time ({steps} synced steps): median {r["step_ms_median"]:.2f} ms, '
        f'mean {r["step_ms_mean"]:.2f} ms; back-to-back mean {r["step_ms_back_to_back"]:.2f} ms')
  print(f'masking alone ({shape.masking}, compiled on its own): {r["masking_ms"]:.3f} ms, '
        f'{r["masking_ms"] / r["step_ms_median"]:.1%} of the median step')
  print(f'tokens/s: {r["tokens_per_s_median"]:,.0f} (median step), '
        f'{r["tokens_per_s_back_to_back"]:,.0f} (back-to-back)')
  achieved = r['tokens_per_s_back_to_back'] / r['num_devices'] * r['flops_per_token'] / 1e12
  print(f'achieved (back-to-back): {achieved:.4g} TFLOP/s per device')
  if not r['mfu']:
    print('MFU: n/a (pass --peak_tflops)')
  for peak, mfu in r['mfu'].items():
    print(f'MFU of {peak} TFLOP/s/device: {mfu["median"] * 100:.2f}% (median '
          f'step), {mfu["back_to_back"] * 100:.2f}% (back-to-back)')
  print(f'peak device memory: {_gib(r["peak_device_bytes"])}; '
        f'host peak RSS: {_gib(r["host_peak_rss_bytes"])}')
  print(f'host pipeline (train_batches + shard_batch): {r["pipeline_batches_per_s"]:,.0f} '
        f'batches/s vs {r["steps_per_s"]:,.1f} steps/s consumed: ratio '
        f'{r["pipeline_to_step_ratio"]:,.1f}x', flush=True)


def print_comparison(r: dict, rows: dict[str, dict]) -> dict[str, float]:
  """Ratio of our back-to-back tokens/s per device to each row's (both: mean of back-to-back steps)."""
  ours = r['tokens_per_s_back_to_back'] / r['num_devices']
  print(f'ours vs anchors.py (tokens/s per device, back-to-back; ours {ours / 1e3:,.2f} ktok/s, '
        f'{r["shape"]["dtype"]}):')
  shape = Shape(**r['shape'])
  if anchor_mismatch(shape):
    print(f'  note: the anchors ran their own dims {ANCHOR_DIMS[shape.model_type]}, not this '
          'shape: the ratios are not like for like')
  ratios = {}
  for name, row in rows.items():
    ratios[name] = ours / (row['ktok_s'] * 1e3)
    print(f'  {name:48s} {row["ktok_s"]:10.2f} ktok/s  ours/ref {ratios[name]:.2f}x')
  return ratios


# ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  host_memory.keep_freed_memory_if_on_cpu()  # As the entry points, before JAX starts.
  shape = resolve_shape(args)
  warnings.filterwarnings('ignore', message='Some donated buffers were not usable')

  anchors = None
  if args.compare:
    reason = compare_skip_reason(shape, probe_platform(), args.force, args.anchors)
    if reason:
      print(f'--compare skipped: {reason}', flush=True)
    else:
      modes = (args.anchor_modes or ANCHOR_MODES[shape.model_type]).split(',')
      anchors = run_anchors(shape, args.steps, args.anchors, modes)

  load_before = load_average()
  mesh = sharding.make_mesh(args.fsdp)
  device = mesh.devices.flat[0]
  total_steps = args.warmup + 2 * args.steps
  steps, state, params = build_step(shape, mesh, total_steps)
  # Counted now: the first step donates the state, which may share the params' buffers.
  n_params = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(params))
  body, head = flop_params(params, shape.vocab, shape.hidden)
  n_flop_params, fpt = body + head * head_share(shape), flops_per_token(params, shape)
  rows = shape.batch * jax.local_device_count()
  batch = sharding.shard_batch(random_ids(shape, rows, np.random.default_rng(SEED)), mesh,
                               batch_axis=1)
  times, state = time_steps(steps, state, batch, args.warmup, args.steps)
  masking_ms = time_masking(masking_spec(shape), batch, args.steps)
  profile = None
  if args.profile:
    profile = profile_steps(steps, state, batch, args.profile, args.profile_steps)
  peak_bytes = peak_device_memory(device)
  pipeline = host_pipeline_rate(shape, mesh, args.pipeline_blocks, args.pipeline_batches)

  report = results(shape, device, mesh.size, times, fpt, n_flop_params, n_params,
                   default_peaks(device.platform, args.peak_tflops), pipeline, peak_bytes,
                   load_before, masking_ms)
  print_report(report, args.steps)
  if profile is not None:
    profile_summary.print_summary(profile)
    report['profile'] = profile
  if anchors is not None:
    report['anchors'] = anchors
    report['ratio_to_anchors'] = print_comparison(report, anchors)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(report, indent=1))
    print(f'wrote {args.json}')
  return report


if __name__ == '__main__':
  main()
