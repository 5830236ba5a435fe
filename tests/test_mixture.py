"""Mixed corpora (`--config.mixture`): weighted sources, each prepared and evaluated on its own.

Guards the mixture's syntax and its one-line errors; that the mixed batches follow the weights
within 1% over an epoch, read each source's blocks at most once an epoch, resume exactly at
any step and split over hosts as one process reads them; that each source is prepared into
its own cache folder, the blocks a run of that source alone prepares, once per cluster; and
that a run reports each source's perplexity at every evaluation (metrics file, TensorBoard,
log line, closing summary, `evaluate`) beside the overall figures, and resumes exactly.
"""

import contextlib
import io
import itertools
import json
import os
import shutil
import sys

import numpy as np
import pytest

from mlm_jax import checkpoint
from mlm_jax import evaluation
from mlm_jax import metric_writers
from mlm_jax import train
from mlm_jax import validation
from mlm_jax.data import input_pipeline
from mlm_jax.data import mixture
from mlm_jax.data import preparation
from mlm_jax.data import sources
from mlm_jax.errors import UserError
from tests.conftest import load_config
from tests.multidevice import assert_same_training, free_port, run_hosts
from tests.test_data import read_sample, write_jsonl

_QUIET = {'log': lambda message: None, 'progress': False}
_DOMAIN = ('Biology', 'Medicine')


@pytest.fixture(scope='module')
def corpora(tmp_path_factory) -> dict[str, str]:
  """The shipped sample as a domain corpus (its biology and medicine questions, .jsonl) and a
  general one (the rest, one document per line of a .txt in a folder)."""
  folder = tmp_path_factory.mktemp('corpora')
  records = read_sample()
  domain = write_jsonl(folder / 'domain.jsonl', [r for r in records if r['category'] in _DOMAIN])
  (folder / 'general').mkdir()
  with open(folder / 'general' / 'part-0.txt', 'w', encoding='utf-8') as f:
    for record in records:
      if record['category'] not in _DOMAIN:
        f.write(' '.join(record['answers']['text']).replace('\n', ' ') + '\n')
  return {'domain': domain, 'general': str(folder / 'general' / '*.txt')}


def mixture_config(corpora, cache_dir, weights=(0.7, 0.3)):
  config = load_config('tiny_test')
  config.split, config.cache_dir = 'train', str(cache_dir)
  config.mixture = (f'{corpora["domain"]}:{weights[0]},'
                    f'general={corpora["general"]}:{weights[1]}')
  return config


# ----------------------------------------------------------------------------
# The syntax


def test_entries_are_named_files_and_weights_in_order():
  assert mixture.parse('notes=a/n.jsonl:0.7, gs://bucket/wiki/*.txt:0.3') == (
      mixture.Source('notes', 'a/n.jsonl', 0.7),
      mixture.Source('wiki', 'gs://bucket/wiki/*.txt', 0.3))


@pytest.mark.parametrize('files, name', [
    ('domain.jsonl', 'domain'), ('data/clinical.notes.parquet', 'clinical'),
    ('general/*.txt', 'general'), ('gs://b/wiki/2024/part-*.parquet', '2024'),
    ('corpus/*/shard.txt', 'corpus')])
def test_an_unnamed_source_is_named_after_its_file_or_the_folder_before_the_glob(files, name):
  assert mixture.parse(f'{files}:1')[0].name == name


def test_weights_are_relative():
  assert mixture.proportions(mixture.parse('a.txt:7,b.txt:3')) == pytest.approx((0.7, 0.3))
  assert mixture.proportions(mixture.parse('a.txt:14,b.txt:6')) == pytest.approx((0.7, 0.3))


@pytest.mark.parametrize('spec, says', [
    ('a.txt:0.7,b.txt', "mixture entry 'b.txt' has no weight; write it FILES:WEIGHT"),
    ('a.txt:0.7,b.txt:0', "the weight '0' must be a positive number"),
    ('a.txt:0.7,b.txt:-1', "the weight '-1' must be a positive number"),
    ('a.txt:0.7,b.txt:nan', "the weight 'nan' must be a positive number"),
    ('a.txt:0.7,b.txt:lots', "the weight 'lots' must be a positive number"),
    ('a.txt:0.7,,b.txt:0.3', 'has an empty entry'),
    ('a.txt:0.7,b.txt:0.3,', 'has an empty entry'),
    ('x=:0.7', 'names no files'),
    ('*.txt:1', "the source name '' must be letters"),
    ('a/x.txt:1,b/x.txt:1', "names the source 'x' twice"),
])
def test_a_bad_mixture_is_one_line_naming_the_entry_and_the_fix(spec, says):
  config = load_config('tiny_test')
  config.mixture = spec
  with pytest.raises(UserError) as error:
    validation.validate_config(config)
  message = str(error.value)
  assert says in message and '--config.mixture' in message and '\n' not in message


