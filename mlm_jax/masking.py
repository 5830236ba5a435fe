"""BERT-style dynamic masking, by token or by whole word, as a pure, shape-static JAX function.

It runs on the device inside the compiled step. Every row draws from its own key,
`fold_in(rng, global_row_index)`, so a row's mask depends only on the step's rng
and the row's place in the global batch: a run on 8 devices masks exactly as a
run on 1, under `jax.jit` (sharded batch) and `jax.pmap` (pass the offset of the
device's first row, `first_row`) alike, whatever the gradient accumulation.

Two schemes (`config.masking`):
  * `token`: each non-special token is chosen with probability `mlm_probability`.
  * `whole_word`: each word is chosen with probability `mlm_probability`, and then
    every token of it. A token's draw is the draw of its word, so each token is still
    chosen with probability `mlm_probability`: the expected masked-token rate is the
    same as `token`'s (the variance is larger, as tokens come in groups). These are the
    semantics of transformers' `DataCollatorForLanguageModeling(whole_word_mask=True)`
    (a Bernoulli draw at each word start, spread over the word); the older
    `DataCollatorForWholeWordMask` instead fills a fixed budget of round(length * p)
    tokens per sequence with shuffled words (counting [CLS] and [SEP] in the length), a
    rate near p, but a budget needs a per-row shuffle of a variable number of words,
    which a shape-static step would pay for with a sort per row.
    Which tokens start a word is a property of the token id alone (byte-level BPE: a
    leading `Ġ`, or another whitespace byte such as the newline's `Ċ`; SentencePiece: a
    leading `▁`; WordPiece: not a `##` continuation), so `word_start_table` reads it
    once from the vocabulary (`data/tokenizer.py`, which knows the conventions; this
    module knows no tokenizer files) and the step gathers it. A
    block's first token and the token after a special token (a document's first word
    has no leading `Ġ`) also start a word: a word cut by a block boundary is a word in
    each block.

Either way, each chosen token then independently becomes the mask token with probability
`mask_replace_prob`, a random non-special token with probability `random_replace_prob`, or
stays (BERT's 80/10/10 by default). For whole words the action is per token too, as in
BERT's reference whole-word masking (`create_pretraining_data.py` draws it inside the loop
over a word's tokens) and transformers' `DataCollatorForWholeWordMask`: the checkpoints
people compare against were trained that way, and the 80/10/10 statistics (and tests) stay
the same for both schemes.
"""

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mlm_jax.errors import UserError

SCHEMES = ('token', 'whole_word')


def check_probability(probability: float) -> None:
  if not 0 < probability < 1:
    raise UserError(f'mlm_probability={probability} must be in (0, 1); '
                    'set --config.mlm_probability, e.g. 0.15')


def check_scheme(scheme: str) -> None:
  if scheme not in SCHEMES:
    raise UserError(f'masking={scheme!r} is not a masking scheme; set --config.masking to '
                    f'{" or ".join(SCHEMES)}')


def check_replace_probs(mask_replace_prob: float, random_replace_prob: float) -> None:
  for key, value in (('mask_replace_prob', mask_replace_prob),
                     ('random_replace_prob', random_replace_prob)):
    if not 0 <= value <= 1:
      raise UserError(f'{key}={value} must be in [0, 1]; set --config.{key}')
  if mask_replace_prob + random_replace_prob > 1:
    raise UserError(f'mask_replace_prob + random_replace_prob = {mask_replace_prob} + '
                    f'{random_replace_prob} exceeds 1; lower one of them (the rest of the '
                    'chosen tokens stay unchanged)')


def check_config(config) -> None:
  """Validates the masking keys of a run config."""
  check_probability(config.mlm_probability)
  check_scheme(config.masking)
  check_replace_probs(config.mask_replace_prob, config.random_replace_prob)


@dataclasses.dataclass(frozen=True)
class MaskingSpec:
  """What masking needs to know of the tokenizer; static and hashable."""
  mask_token_id: int
  special_ids: tuple[int, ...]
  vocab_size: int
  probability: float = 0.15
  mask_replace_prob: float = 0.8  # Of the chosen tokens, become the mask token ...
  random_replace_prob: float = 0.1  # ... become a random non-special token; the rest stay.
  scheme: str = 'token'
  # For `whole_word`: `np.packbits` of `word_start_table` (bytes keep the spec hashable).
  word_starts: bytes = dataclasses.field(default=b'', repr=False)

  def __post_init__(self):
    check_probability(self.probability)
    check_replace_probs(self.mask_replace_prob, self.random_replace_prob)
    check_scheme(self.scheme)
    if self.scheme == 'whole_word' and len(self.word_starts) != (self.vocab_size + 7) // 8:
      raise ValueError('whole_word masking needs the packed word-start table of the '
                       f'{self.vocab_size} ids (see `masking_spec`)')

  @property
  def replacement_ids(self) -> np.ndarray:
    return np.setdiff1d(np.arange(self.vocab_size), np.asarray(self.special_ids, np.int32))

  @property
  def word_start_table(self) -> np.ndarray:
    """bool [vocab_size]: True for the ids that begin a word."""
    packed = np.frombuffer(self.word_starts, np.uint8)
    return np.unpackbits(packed, count=self.vocab_size).astype(bool)


