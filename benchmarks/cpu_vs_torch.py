"""The project's CPU train step and fill-mask against PyTorch's, side by side, in one command.

Each comparison builds both sides in this process and then alternates between them,
`--rounds` rounds of `--steps` timed calls each, so that both see the same load on a
shared machine; the figures are medians over every timed call of a side, and the ratio
is ours over theirs (above 1: the project is faster).

  * `train-small`: the cpu-small shape (2 layers x 128, vocab 4096), batch 32 x 64, float32,
    vocabulary head on the masked positions only on both sides. Ours is
    `benchmarks/train_step.py`'s step (the package's `steps.compile_steps(...).train`:
    on-device masking, dropout, clip + AdamW, non-finite guard). Theirs is PyTorch
    transformers' `RobertaForMaskedLM` in eager mode with the same config: 80/10/10 masking
    drawn with torch per step, the encoder, the masked rows gathered (`hidden[labels !=
    -100]`, ModernBERT's sparse prediction) through `lm_head`, cross-entropy, backward,
    `clip_grad_norm_(1.0)` and `torch.optim.AdamW` with weight decay off for biases and
    LayerNorms, a linear warmup schedule.
  * `train-small-full`: the same with the vocabulary head on every position on both sides
    (theirs: `model(input_ids, labels=labels).loss`).
  * `train-base`: the distilroberta-base shape (6 layers x 768, vocab 50265), batch 8 x 128,
    masked-only head.
  * `fill-mask`: a randomly initialised RoBERTa of the distilroberta-base size, saved by
    PyTorch (`save_pretrained`) with a BPE tokenizer trained on the package's sample; 64
    one-mask texts of 24 words (as `benchmarks/infer.py`), top-5, one call of 64 texts at a
    time: ours `infer.fill_mask(load_predictor(dir), ...)`, theirs the transformers
    `fill-mask` pipeline on the same directory (`batch_size=64`). Steady state: the first
    call of each side (ours compiles) is untimed.
  * `fill-mask-varied`: the same model and sides on 256 one-mask texts of 8 to 96 words in
    mixed order, at most 64 per batch on both sides (ours batches texts of one padded length
    within its window of batches, `infer.length_batches`; the pipeline pads each batch of 64 in
    the given order).
  * `products`: the train step's largest matrix products alone, float32, `jnp.dot` (jitted,
    XLA's CPU library) against `torch.mm` (oneDNN/MKL). Both steps are mostly these products,
    so on a CPU where theirs run faster the step's ratio cannot go far above 1 (the reason
    the train-step goals are not met on an AVX-512 Xeon: see BENCHMARKS.md).

PyTorch runs with as many threads as the process has cores (`torch.set_num_threads`; `taskset`
narrows them), JAX on its CPU client. Both sides share the process, hence its C allocator:
the script sets the policy the package's CPU steps set (`mlm_jax.host_memory`: glibc keeps
freed memory rather than handing fresh pages to every step) before building either side,
which makes PyTorch's larger steps faster too. The ratios are against PyTorch with that
tuning, not PyTorch under glibc's defaults. Torch is imported by this script only; without it
the script says so in one line and exits with status 2.

  python benchmarks/cpu_vs_torch.py                           # all but train-small-full
  python benchmarks/cpu_vs_torch.py --only=train-small,fill-mask --rounds=5
"""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # Before jax is imported.
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import argparse  # pylint: disable=wrong-import-position
import dataclasses
import json
import pathlib
import statistics
import sys
import tempfile
import time
import warnings
from typing import Callable, Sequence

import numpy as np

# The goals of the issue that asked for this script: ours / theirs at least this much.
GOALS = {'train-small': 1.3, 'train-small-full': None, 'train-base': 1.3, 'fill-mask': 1.5,
         'fill-mask-varied': None, 'products': None}
# Run only when named in --only (a minute or more each).
ON_REQUEST = ('train-small-full', 'fill-mask-varied')
COMPARISONS = tuple(GOALS)
# `products`' shapes (m x k x n): the feed-forward in and out, an attention projection and the
# masked vocabulary head of the distilroberta-base step at 8 x 128, and cpu-small's feed-forward.
PRODUCTS = ((1024, 768, 3072), (1024, 3072, 768), (1024, 768, 768), (233, 768, 50265),
            (2048, 128, 512))