def test_a_mixture_beside_data_files_is_refused():
  config = load_config('tiny_test')
  config.mixture, config.data_files = 'a.txt:1,b.txt:1', 'c.txt'
  with pytest.raises(UserError, match='drop --config.data_files'):
    validation.validate_config(config)


def test_a_mixture_wins_over_a_configs_dataset(corpora, tmp_path):
  """As `data_files` does: configs/eli5_distilroberta.py names a hub dataset."""
  config = mixture_config(corpora, tmp_path / 'cache')
  config.dataset = 'no/such-dataset'
  validation.validate_config(config)
  names = [s.name for s in preparation.prepare_sources(config, **_QUIET).sources]
  assert names == ['domain', 'general']


# ----------------------------------------------------------------------------
# The mixed batches

BLOCK_SIZE, GLOBAL_BATCH = 4, 8
SIZES, WEIGHTS = (700, 1000), (0.7, 0.3)


def source_blocks(sizes=SIZES) -> list[np.ndarray]:
  """Block b of source i holds ids 1e6 * (i + 1) + 4b + [0, 4): a row names its source and block."""
  return [(np.arange(n * BLOCK_SIZE, dtype=np.int32) + 10**6 * (i + 1)).reshape(n, BLOCK_SIZE)
          for i, n in enumerate(sizes)]


