"""ModernBERT's train step at long lengths against PyTorch's, side by side, in one command.

One train step is forward and backward of the masked-LM loss (cross-entropy at 30% of the
positions, full logits on both sides, gradients of every parameter, no optimizer; the loss as
each side's training computes it: the package's `metrics.masked_lm_sums`, and PyTorch's
`ModernBertForMaskedLM(labels=...)`), batch 1,
float32 (`--dtype bfloat16`: products in bfloat16, torch under autocast). Both sides load
the same weights: a randomly initialised `ModernBertForMaskedLM`
saved by PyTorch transformers (`save_pretrained`), loaded here by
`FlaxAutoModelForMaskedLM.from_pretrained` with `attention_impl` set to each of `--impls`,
and there by `ModernBertForMaskedLM.from_pretrained(attn_implementation='sdpa')`. The loss
of both is printed, to show they compute one thing.

Each (side, length) runs in its own process, so that its peak RSS (`ru_maxrss`: the
weights, activations, gradients and the runtime's own) is its own. Each side's C allocator is
set as its program sets it: the package's side takes the training program's CPU policy
(`mlm_jax.host_memory`: freed memory kept for the next step, and blocks of 32 MB and more
mapped again where the step's temporaries exceed `LARGE_STEP_BYTES`), PyTorch's is glibc's as
it comes; `--glibc` leaves both as they come. Reported: compile
(or first-step) time, the median of `--steps` back-to-back steps after one untimed, the peak
RSS (with `--gpu`: both sides on the GPU, and the peak device memory instead), the loss, and
ours over PyTorch sdpa's (above 1: the project is faster).

Shapes: `small` is 6 layers x 256 (4 heads, intermediate 512, vocabulary 4096), global
attention every 3rd layer, local_attention 128; `base` is ModernBERT-base's (22 x 768, 12
heads, intermediate 1152, vocabulary 50368, global every 3rd, window 128).

Needs torch and transformers (run with the torch environment's python; `--jax-python` runs
the package's side with another, one without torch: transformers imports torch wherever it is
installed, which added 0.7 GB to the package side's peak RSS at 2,048 tokens); `--plot` draws
time and peak memory against length, log-log, for every side (matplotlib).

  python benchmarks/long_context.py --shape small --seqs 1024 2048 4096 8192 --json small.json \
      --jax-python python3
  python benchmarks/long_context.py --shape base --seqs 1024 --json base.json
  python benchmarks/long_context.py --shape base --seqs 8192 --remat-policy full --steps 1 \
      --json base8k.json --jax-python python3
  python benchmarks/long_context.py --plot docs/long_context.png small.json base.json
"""

import os

import sys

if '--gpu' not in sys.argv:
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # Before jax is imported.

import argparse  # pylint: disable=wrong-import-position
import json
import resource
import statistics
import subprocess
import tempfile
import time

SHAPES = {
    'small': dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
                  intermediate_size=512, vocab_size=4096),
    'base': dict(hidden_size=768, num_hidden_layers=22, num_attention_heads=12,
                 intermediate_size=1152, vocab_size=50368),
}
MASKED = 0.3
MASK_ID = 4


def save_model(shape: str, max_length: int, directory: str) -> None:
  """A random ModernBERT of `shape`, saved by PyTorch transformers."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  config = transformers.ModernBertConfig(
      **SHAPES[shape], global_attn_every_n_layers=3, local_attention=128,
      max_position_embeddings=max_length, pad_token_id=0, bos_token_id=1, eos_token_id=2,
      cls_token_id=1, sep_token_id=2, mask_token_id=MASK_ID)
  transformers.ModernBertForMaskedLM(config).save_pretrained(directory)


def batch(vocab: int, length: int):
  """(input ids, labels, which positions are masked) for batch 1, the same on both sides."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.RandomState(0)
  labels = rng.randint(5, vocab, (1, length)).astype(np.int64)
  masked = rng.rand(1, length) < MASKED
  return np.where(masked, MASK_ID, labels), labels, masked


def timed(step, steps: int) -> tuple[float, float, float]:
  """(first call's seconds, median of `steps` further calls, last loss)."""
  start = time.perf_counter()
  loss = step()
  first = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - start)
  return first, statistics.median(times), loss


