"""The compiled train step's structure: the GPU hot spots, caught on CPU, and its FLOPs.

On an H100 most of transformers' former Flax RoBERTa step went to two embedding backwards: a
bfloat16 scatter-add into the word table (the table was cast before its gather) and a
per-token scatter-add into the position table (positions were gathered per token). The
project's models gather float32 tables and add position rows as a broadcast slice. These
tests read the HLO of the package's real bf16 step so that a change bringing either back
fails here, without a GPU, as they do for float32 products in the bf16 step (on a GPU a
product with a float32 operand leaves the bfloat16 tensor cores). Each checker is first
shown the pattern it looks for, in a small function that has it: a checker that cannot
see it fails that test.
"""

import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers

from mlm_jax import masking
from mlm_jax import model as model_lib
from mlm_jax import sharding
from mlm_jax import steps as steps_lib
from mlm_jax.models import FlaxAutoModelForMaskedLM
from mlm_jax.models import layers
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / 'benchmarks'))
import train_step as bench  # pylint: disable=wrong-import-position

# Sizes chosen so that each table's shape is unique in the HLO.
VOCAB, HIDDEN, POSITIONS, SEQ = 97, 24, 514, 16


def roberta_config() -> transformers.PretrainedConfig:
  """A tiny RoBERTa with attention dropout (the step writes attention out)."""
  return transformers.RobertaConfig(
      vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2,
      intermediate_size=40, max_position_embeddings=POSITIONS, pad_token_id=1, type_vocab_size=1)


def modernbert_config() -> transformers.PretrainedConfig:
  """A tiny ModernBERT without attention dropout (its default), a local and a global layer."""
  return transformers.ModernBertConfig(
      vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=40, num_hidden_layers=2,
      num_attention_heads=2, global_attn_every_n_layers=2, local_attention=8,
      max_position_embeddings=SEQ, pad_token_id=1, cls_token_id=0, sep_token_id=2,
      bos_token_id=0, eos_token_id=2)


OTHER_FAMILIES = {
    'bert': lambda: transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=40, max_position_embeddings=SEQ),
    'distilbert': lambda: transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=HIDDEN, n_layers=1, n_heads=2, hidden_dim=40,
        max_position_embeddings=SEQ),
    'albert': lambda: transformers.AlbertConfig(
        vocab_size=VOCAB, embedding_size=16, hidden_size=HIDDEN, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=40, max_position_embeddings=SEQ),
}


def step_hlo(config: transformers.PretrainedConfig | None = None) -> str:
  """Unoptimised HLO text of the package's bf16, masked-head train step of a tiny model
  (default: `roberta_config()`)."""
  config = config or roberta_config()
  model = FlaxAutoModelForMaskedLM.from_config(config, dtype=jnp.bfloat16, _do_init=False)
  schedule = optax.constant_schedule(1e-3)
  tx = optax.adamw(schedule)
  mesh = sharding.make_mesh(1)
  state, shardings = steps_lib.init_train_state(model, tx, 0, mesh)
  spec = masking.MaskingSpec(mask_token_id=4, special_ids=(0, 1, 2, 3, 4), vocab_size=VOCAB)
  steps = steps_lib.compile_steps(model, tx, schedule, spec, 0, mesh, shardings,
                                  head_fn=model_lib.head_fn(model), max_predictions=8)
  ids = np.random.default_rng(0).integers(5, VOCAB, (1, 2, SEQ), dtype=np.int32)
  return steps.train.lower(state, sharding.shard_batch(ids, mesh, batch_axis=1)).as_text(
      dialect='hlo')


def scatters_into(hlo: str, dtype: str, rows: int) -> list[str]:
  """The scatter instructions whose result is a [rows, HIDDEN] table of `dtype`."""
  pattern = re.compile(rf'= {dtype}\[{rows},{HIDDEN}\]\{{[0-9,]*\}} scatter\(')
  return [line.strip() for line in hlo.splitlines() if pattern.search(line)]


def float32_products(hlo: str) -> list[str]:
  """The dot instructions of an HLO module's text with a float32 operand."""
  types = dict(re.findall(r'^\s*(?:ROOT )?([\w.\-]+) = (\w+)\[', hlo, re.MULTILINE))
  dots = re.findall(r'^\s*(?:ROOT )?([\w.\-]+) = \w+\[[\d,]*\]\S* dot\(([\w.\-]+), ([\w.\-]+)\)',
                    hlo, re.MULTILINE)
  return [name for name, lhs, rhs in dots if 'f32' in (types[lhs], types[rhs])]


