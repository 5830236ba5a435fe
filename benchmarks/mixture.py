"""Mixed corpora: the proportions a mixture's batches follow, and what mixing costs the host.

    python benchmarks/mixture.py [--weights=0.7:0.3,0.5:0.5,0.9:0.1] [--json=PATH]

1. Proportions: the shipped ELI5 sample split into a domain corpus (its biology and medicine
   questions, .jsonl) and a general one (the rest, .txt), prepared by
   `preparation.prepare_sources` as `--config.mixture` prepares them (tiny_test's tokenizer
   and block size, into a temporary cache); for each weight pair, the rows each source gives
   over one epoch of `input_pipeline.train_batches` (tiny_test's global batch of 8), and over
   the first 10 batches.
2. Host cost: batches/s of `train_batches` at 128 rows x 128 tokens, over one source of
   200,000 memory-mapped uint16 blocks and over two such sources at 0.7/0.3 (sources of one
   size: `permute`'s cost depends on how far the size is below a power of 4).
Nothing is left behind: the temporary folder is deleted.
"""

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import numpy as np  # pylint: disable=wrong-import-position

_DOMAIN = ('Biology', 'Medicine')


def write_corpora(folder: str) -> tuple[str, str]:
  from mlm_jax.data import sources  # pylint: disable=import-outside-toplevel
  with open(sources.sample_data_path(), encoding='utf-8') as f:
    records = [json.loads(line) for line in f]
  domain, general = os.path.join(folder, 'domain.jsonl'), os.path.join(folder, 'general.txt')
  with open(domain, 'w', encoding='utf-8') as out:
    out.writelines(json.dumps(r) + '\n' for r in records if r['category'] in _DOMAIN)
  with open(general, 'w', encoding='utf-8') as out:
    out.writelines(' '.join(r['answers']['text']).replace('\n', ' ') + '\n'
                   for r in records if r['category'] not in _DOMAIN)
  return domain, general


def rows_per_source(train_blocks, weights, global_batch: int, steps: int) -> list[int]:
  """Rows each source gives over `steps` batches (a row names its source by its block)."""
  from mlm_jax.data import input_pipeline  # pylint: disable=import-outside-toplevel
  order = input_pipeline.train_indices(train_blocks, global_batch, 1, 0, weights)
  indices = np.concatenate([order[s] for s in range(steps)])
  return np.bincount(input_pipeline.source_of_rows(train_blocks, indices),
                     minlength=len(train_blocks)).tolist()


def proportions(folder: str, weight_pairs) -> list[dict]:
  from configs import tiny_test  # pylint: disable=import-outside-toplevel
  from mlm_jax.data import input_pipeline  # pylint: disable=import-outside-toplevel
  from mlm_jax.data import preparation  # pylint: disable=import-outside-toplevel
  domain, general = write_corpora(folder)
  config = tiny_test.get_config()
  config.split, config.cache_dir = 'train', os.path.join(folder, 'cache')
  batch = config.per_device_batch_size
  results = []
  for weights in weight_pairs:
    config.mixture = f'domain={domain}:{weights[0]},general={general}:{weights[1]}'
    prepared = preparation.prepare_sources(config, log=lambda m: None, progress=False)
    train = [s.blocks.train for s in prepared.sources]
    steps = input_pipeline.steps_per_epoch(
        input_pipeline.blocks_per_epoch([len(b) for b in train], weights), batch)
    epoch = rows_per_source(train, weights, batch, steps)
    first = rows_per_source(train, weights, batch, 10)
    results.append({'weights': list(weights), 'blocks': [len(b) for b in train],
                    'epoch_steps': steps, 'epoch_rows': epoch,
                    'epoch_shares': [r / sum(epoch) for r in epoch],
                    'first_10_batches_rows': first})
  return results


def batches_per_s(folder: str, seconds: float = 3.0) -> dict:
  from mlm_jax.data import input_pipeline  # pylint: disable=import-outside-toplevel
  def memmap(name: str, rows: int) -> np.ndarray:
    path = os.path.join(folder, name)
    blocks = np.lib.format.open_memmap(path, 'w+', np.uint16, (rows, 128))
    blocks[:] = np.random.default_rng(0).integers(0, 50_000, blocks.shape, np.uint16)
    blocks.flush()
    return np.load(path, mmap_mode='r')
  setups = {'one source, 200,000 blocks': ([memmap('one.npy', 200_000)], None),
            'two sources, 200,000 blocks each, 0.7/0.3':
                ([memmap('one.npy', 200_000), memmap('b.npy', 200_000)], [0.7, 0.3])}
  rates = {}
  for name, (blocks, weights) in setups.items():
    batches = input_pipeline.train_batches(blocks if weights else blocks[0], 128, 1, 0,
                                           weights=weights)
    for _ in itertools.islice(batches, 20):  # Threads started, pages warm.
      pass
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
      next(batches)
      count += 1
    rates[name] = count / (time.perf_counter() - start)
  return rates


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--weights', default='0.7:0.3,0.5:0.5,0.9:0.1')
  parser.add_argument('--json', default=None)
  args = parser.parse_args()
  pairs = [tuple(float(w) for w in pair.split(':')) for pair in args.weights.split(',')]
  print(f'load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores')
  folder = tempfile.mkdtemp(prefix='mlm_jax_mixture_')
  try:
    report = {'proportions': proportions(folder, pairs), 'batches_per_s': batches_per_s(folder)}
  finally:
    shutil.rmtree(folder, ignore_errors=True)
  for row in report['proportions']:
    print(f'weights {row["weights"]}: blocks {row["blocks"]}, epoch of {row["epoch_steps"]} '
          f'batches: rows {row["epoch_rows"]}, shares '
          f'{", ".join(f"{s:.4f}" for s in row["epoch_shares"])}; first 10 batches: '
          f'{row["first_10_batches_rows"]}')
  for name, rate in report['batches_per_s'].items():
    print(f'{name}: {rate:,.0f} batches/s of 128 x 128')
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=2)


if __name__ == '__main__':
  main()
