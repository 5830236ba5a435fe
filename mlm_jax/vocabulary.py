"""New vocabulary: whole words added to a pretrained tokenizer, and the rows that the model's
embedding table, untied decoder and decoder bias grow by (`add_tokens`, `add_tokens_file`,
`new_token_init`, `pad_vocab_to_multiple_of`).

A new word's rows start as `new_token_init` says:
- `subwords`: the mean of the rows of the pieces the old tokenizer split it into (fast
  vocabulary transfer, Gee et al. 2022), for the embedding, an untied decoder and the bias;
- `mean_cov`: drawn from a normal with the old embeddings' mean and 1e-9 times their
  covariance, and the bias from the old biases' mean and 1e-9 times their deviation, as
  transformers' `resize_token_embeddings` does (Hewitt 2021);
- `mean`: the old rows' mean.

Rows beyond the tokenizer's length (`pad_vocab_to_multiple_of`) are padding: zero weights
and a decoder bias of `PADDED_BIAS`, so that no loss, fill-mask or score ever gives them a
probability above exp(-1e9) = 0. The bias is no decayed parameter (`optim.decay_mask`), and
its gradient there is that zero probability, so it stays; and it travels in the export, so
PyTorch's fill-mask never predicts them either.
"""

import dataclasses
from typing import Callable

import numpy as np
from flax import traverse_util

from mlm_jax import validation
from mlm_jax.data import tokenizer as tokenizer_lib
from mlm_jax.errors import UserError
from mlm_jax.models import registry

PADDED_BIAS = -1e9
MEAN_COV_EPSILON = 1e-9  # transformers' scale of the covariance it samples new rows from.


@dataclasses.dataclass(frozen=True)
class Plan:
  """Which rows change: `new_ids` (the added words' ids) start from the old rows `pieces`
  (one list per word), and the table has `rows` rows, of which those from `padded_from` on
  are padding."""
  new_ids: list[int]
  pieces: list[list[int]]
  rows: int
  padded_from: int