def jax_step(directory: str, length: int, impl: str, args) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from mlm_jax import compiler_options  # pylint: disable=import-outside-toplevel
  from mlm_jax import host_memory  # pylint: disable=import-outside-toplevel
  from mlm_jax import metrics  # pylint: disable=import-outside-toplevel
  from mlm_jax.models import FlaxAutoModelForMaskedLM  # pylint: disable=import-outside-toplevel
  if not args.glibc:  # As run_train.py does, before JAX's backend starts.
    host_memory.keep_freed_memory_if_on_cpu()
  model = FlaxAutoModelForMaskedLM.from_pretrained(directory, attention_impl=impl,
                                                   dtype=args.dtype, remat_policy=args.remat_policy)
  ids, labels, masked = batch(model.config.vocab_size, length)

  def loss(params, ids, labels, masked):  # The package's loss, as its train step computes it.
    logits = model(ids, params=params).logits
    return metrics.masked_lm_sums(logits, labels, masked.astype(jnp.float32))[0] / jnp.sum(masked)

  inputs = (model.params, ids.astype('int32'), labels.astype('int32'), masked)
  options = compiler_options.for_platform(  # As the package's train step compiles.
      jax.devices()[0].platform, saving_memory=args.remat_policy != 'none',
      family=model.config.model_type)
  compiled = jax.jit(jax.value_and_grad(loss), compiler_options=options).lower(*inputs).compile()
  if not args.glibc:  # As `steps.fit_host_to_train_step` does.
    host_memory.fit_to_step(jax.devices()[0].platform,
                            compiled.memory_analysis().temp_size_in_bytes)
  first, step_s, value = timed(lambda: float(jax.block_until_ready(compiled(*inputs))[0]),
                               args.steps)
  row = dict(side=f'jax {impl}', first_s=first, step_s=step_s, loss=value)
  if args.gpu:
    row['peak_device_mb'] = jax.devices()[0].memory_stats()['peak_bytes_in_use'] / 2**20
  return row


def torch_step(directory: str, length: int, attn: str, args) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  device = 'cuda' if args.gpu else 'cpu'
  if not args.gpu:
    torch.set_num_threads(os.cpu_count())
  model = transformers.ModernBertForMaskedLM.from_pretrained(
      directory, attn_implementation=attn, dtype=torch.float32).to(device)
  model.train()
  ids, labels, masked = batch(model.config.vocab_size, length)
  ids = torch.from_numpy(ids).to(device)
  labels = torch.from_numpy(labels.copy())
  labels[~torch.from_numpy(masked)] = -100
  labels = labels.to(device)
  # float32 parameters, products in bfloat16 where asked: the package's dtype on both sides.
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == 'bfloat16')

  def step():
    model.zero_grad(set_to_none=True)
    with autocast:
      loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return float(loss)  # Waits for the device.

  first, step_s, value = timed(step, args.steps)
  row = dict(side=f'torch {attn}', first_s=first, step_s=step_s, loss=value)
  if args.gpu:
    row['peak_device_mb'] = torch.cuda.max_memory_allocated() / 2**20
  return row


def measure_one(args) -> dict:
  side, length = args.one.rsplit(':', 1)
  length = int(length)
  if side.startswith('torch '):
    row = torch_step(args.model_dir, length, side.split()[1], args)
  else:
    row = jax_step(args.model_dir, length, side, args)
  return row | dict(shape=args.shape, seq=length,
                    peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10)


def in_subprocess(args, side: str, length: int) -> dict:
  python = sys.executable if side.startswith('torch ') else args.jax_python
  command = [python, __file__, '--shape', args.shape, '--steps', str(args.steps),
             '--dtype', args.dtype, '--model-dir', args.model_dir, '--one', f'{side}:{length}']
  command += ['--gpu'] if args.gpu else []
  command += ['--glibc'] if args.glibc else []
  command += ['--remat-policy', args.remat_policy]
  result = subprocess.run(command, capture_output=True, text=True, check=False,
                          env=os.environ | {'PYTHONPATH': os.getcwd()})
  if result.returncode:
    lines = result.stderr.strip().splitlines() or ['(no output)']
    return dict(side=side if side.startswith('torch ') else f'jax {side}', shape=args.shape,
                seq=length,
                failed=f'exit {result.returncode}: {lines[-1][:200]}')
  return json.loads(result.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict]) -> None:
  print(f'{"shape":>6} {"seq":>6} {"side":>12} {"first s":>8} {"step s":>8} {"peak MB":>8} '
        f'{"loss":>10} {"vs torch":>9}')
  torch_s = {(r['shape'], r['seq']): r['step_s'] for r in rows
             if r['side'] == 'torch sdpa' and 'failed' not in r}
  memory = 'peak_device_mb' if any('peak_device_mb' in r for r in rows) else 'peak_rss_mb'
  for r in rows:
    if 'failed' in r:
      print(f'{r["shape"]:>6} {r["seq"]:>6} {r["side"]:>12} {r["failed"]}')
      continue
    ratio = torch_s.get((r['shape'], r['seq']), float('nan')) / r['step_s']
    print(f'{r["shape"]:>6} {r["seq"]:>6} {r["side"]:>12} {r["first_s"]:>8.2f} '
          f'{r["step_s"]:>8.3f} {r[memory]:>8.0f} {r["loss"]:>10.6f} {ratio:>8.2f}x')


