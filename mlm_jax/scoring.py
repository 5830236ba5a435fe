"""Pseudo-log-likelihood (PLL) scoring with a masked LM, the pure parts (Salazar et al. 2020,
"Masked Language Model Scoring"): a sequence's PLL is the sum, over its non-special tokens,
of the log-probability the model gives the true token when that token is masked.

`within_word_l2r` (Kauf & Ivanova 2023, minicons' "PLL-word-l2r") also masks the pieces of
the same word to the right of the scored one, so that a word's later pieces do not give its
earlier ones away (the original scores `un ##happ ##y` almost for free).

The functions here build the masked copies and read the true tokens' log-probabilities;
`infer.Predictor` jits `token_log_probs`, and `infer.iter_scores` batches the copies of many
sequences through it.
"""

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mlm_jax import validation
from mlm_jax.errors import UserError

VARIANTS = validation.PLL_VARIANTS
NO_WORD = -1  # The word id of a special token.


@dataclasses.dataclass(frozen=True)
class Encoded:
  """A sequence to score: its ids, which of them are scored, and each token's word (`NO_WORD`
  for a special token; read by `within_word_l2r` only)."""
  ids: np.ndarray  # [length] int
  scored: np.ndarray  # [length] bool
  words: np.ndarray | None = None  # [length] int

  @property
  def tokens(self) -> int:
    return int(self.scored.sum())


@dataclasses.dataclass(frozen=True)
class Score:
  """A sequence's PLL and the number of tokens it sums over."""
  pll: float
  tokens: int

  @property
  def pseudo_perplexity(self) -> float:
    return math.exp(-self.pll / self.tokens)


def masked_copies(sequence: Encoded, mask_id: int, variant: str) -> tuple[np.ndarray, np.ndarray]:
  """(copies [n, length], positions [n]): a copy per scored token, in order, with that token
  masked (and with `within_word_l2r` the later tokens of its word)."""
  positions = np.flatnonzero(sequence.scored)
  index = np.arange(len(sequence.ids))
  masked = index[None, :] == positions[:, None]
  if variant == 'within_word_l2r':
    words = sequence.words
    same_word = (words[None, :] == words[positions][:, None]) & (words[None, :] != NO_WORD)
    masked |= same_word & (index[None, :] > positions[:, None])
  copies = np.where(masked, mask_id, sequence.ids[None, :]).astype(np.int32)
  return copies, positions.astype(np.int32)


def token_log_probs(params, ids, attention_mask, positions, targets, *, logits_fn: Callable):
  """[rows] the log-probability the model gives `targets` [rows] at `positions` [rows] of the
  masked copies `ids` [rows, length]; the vocabulary projection runs at those tokens only.
  `logits_fn(params, ids, attention_mask, predict_at)` is `model.head_fn`'s forward."""
  logits = logits_fn(params, ids, attention_mask, positions[:, None])[:, 0]
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(log_probs, targets[:, None], axis=-1)[:, 0]


def encode_texts(tokenizer, texts: Sequence[str], max_length: int, variant: str) -> list[Encoded]:
  """Every text's ids, scored tokens (all but the tokenizer's special ones) and words, checked
  before any is run: a bad text 900 fails before text 1 is scored."""
  validation.check_scoring(variant, batch_size=1)
  if variant == 'within_word_l2r' and not tokenizer.is_fast:
    raise UserError('variant within_word_l2r needs word boundaries, which only a fast '
                    'tokenizer (tokenizer.json) gives; pass --variant=original')
  encoded = []
  for number, text in enumerate(texts, start=1):
    if not text.strip():
      raise UserError(f'text {number} is empty; give a text to score')
    encoding = tokenizer(text, return_special_tokens_mask=True)
    ids = np.asarray(encoding['input_ids'], np.int32)
    if len(ids) > max_length:
      raise UserError(f'text {number} has {len(ids)} tokens; the model\'s position embeddings '
                      f'take at most {max_length}: shorten it')
    scored = np.asarray(encoding['special_tokens_mask']) == 0
    if not scored.any():
      raise UserError(f'text {number} ({text!r}) has only special tokens; give words to score')
    words = None
    if tokenizer.is_fast:
      words = np.asarray([NO_WORD if w is None else w for w in encoding.word_ids()], np.int32)
    encoded.append(Encoded(ids, scored, words))
  return encoded


def encode_blocks(blocks: np.ndarray, special_ids: Sequence[int]) -> list[Encoded]:
  """Token blocks as training reads them ([n, block_size]: texts joined with their special
  tokens), every token but the special ones scored (variant `original`: a block has no word
  boundaries)."""
  scored = ~np.isin(blocks, np.asarray(special_ids))
  return [Encoded(row.astype(np.int32), row_scored) for row, row_scored in zip(blocks, scored)]


def corpus_pseudo_perplexity(scores: Sequence[Score]) -> float:
  """exp(-sum of PLLs / sum of tokens): the pseudo-perplexity of the sequences together."""
  return math.exp(-sum(s.pll for s in scores) / sum(s.tokens for s in scores))
