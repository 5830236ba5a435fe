"""Corpus-scale input: peak memory of a run, preparation throughput, host batches/s.

    python benchmarks/input.py [--sizes_mb=5,50] [--steps=20] [--json=PATH]

1. Writes .txt corpora of each size (one document per line, the shipped ELI5 sample's
   answers cycled in a seeded order) into a temporary folder, and runs
   `run_train.py --config=configs/tiny_test.py --config.data_files=CORPUS --config.split=train
   --config.num_train_steps=STEPS` on each, from an empty cache, in a fresh process: its
   peak RSS (`ru_maxrss` of the child) covers preparing (tokenizer training, tokenizing,
   writing blocks), training and evaluating.
2. Preparation throughput: the largest corpus tokenized into blocks by
   `preparation.write_blocks` with the tokenizer run 1 trained, one process and
   TOKENIZERS_PARALLELISM=false (one core), then `num_proc` = every core: MB of text per
   second, per core.
3. Host input pipeline: batches/s of `input_pipeline.train_batches` at 128 rows x 128 tokens
   over 200,000 memory-mapped uint16 blocks, alone and with `sharding.shard_batch` onto
   the local devices; and the time to shuffle one batch's 128 row indices with Grain's
   scalar `index_shuffle` against the vectorized `input_pipeline.permute`.
Nothing is left behind: the temporary folder is deleted.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import numpy as np  # pylint: disable=wrong-import-position


def write_corpus(path: str, size_mb: float) -> None:
  """One answer per line, the sample's answers in a new seeded order each pass."""
  from mlm_jax.data import sources  # pylint: disable=import-outside-toplevel
  with open(sources.sample_data_path(), encoding='utf-8') as f:
    answers = [' '.join(json.loads(line)['answers']['text']) for line in f]
  target, written, rng = size_mb * 1e6, 0, random.Random(0)
  with open(path, 'w', encoding='utf-8') as out:
    while written < target:
      rng.shuffle(answers)
      for answer in answers:
        out.write(answer + '\n')
        written += len(answer.encode()) + 1


_RSS_OF_CHILD = '''
import resource, subprocess, sys
status = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                        text=True).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, status)
'''


def peak_rss_mb(corpus: str, cache: str, workdir: str, steps: int) -> tuple[float, float]:
  """(peak RSS in MB, wall seconds) of run_train.py on `corpus` from an empty cache."""
  command = [sys.executable, os.path.join(ROOT, 'run_train.py'), '--config=configs/tiny_test.py',
             f'--config.data_files={corpus}', '--config.split=train',
             f'--config.num_train_steps={steps}', f'--config.eval_every_steps={steps}',
             f'--config.checkpoint_every_steps={steps}', f'--config.cache_dir={cache}',
             f'--workdir={workdir}']
  start = time.time()
  result = subprocess.run([sys.executable, '-c', _RSS_OF_CHILD, *command], cwd=ROOT,
                          capture_output=True, text=True, check=True)
  kilobytes, status = result.stdout.split()
  if status != '0':
    raise RuntimeError(f'run_train.py failed on {corpus}')
  return int(kilobytes) / 1024, time.time() - start


def preparation_mb_per_s(corpus: str, cache: str, num_proc: int) -> float:
  """MB of text per second tokenizing `corpus` into blocks (split and writing included)."""
  from etils import epath  # pylint: disable=import-outside-toplevel
  from mlm_jax.data import preparation, sources  # pylint: disable=import-outside-toplevel
  from configs import tiny_test  # pylint: disable=import-outside-toplevel
  config = tiny_test.get_config()
  config.data_files, config.split, config.cache_dir = corpus, 'train', cache
  tokenizer = preparation.prepare(config, log=lambda _: None, progress=False).tokenizer
  corpus_stream = sources.load_corpus(config, log=lambda _: None)
  folder = tempfile.mkdtemp(dir=cache)
  start = time.perf_counter()
  preparation.write_blocks(corpus_stream, tokenizer, epath.Path(folder),
                           config.block_size, num_proc, progress=False)
  return os.path.getsize(corpus) / 1e6 / (time.perf_counter() - start)


