"""BERT-style dynamic masking as a pure, shape-static JAX function.

It runs on the device inside the compiled step. Every row draws from its own key,
`fold_in(rng, global_row_index)`, so a row's mask depends only on the step's rng
and the row's place in the global batch: a run on 8 devices masks exactly as a
run on 1, under `jax.jit` (sharded batch) and `jax.pmap` (pass the offset of the
device's first row, `first_row`) alike, whatever the gradient accumulation.
"""

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mlm_jax import tokenizer as tokenizer_lib
from mlm_jax.errors import UserError


def check_probability(probability: float) -> None:
  if not 0 < probability < 1:
    raise UserError(f'mlm_probability={probability} must be in (0, 1); '
                    'set --config.mlm_probability, e.g. 0.15')


@dataclasses.dataclass(frozen=True)
class MaskingSpec:
  """What masking needs to know of the tokenizer; static and hashable."""
  mask_token_id: int
  special_ids: tuple[int, ...]
  vocab_size: int
  probability: float = 0.15
  mask_fraction: float = 0.8  # Of the chosen tokens, become the mask token ...
  random_fraction: float = 0.1  # ... become a random non-special token; the rest stay.

  def __post_init__(self):
    check_probability(self.probability)

  @property
  def replacement_ids(self) -> np.ndarray:
    return np.setdiff1d(np.arange(self.vocab_size), np.asarray(self.special_ids, np.int32))


def masking_spec(tokenizer, probability: float) -> MaskingSpec:
  return MaskingSpec(mask_token_id=tokenizer.mask_token_id,
                     special_ids=tokenizer_lib.special_token_ids(tokenizer),
                     vocab_size=len(tokenizer), probability=probability)


def special_tokens_mask(ids: jax.Array, special_ids: Sequence[int]) -> jax.Array:
  """True where `ids` is a special (or padding) token that masking must not choose."""
  return jnp.isin(ids, jnp.asarray(special_ids, ids.dtype))


def _mask_row(key: jax.Array, ids: jax.Array, special: jax.Array, spec: MaskingSpec):
  choose_key, action_key, token_key = jax.random.split(key, 3)
  chosen = (jax.random.uniform(choose_key, ids.shape) < spec.probability) & ~special
  action = jax.random.uniform(action_key, ids.shape)
  replacements = jnp.asarray(spec.replacement_ids, ids.dtype)
  random_tokens = replacements[
      jax.random.randint(token_key, ids.shape, 0, replacements.shape[0])]
  to_mask = chosen & (action < spec.mask_fraction)
  to_random = chosen & (action >= spec.mask_fraction) & (
      action < spec.mask_fraction + spec.random_fraction)
  inputs = jnp.where(to_mask, spec.mask_token_id, jnp.where(to_random, random_tokens, ids))
  return inputs, chosen


def mask_tokens(rng: jax.Array, ids: jax.Array, special: jax.Array, spec: MaskingSpec,
                first_row: int | jax.Array = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Masks a [batch, length] block of token ids.

  Args:
    rng: the step's key (a fresh one per step: fold in the step number).
    ids: int token ids, [batch, length].
    special: bool, True at special and padding positions (never chosen).
    spec: the masking parameters.
    first_row: global index of row 0 of `ids` (non-zero under pmap or for
      micro-batches), so that each row's draw depends on its global index only.

  Returns:
    (inputs, labels, weights): the masked inputs, the original ids as labels, and
    float32 weights that are 1 at the chosen positions and 0 elsewhere.
  """
  rows = first_row + jnp.arange(ids.shape[0])
  keys = jax.vmap(lambda row: jax.random.fold_in(rng, row))(rows)
  inputs, chosen = jax.vmap(lambda k, i, s: _mask_row(k, i, s, spec))(keys, ids, special)
  return inputs, ids, chosen.astype(jnp.float32)