SEED = 0
# The cores this process may run on (`taskset` narrows them); PyTorch gets a thread per core.
CORES = len(os.sched_getaffinity(0))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--only', default=','.join(c for c in COMPARISONS if c not in ON_REQUEST),
                      help=f'comma-separated comparisons among {", ".join(COMPARISONS)}')
  parser.add_argument('--rounds', type=int, default=3, help='alternations between the sides')
  parser.add_argument('--steps', type=int, default=0,
                      help='timed calls per side per round (default: 8 for train-small, 2 '
                           'for train-base, 3 for fill-mask)')
  parser.add_argument('--json', default=None, metavar='PATH', help='write the results here')
  args = parser.parse_args(argv)
  args.only = [name.strip() for name in args.only.split(',') if name.strip()]
  unknown = sorted(set(args.only) - set(COMPARISONS))
  if unknown:
    parser.error(f'unknown comparison(s) {unknown}; choose among {", ".join(COMPARISONS)}')
  return args


def cpu_model() -> str:
  """The CPU's model name and widest vector extension: the ratios depend on it (on AVX-512
  PyTorch's oneDNN products outpace XLA's; on AVX2 they did not), and machines change."""
  try:
    info = pathlib.Path('/proc/cpuinfo').read_text()
  except OSError:
    return 'unknown CPU'
  name = next((line.split(':', 1)[1].strip() for line in info.splitlines()
               if line.startswith('model name')), 'unknown CPU')
  return f"{name}, {'AVX-512' if ' avx512f' in info else 'AVX2' if ' avx2' in info else 'no AVX2'}"


def load_average() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


# ----------------------------------------------------------------------------
# Timing: the two sides alternate.


@dataclasses.dataclass
class Side:
  """One side of a comparison: `call()` runs one timed unit of work, to completion."""
  name: str
  call: Callable[[], None]
  times: list[float] = dataclasses.field(default_factory=list)

  def run(self, count: int) -> None:
    for _ in range(count):
      start = time.perf_counter()
      self.call()
      self.times.append(time.perf_counter() - start)

  @property
  def median_s(self) -> float:
    return statistics.median(self.times)


def alternate(ours: Side, theirs: Side, rounds: int, steps: int) -> None:
  """Warms both up (one call each, ours compiles), then `rounds` x (ours, theirs)."""
  for side in (ours, theirs):
    start = time.perf_counter()
    side.call()
    print(f'  {side.name}: first call {time.perf_counter() - start:.2f} s', flush=True)
  for number in range(rounds):
    for side in (ours, theirs) if number % 2 == 0 else (theirs, ours):
      side.run(steps)
    print(f'  round {number + 1}: ours {statistics.median(ours.times[-steps:]) * 1e3:.1f} ms, '
          f'theirs {statistics.median(theirs.times[-steps:]) * 1e3:.1f} ms; load '
          f'{load_average()}', flush=True)


# ----------------------------------------------------------------------------
# Train steps.


def jax_train_side(shape) -> Side:
  """The package's step, built as `train_step.py` builds it, on a fixed batch."""
  import jax  # pylint: disable=import-outside-toplevel
  import train_step  # pylint: disable=import-outside-toplevel
  from mlm_jax import sharding  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh(1)
  steps, state, _ = train_step.build_step(shape, mesh, total_steps=1000)
  batch = sharding.shard_batch(
      train_step.random_ids(shape, shape.batch * jax.local_device_count(),
                            np.random.default_rng(SEED)), mesh, batch_axis=1)
  holder = {'state': state}

  def call():
    holder['state'], metrics = steps.train(holder['state'], batch)
    jax.block_until_ready((holder['state'], metrics))
  return Side('ours (JAX)', call)