def batches_per_s(folder: str, rows: int = 128, length: int = 128, count: int = 2000):
  """(loader batches/s, loader + shard_batch batches/s) at rows x length."""
  import jax  # pylint: disable=import-outside-toplevel
  from mlm_jax.data import input_pipeline, sharding  # pylint: disable=import-outside-toplevel
  path = os.path.join(folder, 'blocks.bin')
  np.random.default_rng(0).integers(5, 50265, (200_000, length), np.uint16).tofile(path)
  blocks = np.memmap(path, np.uint16, 'r', shape=(200_000, length))
  mesh = sharding.make_mesh()
  rates = []
  for place in (False, True):
    batches = input_pipeline.train_batches(blocks, rows, 1, seed=0)
    next(batches)
    start = time.perf_counter()
    for _ in range(count):
      batch = next(batches)
      if place:
        batch = sharding.shard_batch(batch, mesh, batch_axis=1)
    if place:
      jax.block_until_ready(batch)
    rates.append(count / (time.perf_counter() - start))
  return tuple(rates)


def shuffle_ms_per_batch(rows: int = 128, size: int = 200_000, count: int = 200):
  """(Grain's scalar `index_shuffle`, `input_pipeline.permute`) ms to shuffle one batch's rows."""
  import grain  # pylint: disable=import-outside-toplevel
  from mlm_jax.data import input_pipeline  # pylint: disable=import-outside-toplevel
  indices = np.arange(rows)
  start = time.perf_counter()
  for _ in range(count):
    [grain.experimental.index_shuffle(int(i), max_index=size - 1, seed=1, rounds=4)
     for i in indices]
  grain_ms = (time.perf_counter() - start) / count * 1e3
  start = time.perf_counter()
  for _ in range(count):
    input_pipeline.permute(indices, size, seed=1)
  return grain_ms, (time.perf_counter() - start) / count * 1e3


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sizes_mb', default='5,50')
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--json', default='')
  args = parser.parse_args()
  print(f'load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores')
  results = {'cores': os.cpu_count(), 'load_average': os.getloadavg()[0]}
  folder = tempfile.mkdtemp(prefix='mlm_jax_input_bench_')
  try:
    sizes = [float(s) for s in args.sizes_mb.split(',')]
    corpora = {}
    for size in sizes:
      corpora[size] = os.path.join(folder, f'corpus_{size:g}mb.txt')
      write_corpus(corpora[size], size)
      rss, wall = peak_rss_mb(corpora[size], os.path.join(folder, f'cache_{size:g}'),
                              os.path.join(folder, f'run_{size:g}'), args.steps)
      results[f'peak_rss_mb_{size:g}mb'] = rss
      print(f'run_train.py on {size:g} MB of text ({args.steps} steps, empty cache): '
            f'peak RSS {rss:.0f} MB, {wall:.0f} s')
    if len(sizes) > 1:
      growth = results[f'peak_rss_mb_{sizes[-1]:g}mb'] - results[f'peak_rss_mb_{sizes[0]:g}mb']
      results['peak_rss_growth_mb'] = growth
      print(f'peak RSS growth {sizes[0]:g} -> {sizes[-1]:g} MB: {growth:+.0f} MB')
    largest = corpora[sizes[-1]]
    cache = os.path.join(folder, f'cache_{sizes[-1]:g}')
    for num_proc in sorted({1, os.cpu_count()}):
      rate = preparation_mb_per_s(largest, cache, num_proc)
      results[f'prepare_mb_per_s_num_proc_{num_proc}'] = rate
      print(f'preparation, num_proc={num_proc}: {rate:.2f} MB/s, {rate / num_proc:.2f} MB/s '
            'per core')
    loader, placed = batches_per_s(folder)
    results.update(loader_batches_per_s=loader, placed_batches_per_s=placed)
    grain_ms, permute_ms = shuffle_ms_per_batch()
    results.update(grain_index_shuffle_ms=grain_ms, permute_ms=permute_ms)
    print(f'shuffling 128 rows: {grain_ms:.2f} ms with grain index_shuffle (one call per row), '
          f'{permute_ms:.2f} ms with input_pipeline.permute')
    print(f'host input at 128 x 128: {loader:,.0f} batches/s (loader), {placed:,.0f} '
          'batches/s (loader + shard_batch)')
  finally:
    shutil.rmtree(folder, ignore_errors=True)
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
