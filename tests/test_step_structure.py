"""The compiled train step's structure: the GPU hot spots, caught on CPU, and its FLOPs.

On an H100 most of transformers' Flax RoBERTa step goes to two embedding backwards: a
bfloat16 scatter-add into the word table (the table is cast before its gather) and a
per-token scatter-add into the position table (positions are gathered per token).
`model_impl='fast'` removes both. These tests read the HLO of the package's real step
(built as `benchmarks/train_step.py` builds it) so that a change bringing either back
fails here, without a GPU. Each check is also run on transformers' step, where the
pattern is known to be present: a checker that cannot see it fails that test.
"""

import re
import sys

import numpy as np
import pytest

from mlm_jax import sharding
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / 'benchmarks'))
import train_step as bench  # pylint: disable=wrong-import-position

# Sizes chosen so that each table's shape is unique in the HLO.
VOCAB, HIDDEN, POSITIONS = 97, 24, 514


def step_hlo(impl: str) -> str:
  """Unoptimised HLO text of the bf16, masked-head train step of the package."""
  shape = bench.Shape(layers=1, hidden=HIDDEN, heads=2, intermediate=40, vocab=VOCAB, seq=16,
                      batch=2, dtype='bfloat16', masked_head=True, impl=impl)
  mesh = sharding.make_mesh(1)
  steps, state, _ = bench.build_step(shape, mesh, total_steps=10)
  assert bench.model_config(shape).max_position_embeddings == POSITIONS
  batch = sharding.shard_batch(bench.random_ids(shape, 2, np.random.default_rng(0)), mesh,
                               batch_axis=1)
  return steps.train.lower(state, batch).as_text(dialect='hlo')


def scatters_into(hlo: str, dtype: str, rows: int) -> list[str]:
  """The scatter instructions whose result is a [rows, HIDDEN] table of `dtype`."""
  pattern = re.compile(rf'= {dtype}\[{rows},{HIDDEN}\]\{{[0-9,]*\}} scatter\(')
  return [line.strip() for line in hlo.splitlines() if pattern.search(line)]


@pytest.fixture(scope='module')
def hlo():
  return {impl: step_hlo(impl) for impl in ('fast', 'transformers')}


def test_word_table_gradient_is_no_bfloat16_scatter(hlo):
  assert scatters_into(hlo['transformers'], 'bf16', VOCAB)  # The checker sees the slow path.
  assert not scatters_into(hlo['fast'], 'bf16', VOCAB)
  assert scatters_into(hlo['fast'], 'f32', VOCAB)  # The float32 table's own gradient.


def test_position_rows_are_not_gathered_per_token(hlo):
  per_token = lambda text: (scatters_into(text, 'bf16', POSITIONS)
                            + scatters_into(text, 'f32', POSITIONS))
  assert per_token(hlo['transformers'])  # The checker sees the slow path.
  assert not per_token(hlo['fast'])


def test_benchmark_flops_count_what_the_masked_head_step_executes():
  """The FLOPs the masked head saves, by the benchmark's count, are those XLA counts in the
  steps (MFU must not credit the full head the step no longer runs). XLA counts the lowered
  programs: the compiled ones save the same FLOPs within 0.2% here, and compiling both
  would cost 12 s."""
  counted, executed = {}, {}
  for masked_head in (False, True):
    shape = bench.Shape(layers=1, hidden=HIDDEN, heads=2, intermediate=40, vocab=1024, seq=32,
                        batch=4, dtype='float32', masked_head=masked_head, impl='transformers')
    mesh = sharding.make_mesh(1)
    steps, state, params = bench.build_step(shape, mesh, total_steps=10)
    batch = sharding.shard_batch(bench.random_ids(shape, 4, np.random.default_rng(0)), mesh,
                                 batch_axis=1)
    counted[masked_head] = bench.flops_per_token(params, shape) * 4 * 32
    executed[masked_head] = steps.train.lower(state, batch).cost_analysis()['flops']
  assert counted[True] < counted[False]
  saved_by_count = counted[False] - counted[True]
  saved_by_xla = executed[False] - executed[True]
  assert saved_by_count == pytest.approx(saved_by_xla, rel=0.1)