def gradient_hlo(lookup) -> str:
  """HLO of the gradient of a [rows, HIDDEN] table looked up by `lookup(table, ids)`."""
  def loss(table, ids):
    return lookup(table, ids).astype(jnp.float32).sum()
  table = jnp.zeros((POSITIONS, HIDDEN), jnp.float32)
  ids = jnp.zeros((2, SEQ), jnp.int32)
  return jax.jit(jax.grad(loss)).lower(table, ids).as_text(dialect='hlo')


@pytest.fixture(scope='module')
def hlo():
  return step_hlo()


def test_word_table_gradient_is_no_bfloat16_scatter(hlo):
  cast_then_gather = gradient_hlo(lambda table, ids: table.astype(jnp.bfloat16)[ids])
  assert scatters_into(cast_then_gather, 'bf16', POSITIONS)  # The checker sees the slow path.
  assert not scatters_into(hlo, 'bf16', VOCAB)
  assert scatters_into(hlo, 'f32', VOCAB)  # The float32 table's own gradient.


def test_position_rows_are_not_gathered_per_token(hlo):
  per_token = lambda text: (scatters_into(text, 'bf16', POSITIONS)
                            + scatters_into(text, 'f32', POSITIONS))
  assert per_token(gradient_hlo(lambda table, ids: table[ids]))  # The checker sees it.
  assert not per_token(hlo)


@pytest.mark.parametrize('config', [roberta_config, modernbert_config, *OTHER_FAMILIES.values()],
                         ids=['roberta, attention dropout', 'modernbert, sliding window',
                              *OTHER_FAMILIES])
def test_bf16_step_multiplies_only_bfloat16_operands(config):
  """Scores accumulate in float32, so JAX's transpose of the scores' product multiplies their
  float32 gradient with the keys and queries cast up (`layers.attention_scores` does not)."""
  def scores_loss(query, key):
    return jnp.einsum('BTNH,BSNH->BNTS', query, key, preferred_element_type=jnp.float32).sum()
  heads = jnp.zeros((1, SEQ, 2, HIDDEN // 2), jnp.bfloat16)
  assert float32_products(jax.jit(jax.grad(scores_loss, argnums=(0, 1))).lower(
      heads, heads).as_text(dialect='hlo'))  # The checker sees them.
  assert float32_products(step_hlo(config())) == []


@pytest.mark.parametrize('dtype, tolerance', [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_attention_scores_gradient_is_the_einsums_own(dtype, tolerance):
  """The same gradients as JAX's transpose of the product: to float32 rounding in float32,
  to bfloat16's in bfloat16 (its gradient of the scores is rounded before the products)."""
  rng = np.random.default_rng(0)
  query, key = (jnp.asarray(rng.normal(size=(2, 6, 3, 4)), dtype) for _ in range(2))
  weights = jnp.asarray(rng.normal(size=(2, 3, 6, 6)), jnp.float32)
  einsum = lambda q, k: jnp.einsum('BTNH,BSNH->BNTS', q.astype(jnp.float32),
                                   k.astype(jnp.float32))
  gradients = [jax.grad(lambda q, k: (scores(q, k) * weights).sum(), argnums=(0, 1))(query, key)
               for scores in (layers.attention_scores, einsum)]
  for ours, expected in zip(*gradients):
    assert ours.dtype == dtype
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(expected, np.float32),
                               rtol=tolerance, atol=tolerance)


def test_benchmark_flops_count_what_the_masked_head_step_executes():
  """The FLOPs the masked head saves, by the benchmark's count, are those XLA counts in the
  steps (MFU must not credit the full head the step no longer runs). XLA counts the lowered
  programs: the compiled ones save the same FLOPs within 0.2% here, and compiling both
  would cost 12 s."""
  counted, executed = {}, {}
  for masked_head in (False, True):
    shape = bench.Shape(layers=1, hidden=HIDDEN, heads=2, intermediate=40, vocab=1024, seq=32,
                        batch=4, dtype='float32', masked_head=masked_head)
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