def torch_train_side(shape, torch) -> Side:
  """PyTorch eager RobertaForMaskedLM, the same config, batch and optimizer settings."""
  import transformers  # pylint: disable=import-outside-toplevel
  import train_step  # pylint: disable=import-outside-toplevel
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  from mlm_jax import optim  # pylint: disable=import-outside-toplevel
  torch.manual_seed(SEED)
  config = train_step.model_config(shape)
  model = transformers.RobertaForMaskedLM(config).train()
  settings = train_step.optimizer_config()
  named = dict(model.named_parameters())
  decays = traverse_util.flatten_dict(optim.decay_mask(traverse_util.unflatten_dict(
      {tuple(name.split('.')): None for name in named})))  # The package's decay mask, by name.
  groups = [{'params': [p for n, p in named.items() if decays[tuple(n.split('.'))] == decay],
             'weight_decay': settings.weight_decay if decay else 0.0} for decay in (True, False)]
  optimizer = torch.optim.AdamW(groups, lr=settings.learning_rate, betas=(0.9, 0.999), eps=1e-8)
  warmup = settings.warmup_steps
  scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
  ids = torch.from_numpy(train_step.random_ids(shape, shape.batch,
                                               np.random.default_rng(SEED))[0]).long()
  spec = train_step.masking_spec(shape)
  special = torch.tensor(spec.special_ids)

  def mask(ids):
    """DataCollatorForLanguageModeling's 80/10/10, drawn with torch."""
    chosen = torch.bernoulli(torch.full(ids.shape, spec.probability)).bool()
    chosen &= ~torch.isin(ids, special)
    labels = torch.where(chosen, ids, -100)
    to_mask = torch.bernoulli(torch.full(ids.shape, 0.8)).bool() & chosen
    to_random = torch.bernoulli(torch.full(ids.shape, 0.5)).bool() & chosen & ~to_mask
    inputs = torch.where(to_mask, spec.mask_token_id, ids)
    inputs = torch.where(to_random, torch.randint(len(spec.special_ids), shape.vocab, ids.shape),
                         inputs)
    return inputs, labels

  def loss_of(inputs, labels):
    if not shape.masked_head:
      return model(input_ids=inputs, labels=labels).loss
    hidden = model.roberta(input_ids=inputs).last_hidden_state
    at = labels != -100
    logits = model.lm_head(hidden[at])
    return torch.nn.functional.cross_entropy(logits, labels[at])

  def call():
    inputs, labels = mask(ids)
    loss = loss_of(inputs, labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
  return Side('theirs (PyTorch eager)', call)


def compare_train(name: str, args: argparse.Namespace, torch) -> dict:
  import train_step  # pylint: disable=import-outside-toplevel
  base = 'distilroberta-base' if name == 'train-base' else 'cpu-small'
  shape = dataclasses.replace(train_step.PRESETS[base], masked_head=name != 'train-small-full',
                              **({'batch': 8} if name == 'train-base' else {}))
  steps = args.steps or (2 if name == 'train-base' else 8)
  print(f'{name}: {shape.describe()}', flush=True)
  ours, theirs = jax_train_side(shape), torch_train_side(shape, torch)
  alternate(ours, theirs, args.rounds, steps)
  tokens = shape.batch * shape.seq
  return summary(name, ours, theirs, tokens, 'tokens/s')


# ----------------------------------------------------------------------------
# Fill-mask.


def torch_saved_model(directory: pathlib.Path, torch, shape: str = 'distilroberta-base') -> None:
  """A random RoBERTa of `infer.SHAPES[shape]` (distilroberta-base's by default) and a
  sample-trained BPE tokenizer, saved by PyTorch transformers."""
  import infer as infer_benchmark  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from mlm_jax import validation  # pylint: disable=import-outside-toplevel
  from mlm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  tokenizer = tokenizer_lib.train_bpe_tokenizer(
      infer_benchmark.sample_answers(), infer_benchmark.TOKENIZER_VOCAB,
      model_max_length=validation.SCRATCH_MAX_LENGTH)
  shape = infer_benchmark.SHAPES[shape]
  config = transformers.RobertaConfig(
      vocab_size=shape.vocab or len(tokenizer), hidden_size=shape.hidden, num_hidden_layers=shape.layers,
      num_attention_heads=shape.heads, intermediate_size=shape.intermediate,
      max_position_embeddings=validation.SCRATCH_MAX_LENGTH + tokenizer.pad_token_id + 1,
      type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=tokenizer.pad_token_id,
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
  torch.manual_seed(SEED)
  transformers.RobertaForMaskedLM(config).save_pretrained(directory)
  tokenizer.save_pretrained(directory)


def compare_fill_mask(args: argparse.Namespace, torch, name: str = 'fill-mask') -> dict:
  import infer as infer_benchmark  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from mlm_jax import infer  # pylint: disable=import-outside-toplevel
  answers, batch_size = infer_benchmark.sample_answers(), 64
  if name == 'fill-mask':
    texts, what = infer_benchmark.one_mask_texts(answers, 64, 24), '64 one-mask texts of 24 words'
  else:
    texts = infer_benchmark.varied_mask_texts(answers, 256, 8, 96)
    what = '256 one-mask texts of 8 to 96 words in mixed order, 64 per batch'
  with tempfile.TemporaryDirectory() as directory:
    torch_saved_model(pathlib.Path(directory), torch)
    print(f'{name}: {what}, top-5, a distilroberta-base-size RoBERTa saved by PyTorch to '
          f'{directory}', flush=True)
    predictor = infer.load_predictor(directory)
    pipe = transformers.pipeline('fill-mask', model=directory, tokenizer=directory, top_k=5,
                                 device='cpu')
    results = {}
    ours = Side('ours (infer.fill_mask)', lambda: results.__setitem__(
        'ours', infer.fill_mask(predictor, texts, top_k=5, batch_size=batch_size)))
    theirs = Side('theirs (fill-mask pipeline)', lambda: results.__setitem__(
        'theirs', pipe(texts, batch_size=batch_size)))
    alternate(ours, theirs, args.rounds, args.steps or (3 if name == 'fill-mask' else 1))
  agree = sum(o[0][0]['token'] == t[0]['token'] for o, t in zip(results['ours'], results['theirs']))
  print(f'  top-1 fills that agree: {agree} of {len(texts)}', flush=True)
  return summary(name, ours, theirs, len(texts), 'texts/s') | {'top1_agree': agree}


# ----------------------------------------------------------------------------
# Matrix products alone.


def product_sides(m: int, k: int, n: int, torch) -> tuple[Side, Side]:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(SEED)
  a, b = (rng.standard_normal(shape, dtype=np.float32) for shape in ((m, k), (k, n)))
  dot, (ours_a, ours_b) = jax.jit(jnp.dot), (jnp.asarray(a), jnp.asarray(b))
  theirs_a, theirs_b = torch.from_numpy(a), torch.from_numpy(b)
  return (Side('ours (jnp.dot)', lambda: dot(ours_a, ours_b).block_until_ready()),
          Side('theirs (torch.mm)', lambda: torch.mm(theirs_a, theirs_b)))


def compare_products(args: argparse.Namespace, torch) -> dict:
  report = {}
  for m, k, n in PRODUCTS:
    name = f'product {m} x {k} x {n}'
    print(f'{name}: float32', flush=True)
    ours, theirs = product_sides(m, k, n, torch)
    alternate(ours, theirs, args.rounds, args.steps or 10)
    report[name] = summary(name, ours, theirs, 2 * m * k * n / 1e9, 'GFLOP/s')
  return report


# ----------------------------------------------------------------------------


def summary(name: str, ours: Side, theirs: Side, units: int, unit: str) -> dict:
  ratio = theirs.median_s / ours.median_s
  goal = GOALS.get(name)
  verdict = '' if goal is None else (f' (goal {goal}x: ' + ('met' if ratio >= goal else 'NOT met')
                                     + ')')
  print(f'{name}: ours {units / ours.median_s:,.1f} {unit} ({ours.median_s * 1e3:.1f} ms), '
        f'theirs {units / theirs.median_s:,.1f} {unit} ({theirs.median_s * 1e3:.1f} ms): '
        f'{ratio:.2f}x{verdict}', flush=True)
  return {'ours_s': ours.times, 'theirs_s': theirs.times, 'ours_median_s': ours.median_s,
          'theirs_median_s': theirs.median_s, f'ours_{unit}': units / ours.median_s,
          f'theirs_{unit}': units / theirs.median_s, 'ratio': ratio, 'goal': goal}


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  torch = import_torch('cpu_vs_torch.py')
  if torch is None:
    return 2
  import jax  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  warnings.filterwarnings('ignore', message='Some donated buffers were not usable')
  transformers.utils.logging.set_verbosity_error()
  torch.set_num_threads(CORES)
  # Our steps set the C allocator's policy for the whole process (`mlm_jax.host_memory`), and
  # PyTorch's side shares the process: set before either side is built, so that both run under
  # it in every comparison, as a PyTorch user who tunes glibc's malloc would.
  from mlm_jax import host_memory  # pylint: disable=import-outside-toplevel
  allocator = ('glibc keeping freed memory (mlm_jax.host_memory), both sides'
               if host_memory.keep_freed_memory() else 'the C library\'s defaults')
  print(f'{CORES} CPU cores ({cpu_model()}); allocator: {allocator}; jax {jax.__version__} '
        f'({jax.devices()[0].platform}), torch {torch.__version__} '
        f'({torch.get_num_threads()} threads), transformers '
        f'{transformers.__version__}; load average {load_average()}', flush=True)
  report = {'cores': CORES, 'cpu': cpu_model(), 'allocator': allocator,
            'load_average_before': load_average()}
  if report['load_average_before'][0] > CORES / 2:
    print(f'warning: other work is running (load average {report["load_average_before"][0]} on '
          f'{CORES} cores); PyTorch\'s threads slow down many-fold when the cores are '
          'oversubscribed, so the ratios below say little', flush=True)
  for name in args.only:
    if name.startswith('fill-mask'):
      report[name] = compare_fill_mask(args, torch, name)
    elif name == 'products':
      report[name] = compare_products(args, torch)
    else:
      report[name] = compare_train(name, args, torch)
  return finish_report(report, args.json)


def import_torch(script: str):
  """torch, or None after one line saying that `script` compares against it."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    print(f'{script} compares against PyTorch, which is not installed here (pip install '
          'torch, a CPU build is enough); nothing measured', file=sys.stderr)
    return None
  return torch


def finish_report(report: dict, json_path: str | None) -> int:
  """Adds the load average after the run, prints it, and writes `report` as JSON if asked."""
  report['load_average_after'] = load_average()
  print(f'load average after: {report["load_average_after"]}')
  if json_path:
    pathlib.Path(json_path).write_text(json.dumps(report, indent=1))
    print(f'wrote {json_path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