def special_ids(tokenizer) -> tuple[int, ...]:
  """Ids that masking must never choose nor draw as random replacements."""
  return tuple(sorted(set(tokenizer.all_special_ids)))


def masking_spec(tokenizer, probability: float, *, scheme: str = 'token',
                 mask_replace_prob: float = 0.8, random_replace_prob: float = 0.1,
                 word_start_table: np.ndarray | None = None) -> MaskingSpec:
  """The spec for `tokenizer` (any object with `mask_token_id`, `all_special_ids` and a
  length). `whole_word` needs `word_start_table`, bool [len(tokenizer)], True for the ids
  that begin a word: `data.tokenizer.word_start_table` reads it from the vocabulary."""
  check_scheme(scheme)
  if scheme == 'whole_word' and word_start_table is None:
    raise ValueError('whole_word masking needs the word-start table '
                     '(data.tokenizer.word_start_table)')
  word_starts = (np.packbits(np.asarray(word_start_table, bool)).tobytes()
                 if scheme == 'whole_word' else b'')
  return MaskingSpec(mask_token_id=tokenizer.mask_token_id,
                     special_ids=special_ids(tokenizer),
                     vocab_size=len(tokenizer), probability=probability,
                     mask_replace_prob=mask_replace_prob,
                     random_replace_prob=random_replace_prob, scheme=scheme,
                     word_starts=word_starts)


def special_tokens_mask(ids: jax.Array, special_ids: Sequence[int]) -> jax.Array:
  """True where `ids` is a special (or padding) token that masking must not choose."""
  return jnp.isin(ids, jnp.asarray(special_ids, ids.dtype))


def word_starts(ids, special, table, xp=jnp):
  """True where a word begins in [..., length] `ids`: the id's `table` entry, the block's
  first position, or the position after a special one. Works on numpy arrays with `xp=np`."""
  after_special = xp.concatenate([xp.ones_like(special[..., :1]), special[..., :-1]], axis=-1)
  return xp.asarray(table)[ids] | after_special


def _choose(key: jax.Array, ids: jax.Array, special: jax.Array, spec: MaskingSpec) -> jax.Array:
  draws = jax.random.uniform(key, ids.shape)
  if spec.scheme == 'whole_word':  # Every token takes its word's draw: words chosen whole.
    word = jnp.cumsum(word_starts(ids, special, spec.word_start_table)) - 1
    draws = draws[word]
  return (draws < spec.probability) & ~special


def _mask_row(key: jax.Array, ids: jax.Array, special: jax.Array, spec: MaskingSpec):
  choose_key, action_key, token_key = jax.random.split(key, 3)
  chosen = _choose(choose_key, ids, special, spec)
  action = jax.random.uniform(action_key, ids.shape)
  replacements = jnp.asarray(spec.replacement_ids, ids.dtype)
  random_tokens = replacements[
      jax.random.randint(token_key, ids.shape, 0, replacements.shape[0])]
  to_mask = chosen & (action < spec.mask_replace_prob)
  to_random = chosen & (action >= spec.mask_replace_prob) & (
      action < spec.mask_replace_prob + spec.random_replace_prob)
  inputs = jnp.where(to_mask, spec.mask_token_id, jnp.where(to_random, random_tokens, ids))
  return inputs, chosen


def mask_tokens(rng: jax.Array, ids: jax.Array, special: jax.Array, spec: MaskingSpec,
                first_row: int | jax.Array = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Masks a [batch, length] block of token ids with `spec`'s scheme.

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


def count_dispersion(blocks: np.ndarray, spec: MaskingSpec, quantile: float = 0.999,
                     max_rows: int = 65_536) -> float:
  """How much wider than token masking's the spread of a row's masked count is.

  A row's masked count has variance p(1-p) * sum of its words' squared lengths (in
  eligible tokens); token masking's is p(1-p) * its token count. Returns the ratio of the
  two at the `quantile` of `blocks`' rows (at most `max_rows`, evenly strided): 1 for
  token masking, about the mean word length (weighted by length) for whole words.
  """
  if spec.scheme == 'token':
    return 1.0
  rows = blocks[::max(1, -(-len(blocks) // max_rows))]
  special = np.isin(rows, spec.special_ids)
  word = np.cumsum(word_starts(rows, special, spec.word_start_table, xp=np), axis=1) - 1
  slot = (np.arange(len(rows))[:, None] * rows.shape[1] + word)[~special]
  lengths = np.bincount(slot, minlength=rows.size).reshape(rows.shape)
  tokens = lengths.sum(axis=1)
  ratio = (lengths.astype(np.float64) ** 2).sum(axis=1)[tokens > 0] / tokens[tokens > 0]
  return float(np.quantile(ratio, quantile)) if ratio.size else 1.0