def table_rows(tokens: int, old_rows: int, multiple: int) -> int:
  """Rows for `tokens` tokens: at least the old table's, rounded up to `multiple`."""
  rows = max(tokens, old_rows)
  return -(-rows // multiple) * multiple


def make_plan(old_tokenizer, tokenizer, old_rows: int, multiple: int) -> Plan:
  """The rows for `tokenizer`, which is `old_tokenizer` with words added (`add_words`)."""
  words = [w for w in tokenizer_lib.added_words(tokenizer)
           if w not in old_tokenizer.get_added_vocab()]
  new_ids = tokenizer.convert_tokens_to_ids(words)
  pieces = [tokenizer_lib.word_pieces(old_tokenizer, w) for w in words]
  return Plan(new_ids, pieces, table_rows(len(tokenizer), old_rows, multiple),
              max(len(tokenizer), old_rows))


def _new_rows(table: np.ndarray, old: np.ndarray, plan: Plan, init: str,
              rng: np.random.Generator) -> np.ndarray:
  """Rows [words, ...] for the new words, from `table` (the old one, rows first) and `old`
  (its trained rows: those the mean and covariance are of)."""
  if init == 'subwords':
    return np.stack([table[p].mean(axis=0) for p in plan.pieces])
  rows = np.repeat(old.mean(axis=0)[None], len(plan.new_ids), axis=0)
  if init == 'mean_cov':
    noise = rng.standard_normal(rows.shape)
    # A bias as transformers draws it: std 1e-9 times the old biases' (unbiased) deviation.
    rows += (noise * MEAN_COV_EPSILON * old.std(ddof=1) if old.ndim == 1
             else noise @ mean_cov_factor(old).T)
  return rows


def mean_cov_factor(table: np.ndarray) -> np.ndarray:
  """L with L L^T = 1e-9 times the covariance of `table`'s rows (as transformers computes
  it: divided by the row count); zero where the covariance is not positive definite (the
  rows are then the mean, as transformers falls back to)."""
  centered = table - table.mean(axis=0)
  covariance = centered.T @ centered / len(table)
  try:
    return np.linalg.cholesky(MEAN_COV_EPSILON * covariance.astype(np.float64))
  except np.linalg.LinAlgError:
    return np.zeros_like(covariance)


def grow(params: dict, vocab: registry.VocabParams, plan: Plan, init: str,
         seed: int = 0) -> dict:
  """`params` with the vocabulary's rows grown to `plan.rows` and the new words' rows
  initialised by `init`; float32 numpy."""
  validation.check_choice('new_token_init', init, validation.NEW_TOKEN_INITS)
  flat = {k: np.asarray(v, np.float32) for k, v in
          traverse_util.flatten_dict(params, sep='/').items()}
  rng = np.random.default_rng(seed)
  # Every table as [rows, ...]: the decoder kernel is [width, vocab].
  tables = {vocab.embedding: flat[vocab.embedding]}
  if vocab.decoder in flat:
    tables[vocab.decoder] = flat[vocab.decoder].T
  if vocab.bias in flat:
    tables[vocab.bias] = flat[vocab.bias]
  elif plan.rows > plan.padded_from:
    raise UserError('pad_vocab_to_multiple_of needs a decoder bias to keep padded rows from '
                    'being predicted, and this model has none (decoder_bias=false); set '
                    '--config.pad_vocab_to_multiple_of=1')
  for path, table in tables.items():
    grown = np.zeros((plan.rows,) + table.shape[1:], np.float32)
    grown[:len(table)] = table
    if path == vocab.bias:
      grown[plan.padded_from:] = PADDED_BIAS
    if plan.new_ids:
      old = np.delete(table, [i for i in plan.new_ids if i < len(table)], axis=0)
      grown[plan.new_ids] = _new_rows(table, old, plan, init, rng)
    flat[path] = grown.T if path == vocab.decoder else grown
  return traverse_util.unflatten_dict(flat, sep='/')


def extend(model, config, tokenizer, log: Callable[[str], None] = print):
  """`model` (pretrained, its old table) grown for `tokenizer` (the run's, with the words
  `config` adds) and `pad_vocab_to_multiple_of`; `model` itself when nothing changes."""
  old_rows = model.config.vocab_size
  rows = table_rows(len(tokenizer), old_rows, config.pad_vocab_to_multiple_of)
  if rows == old_rows and not validation.new_tokens(config):
    return model
  plan = make_plan(tokenizer_lib.pretrained_tokenizer(config), tokenizer, old_rows,
                   config.pad_vocab_to_multiple_of)
  params = grow(model.params, model.family.vocab_params, plan, config.new_token_init,
                config.seed)
  log(f'Vocabulary: {len(plan.new_ids)} new token(s) ({config.new_token_init}), the table '
      f'{old_rows} -> {plan.rows} rows' + (f' ({plan.rows - plan.padded_from} padded)'
                                          if plan.rows > plan.padded_from else ''))
  return model.with_vocab_size(plan.rows, params)


def check_resumed_words(config, saved_tokenizer, workdir: str) -> None:
  """Refuses, in one line and before any data is tokenized, a run whose workdir's tokenizer
  adds other words than `config` would add to its pretrained tokenizer."""
  if not config.model_name_or_path:
    return
  fresh = tokenizer_lib.add_words(tokenizer_lib.pretrained_tokenizer(config),
                                  validation.new_tokens(config))
  saved, wanted = tokenizer_lib.added_words(saved_tokenizer), tokenizer_lib.added_words(fresh)
  if saved != wanted:
    raise UserError(f'the run in {workdir} added the tokens {saved} to its tokenizer, and this '
                    f'config adds {wanted}; resume with the same add_tokens and '
                    'add_tokens_file, or use a new --workdir')