def rows(num_steps: int, weights=WEIGHTS, sizes=SIZES, start_step: int = 0, seed: int = 0):
  """The rows of steps [start_step, start_step + num_steps), as (source, block) pairs."""
  batches = input_pipeline.train_batches(source_blocks(sizes), GLOBAL_BATCH, 2, seed,
                                         start_step, weights)
  ids = np.concatenate([b.reshape(-1, BLOCK_SIZE) for b in itertools.islice(batches, num_steps)])
  return list(zip((ids[:, 0] // 10**6 - 1).tolist(), (ids[:, 0] % 10**6 // BLOCK_SIZE).tolist()))


def epoch_steps(sizes=SIZES, weights=WEIGHTS) -> int:
  return input_pipeline.steps_per_epoch(input_pipeline.blocks_per_epoch(sizes, weights),
                                        GLOBAL_BATCH)


@pytest.mark.parametrize('weights, sizes', [((0.7, 0.3), (700, 1000)),
                                            ((0.3, 0.7), (1000, 700)),
                                            ((5, 3, 2), (500, 400, 300))])
def test_an_epoch_draws_each_source_within_1_percent_of_its_weight(weights, sizes):
  drawn = [source for source, _ in rows(epoch_steps(sizes, weights), weights, sizes)]
  shares = np.bincount(drawn, minlength=len(sizes)) / len(drawn)
  assert len(drawn) >= 900  # 1% of the rows is some rows.
  np.testing.assert_allclose(shares, np.asarray(weights) / sum(weights), atol=0.01)


def test_every_batch_follows_the_weights_not_only_the_epoch():
  """Grain's mixing interleaves the sources evenly: 8 rows at 0.7 / 0.3 hold 5 or 6 of the
  first source, never a run of one source."""
  drawn = [source for source, _ in rows(20)]
  per_batch = [drawn[i:i + GLOBAL_BATCH].count(0) for i in range(0, len(drawn), GLOBAL_BATCH)]
  assert set(per_batch) <= {5, 6}


def test_rows_are_whole_blocks_of_their_source_each_at_most_once_an_epoch():
  blocks = source_blocks()
  batches = input_pipeline.train_batches(blocks, GLOBAL_BATCH, 2, 0, 0, WEIGHTS)
  drawn = []
  for batch in itertools.islice(batches, epoch_steps()):
    for row in batch.reshape(-1, BLOCK_SIZE):
      source, block = int(row[0] // 10**6 - 1), int(row[0] % 10**6 // BLOCK_SIZE)
      np.testing.assert_array_equal(row, blocks[source][block])
      drawn.append((source, block))
  assert len(drawn) == len(set(drawn))
  # The epoch ends as the first source (700 blocks at 0.7 of 1,000 rows) is read once.
  assert epoch_steps() == 1000 // GLOBAL_BATCH


def test_the_next_epoch_reads_each_source_in_a_new_order():
  steps = epoch_steps()
  drawn = rows(2 * steps)
  first, second = drawn[:steps * GLOBAL_BATCH], drawn[steps * GLOBAL_BATCH:]
  assert [b for s, b in first if s == 0] != [b for s, b in second if s == 0]
  assert len(set(second)) == len(second)


@pytest.mark.parametrize('start_step', [1, 124, 125, 131])
def test_starting_at_a_step_yields_what_an_uninterrupted_run_yields_from_there(start_step):
  """Exact resume, also across the mixture's epoch boundary (125 steps here)."""
  assert rows(6, start_step=start_step) == rows(start_step + 6)[start_step * GLOBAL_BATCH:]


def test_the_mixture_depends_on_the_seed():
  assert rows(10, seed=0) != rows(10, seed=1)


def test_one_source_reads_as_a_run_without_a_mixture():
  """A one-source mixture (or a run of one source) keeps the batches runs had before mixing."""
  blocks = source_blocks((50,))[0]
  alone = itertools.islice(input_pipeline.train_batches(blocks, GLOBAL_BATCH, 2, 3), 12)
  listed = itertools.islice(input_pipeline.train_batches([blocks], GLOBAL_BATCH, 2, 3, 0, [1.0]),
                            12)
  for expected, actual in zip(alone, listed):
    np.testing.assert_array_equal(actual, expected)


# ----------------------------------------------------------------------------
# Preparing the sources


def test_each_source_is_prepared_as_a_run_of_it_alone_into_its_own_folder(corpora, tmp_path):
  config = mixture_config(corpora, tmp_path / 'cache')
  prepared = preparation.prepare_sources(config, **_QUIET)
  assert [(s.name, s.weight) for s in prepared.sources] == [('domain', 0.7), ('general', 0.3)]
  assert prepared.sources[0].blocks.directory != prepared.sources[1].blocks.directory
  for chosen, source in zip(mixture.parse(config.mixture), prepared.sources):
    alone = preparation.prepare(preparation.source_config(config, chosen), prepared.tokenizer,
                                **_QUIET)
    assert alone.from_cache and alone.blocks.directory == source.blocks.directory
    assert len(source.blocks.test) > 0


def test_a_from_scratch_tokenizer_learns_from_every_source_by_its_weight(corpora, tmp_path):
  """Of `tokenizer_train_max_texts` = 10 texts at 0.7 / 0.3: the first 7 train texts of the
  domain corpus, then the first 3 of the general one."""
  config = mixture_config(corpora, tmp_path / 'cache')
  config.tokenizer_train_max_texts = 10
  expected = []
  for source, count in zip(mixture.parse(config.mixture), (7, 3)):
    corpus = sources.load_corpus(preparation.source_config(config, source), lambda m: None)
    expected += list(corpus.train_texts(count))
  assert list(preparation._mixture_texts(config, lambda m: None)) == expected  # pylint: disable=protected-access


def test_a_source_that_matches_no_file_is_one_line_naming_it(corpora, tmp_path):
  config = mixture_config(corpora, tmp_path / 'cache')
  config.mixture += f',missing={tmp_path}/nothing/*.jsonl:0.1'
  with pytest.raises(UserError) as error:
    preparation.prepare_sources(config, **_QUIET)
  message = str(error.value)
  assert message.startswith("mixture source 'missing' (") and 'does not exist' in message
  assert 'check --config.mixture' in message and '\n' not in message


def test_a_source_too_small_for_a_split_is_one_line_naming_it(corpora, tmp_path):
  config = mixture_config(corpora, tmp_path / 'cache')
  write_jsonl(tmp_path / 'one.jsonl', read_sample()[:1])
  config.mixture += f',{tmp_path}/one.jsonl:0.1'
  with pytest.raises(UserError, match=r"^mixture source 'one' \(.*at least 2"):
    preparation.prepare_sources(config, **_QUIET)


_HOST = '''
import hashlib, itertools, json, sys
from mlm_jax import cli
cli.initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
from tests.conftest import load_config
from mlm_jax import run
from mlm_jax.data import input_pipeline
config = load_config('tiny_test')
config.split, config.cache_dir, config.mixture = 'train', sys.argv[3], sys.argv[4]
tokenizer, sources = run.prepare_data(config, sys.argv[5])
batches = input_pipeline.train_batches([s.blocks.train for s in sources], 8, 2, 0, 3,
                                       [s.weight for s in sources])
print(json.dumps([b.tolist() for b in itertools.islice(batches, 4)]))
'''


def test_two_hosts_prepare_the_sources_once_and_read_their_rows_of_the_mixed_batches(
    corpora, tmp_path):
  """Process 0 prepares every source while process 1 waits; each host's rows of a global
  batch are its half of the batch one process reads, from step 3 on."""
  config = mixture_config(corpora, tmp_path / 'own_cache')
  address = f'127.0.0.1:{free_port()}'
  outputs = run_hosts([[sys.executable, '-c', _HOST, address, str(index),
                        str(tmp_path / 'shared_cache'), config.mixture, str(tmp_path / 'run')]
                       for index in range(2)], devices=1)
  assert outputs[0][0].count('Prepared') == 2 and 'Prepared' not in outputs[1][0]
  hosts = [np.asarray(json.loads(stdout.strip().splitlines()[-1])) for stdout, _ in outputs]
  prepared = preparation.prepare_sources(config, **_QUIET)
  one = np.stack(list(itertools.islice(input_pipeline.train_batches(
      [s.blocks.train for s in prepared.sources], 8, 2, 0, 3, [0.7, 0.3]), 4)))
  # [steps, grad_accum, rows, block_size]: host 0 holds rows 0-1 of each micro-batch.
  np.testing.assert_array_equal(np.concatenate(hosts, axis=2), one)


# ----------------------------------------------------------------------------
# A run


@pytest.fixture(scope='module')
def mixed_run(corpora, tmp_path_factory):
  """The tiny config on the domain and general corpora at 0.7 / 0.3: (config, workdir, summary,
  what it printed)."""
  workdir = str(tmp_path_factory.mktemp('mixed_run'))
  config = mixture_config(corpora, tmp_path_factory.mktemp('cache'))
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    summary = train.train_and_evaluate(config, workdir)
  return config, workdir, summary, printed.getvalue()


def test_every_evaluation_records_each_sources_figures_beside_the_overall_ones(mixed_run):
  config, workdir, *_ = mixed_run
  evals = [r for r in metric_writers.read_metrics(workdir) if 'eval_loss' in r]
  assert [r['step'] for r in evals] == [0, 10, 20]
  for record in evals:
    for name in ('domain', 'general'):
      assert {f'eval/{name}/{k}' for k in ('loss', 'perplexity', 'accuracy', 'masked_tokens')
              } <= set(record)
      assert record[f'eval/{name}/perplexity'] == pytest.approx(
          np.exp(record[f'eval/{name}/loss']))
    # The overall loss is that of both test splits as one: the sources' token-weighted mean.
    counts = [record[f'eval/{n}/masked_tokens'] for n in ('domain', 'general')]
    assert record['eval_masked_tokens'] == sum(counts)
    assert record['eval_loss'] == pytest.approx(
        np.average([record['eval/domain/loss'], record['eval/general/loss']], weights=counts))


def test_the_sources_perplexities_differ_and_both_fall(mixed_run):
  _, workdir, summary, _ = mixed_run
  by_source = summary['perplexity_by_source']
  assert set(by_source) == {'domain', 'general'}
  for own in by_source.values():
    assert own['perplexity_after'] < own['perplexity_before']
  assert by_source['domain']['perplexity_after'] != by_source['general']['perplexity_after']
  last = [r for r in metric_writers.read_metrics(workdir) if 'eval_loss' in r][-1]
  assert by_source['domain']['perplexity_after'] == last['eval/domain/perplexity']


def test_a_resumed_mixed_run_trains_as_the_uninterrupted_one(mixed_run, tmp_path):
  """Steps 11-20 again from the step-10 checkpoint: the same rows of each source, so the same
  parameters and logged losses."""
  config, workdir, *_ = mixed_run
  resumed = tmp_path / 'run'
  shutil.copytree(workdir, resumed)
  shutil.rmtree(resumed / 'checkpoints' / '20')
  shutil.rmtree(resumed / 'export')
  assert train.train_and_evaluate(config, str(resumed))['steps_this_run'] == 10
  assert_same_training(workdir, resumed)
  manager = checkpoint.make_manager(str(resumed), keep=None, create=False)
  # An epoch of the mixture is 134 batches of 8 (the domain corpus read once at 0.7).
  cursor = checkpoint.read_metadata(manager, 20)[0]
  assert {k: cursor[k] for k in ('epoch', 'batch', 'schedule_steps')} == {
      'epoch': 0, 'batch': 20, 'schedule_steps': 20}


def test_a_resume_with_other_weights_is_refused(mixed_run, corpora):
  config, workdir, *_ = mixed_run
  changed = mixture_config(corpora, config.cache_dir, weights=(0.5, 0.5))
  with pytest.raises(UserError, match=r'mixture: .*:0\.7,.* -> .*:0\.5,'):
    train.train_and_evaluate(changed, workdir)


def test_evaluate_gives_the_runs_last_figures_for_each_source(mixed_run):
  config, workdir, *_ = mixed_run
  figures = evaluation.evaluate_model(config, workdir, log=lambda message: None)
  last = [r for r in metric_writers.read_metrics(workdir) if 'eval_loss' in r][-1]
  for key in ('eval_loss', 'eval/domain/loss', 'eval/general/perplexity',
              'eval/general/masked_tokens'):
    assert figures[key] == pytest.approx(last[key], rel=1e-6), key
  assert 'domain: perplexity' in evaluation.describe(figures, config.block_size)


def tensorboard_scalars(folder: str) -> dict[str, list[int]]:
  """{tag: [steps]} of the scalars in a TensorBoard folder's event files, read as TFRecords
  (a length, its CRC, an `Event` proto, its CRC) with tensorboardX's protos."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  scalars: dict[str, list[int]] = {}
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name), 'rb') as f:
      data = f.read()
    position = 0
    while position < len(data):
      length = int.from_bytes(data[position:position + 8], 'little')
      event = event_pb2.Event.FromString(data[position + 12:position + 12 + length])
      position += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append(event.step)
  return scalars


def test_tensorboard_has_each_sources_scalars(mixed_run):
  _, workdir, *_ = mixed_run
  scalars = tensorboard_scalars(os.path.join(workdir, 'tensorboard'))
  for name in ('domain', 'general'):
    for figure in ('loss', 'perplexity', 'accuracy'):
      assert scalars[f'eval/{name}/{figure}'] == [0, 10, 20]
  assert scalars['eval_loss'] == [0, 10, 20]


def test_the_log_and_the_summary_name_each_sources_perplexity(mixed_run):
  """A line per evaluation and the closing summary, with each source's perplexity; the start
  names each source's blocks and share of the rows."""
  _, workdir, _, out = mixed_run
  records = {r['step']: r for r in metric_writers.read_metrics(workdir) if 'eval_loss' in r}
  for step in (0, 10, 20):
    r = records[step]
    assert (f'step {step}: eval perplexity {r["eval_perplexity"]:.3f}, '
            f'domain {r["eval/domain/perplexity"]:.3f}, '
            f'general {r["eval/general/perplexity"]:.3f}\n') in out
  for name in ('domain', 'general'):
    assert (f'    {name}: {records[0][f"eval/{name}/perplexity"]:.2f} -> '
            f'{records[20][f"eval/{name}/perplexity"]:.2f}\n') in out
  assert '70% of the rows' in out and '30% of the rows' in out


# ----------------------------------------------------------------------------
# The best checkpoint by one source's loss


def test_keep_best_by_takes_a_sources_loss_and_no_other_name():
  config = load_config('tiny_test')
  config.mixture = 'notes=a.jsonl:0.7,wiki=b.txt:0.3'
  config.keep_best_by = 'eval/notes/loss'
  validation.validate_config(config)
  config.keep_best_by = 'eval/news/loss'
  with pytest.raises(UserError, match="one of 'eval_loss', '', 'eval/notes/loss', "
                                      "'eval/wiki/loss'"):
    validation.validate_config(config)


def test_the_best_checkpoint_by_a_sources_loss_is_that_sources_best(corpora, tmp_path):
  """The summary's best step is the one with the lowest `eval/general/loss` after training,
  and its perplexity that source's, not the overall one."""
  config = mixture_config(corpora, tmp_path / 'cache')
  config.keep_best_by = 'eval/general/loss'
  workdir = str(tmp_path / 'run')
  with contextlib.redirect_stdout(io.StringIO()):
    summary = train.train_and_evaluate(config, workdir)
  evals = [r for r in metric_writers.read_metrics(workdir) if 'eval_loss' in r and r['step']]
  best = min(evals, key=lambda r: r['eval/general/loss'])
  assert summary['best_step'] == best['step']
  assert summary['best_perplexity'] == pytest.approx(best['eval/general/perplexity'])
  assert summary['best_perplexity'] != pytest.approx(best['eval_perplexity'])