def plot(path: str, sources: list[str]) -> None:
  """Step time and peak RSS against length, log-log, one line per (shape, side)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  from matplotlib import pyplot  # pylint: disable=import-outside-toplevel
  from matplotlib import ticker  # pylint: disable=import-outside-toplevel
  rows = [r for source in sources for r in json.load(open(source, encoding='utf-8'))
          if 'failed' not in r]
  figure, (left, right) = pyplot.subplots(1, 2, figsize=(10, 4))
  for shape, side in sorted({(r['shape'], r['side']) for r in rows}):
    line = sorted((r for r in rows if (r['shape'], r['side']) == (shape, side)),
                  key=lambda r: r['seq'])
    seqs = [r['seq'] for r in line]
    style = dict(marker='o', linestyle='--' if side.startswith('torch') else '-',
                 label=f'{shape}: {side}')
    left.plot(seqs, [r['step_s'] for r in line], **style)
    right.plot(seqs, [r['peak_rss_mb'] / 1024 for r in line], **style)
  lengths = sorted({r['seq'] for r in rows})
  for axes, label in ((left, 'train step (s)'), (right, 'peak RSS (GiB)')):
    axes.set_xscale('log', base=2)
    axes.set_yscale('log')
    axes.set_xticks(lengths, [f'{n:,}' for n in lengths])
    axes.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axes.yaxis.set_major_formatter(ticker.FormatStrFormatter('%g'))
    axes.yaxis.set_minor_formatter(ticker.NullFormatter())
    axes.set_xlabel('tokens (batch 1)')
    axes.set_ylabel(label)
    axes.grid(True, which='both', alpha=0.3)
  left.legend(fontsize=8)
  figure.suptitle('ModernBERT train step on CPU, float32: mlm_jax vs PyTorch sdpa')
  figure.tight_layout()
  figure.savefig(path, dpi=120)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--shape', choices=sorted(SHAPES), default='small')
  parser.add_argument('--seqs', type=int, nargs='+', default=[1024, 2048, 4096, 8192])
  parser.add_argument('--impls', nargs='*', default=['auto'],
                      help="the package's config.attention_impl values to run (xla, blocked, "
                      'auto)')
  parser.add_argument('--torch-attn', nargs='*', default=['sdpa'],
                      help="PyTorch's attn_implementation values to run (none: no PyTorch side; "
                      'flash_attention_2 on GPU where flash-attn is installed)')
  parser.add_argument('--dtype', choices=['float32', 'bfloat16'], default='float32',
                      help='computation dtype of both sides (parameters stay float32)')
  parser.add_argument('--glibc', action='store_true',
                      help="the package's side with glibc's allocator as it comes, not under "
                      "the training program's policy (mlm_jax.host_memory)")
  parser.add_argument('--remat-policy', default='none',
                      help="the package's config.remat_policy (none, full, minimal, dots)")
  parser.add_argument('--gpu', action='store_true',
                      help='both sides on the GPU; memory is the peak device memory')
  parser.add_argument('--jax-python', default=sys.executable,
                      help="the python of the package's side (default this one); where torch "
                      'is installed, transformers imports it, and its RSS with it')
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--json', help='also write the rows here')
  parser.add_argument('--plot', nargs='+', metavar=('PNG', 'JSON'),
                      help='draw PNG from the JSON files of earlier runs, and exit')
  parser.add_argument('--model-dir', help=argparse.SUPPRESS)
  parser.add_argument('--one', help=argparse.SUPPRESS)  # side:seq, in this process.
  args = parser.parse_args()
  if args.plot:
    plot(args.plot[0], args.plot[1:])
    return
  if args.one:
    print(json.dumps(measure_one(args)))
    return
  rows = []
  with tempfile.TemporaryDirectory() as directory:
    args.model_dir = directory
    save_model(args.shape, max(args.seqs), directory)
    sides = [f'torch {attn}' for attn in args.torch_attn] + args.impls
    for length in args.seqs:
      for side in sides:
        rows.append(in_subprocess(args, side, length))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  print(f'{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end')
  print_table(rows)
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(rows, f, indent=2)


if __name__ == '__main__':
  main()
