"""Fill-mask inference: top-k predictions for every mask token, as the transformers pipeline gives them.

A model comes from a training workdir (its orbax checkpoint: the latest or a given
step; its parameters only), an HF-format directory (such as a workdir's export) or a
hub id. Texts run at most `batch_size` at a time through one jit-compiled forward pass;
within each window of `SORTED_BATCHES` batches' texts, texts of one padded length share a
batch (`length_batches`), and the results stream out window by window in the texts' order.
Rows and length are bucketed (`_bucket`) so the compiled function is reused. A text longer
than the model's position embeddings is refused by its number.
"""

import contextlib
import dataclasses
import functools
import itertools
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mlm_jax import checkpoint
from mlm_jax import compiler_options
from mlm_jax import host_memory
from mlm_jax import memory
from mlm_jax import model as model_lib
from mlm_jax import scoring
from mlm_jax import storage
from mlm_jax import validation
from mlm_jax.data import tokenizer as tokenizer_lib
from mlm_jax.errors import UserError
from mlm_jax.models import FlaxAutoModelForMaskedLM
from mlm_jax.models import auto
from mlm_jax.models import hf_checkpoint

USER_MASK = '<mask>'
DEFAULT_BATCH_SIZE = 64  # Texts per forward pass: memory stays bounded whatever the input.
# Batches whose texts are sorted by length together: a short text shares its batch with texts
# of about its length rather than being padded to the longest of whichever texts follow it,
# while memory stays bounded by the window and the first results come after it.
SORTED_BATCHES = 8
# Masked copies per forward pass when scoring: a text of n tokens is n copies.
DEFAULT_SCORE_BATCH_SIZE = 128
# A batch of more tokens than this (8 rows of 8,192, 64 of 1,024) runs as many of its rows at
# a time as the memory free holds, by XLA's figures for the compiled forward
# (`Predictor.rows_that_fit`); smaller ones run whole without compiling to check.
CHECKED_FROM_TOKENS = 1 << 16


@dataclasses.dataclass
class Predictor:
  """A model, its parameters and its tokenizer, ready for `fill_mask`."""
  model: FlaxAutoModelForMaskedLM
  params: Any
  tokenizer: Any

  def __post_init__(self):
    # On the device once, not sent with every batch (330 MB at distilroberta-base size).
    self.params = jax.device_put(self.params)
    head = model_lib.head_fn(self.model)
    logits_fn = lambda params, ids, mask, predict_at: head(ids, predict_at, params, False, None,
                                                           mask)
    platform = jax.default_backend()
    host_memory.keep_freed_memory_on(platform)  # No fresh pages for each batch's buffers.
    options = compiler_options.for_platform(platform)
    # Compiled once per padded shape (and top-k) for this predictor.
    self.top_k_at = jax.jit(functools.partial(_top_k_at, logits_fn=logits_fn),
                            static_argnames='top_k', compiler_options=options)
    self.token_log_probs = jax.jit(functools.partial(scoring.token_log_probs,
                                                     logits_fn=logits_fn),
                                   compiler_options=options)
    self._fitting_rows = {}  # By the shapes of a batch: how many of its rows run at a time.

  def rows_that_fit(self, batch: 'PaddedBatch', candidates: np.ndarray | None,
                    top_k: int) -> int:
    """How many of `batch`'s rows one forward runs: all of a batch of at most
    `CHECKED_FROM_TOKENS` tokens, else as many as `memory.rows_that_fit` finds room for."""
    rows, length = batch.ids.shape
    if rows == 1 or rows * length <= CHECKED_FROM_TOKENS:
      return rows
    key = (rows, length, batch.predict_at.shape[1], top_k,
           None if candidates is None else len(candidates))
    if key not in self._fitting_rows:
      def need(fewer: int) -> int:
        shape = lambda a: jax.ShapeDtypeStruct((fewer,) + a.shape[1:], a.dtype)
        return memory.needed_bytes(self.top_k_at.lower(
            self.params, shape(batch.ids), shape(batch.attention_mask), shape(batch.predict_at),
            candidates, top_k=top_k).compile())
      self._fitting_rows[key] = memory.rows_that_fit(
          need, rows, 1, memory.free_bytes(jax.local_devices()[0]))[0]
    return self._fitting_rows[key]

  def top_k(self, batch: 'PaddedBatch', candidates: np.ndarray | None,
            top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, indices) [rows, masks, top_k] of `batch`, `rows_that_fit` rows at a time."""
    step = self.rows_that_fit(batch, candidates, top_k)
    parts = [jax.device_get(self.top_k_at(
        self.params, batch.ids[start:start + step], batch.attention_mask[start:start + step],
        batch.predict_at[start:start + step], candidates, top_k=top_k))
             for start in range(0, len(batch.ids), step)]
    return tuple(np.concatenate(arrays) for arrays in zip(*parts))


def load_predictor(model: str, step: int | None = None, dtype: Any = jnp.float32,
                   attention_impl: str = 'auto') -> Predictor:
  """Loads a training workdir, an HF-format directory or a hub id, to compute in `dtype`
  with `attention_impl` (the parameters stay float32)."""
  kwargs = dict(dtype=dtype, attention_impl=attention_impl)
  if checkpoint.checkpoint_dir(model).is_dir():
    return _load_workdir(model, step, **kwargs)
  if step is not None:
    raise UserError(f'--step needs a training workdir, and {model!r} is not one '
                    '(it has no checkpoints/ folder)')
  directory = storage.path(model)
  if directory.exists() and not (directory / 'config.json').is_file():
    raise UserError(f'{model!r} holds neither a checkpoint nor a model (no checkpoints/ or '
                    'config.json); pass a training workdir, its export/ or a hub id')
  with contextlib.ExitStack() as stack:
    if directory.exists():  # A local or bucket folder; anything else is a hub id.
      model = stack.enter_context(storage.local_copy(directory))
    model = hf_checkpoint.local_directory(model)  # A hub id's files, fetched once.
    flax_model = FlaxAutoModelForMaskedLM.from_pretrained(model, **kwargs)
    return Predictor(flax_model, flax_model.params,
                     tokenizer_lib.load_pretrained_tokenizer(model))


def _load_workdir(workdir: str, step: int | None, **kwargs) -> Predictor:
  """A training workdir's checkpoint (parameters only), around its saved model config."""
  config_dir = checkpoint.model_config_dir(workdir)
  if not (config_dir / 'config.json').is_file():
    raise UserError(f'{workdir!r} has a checkpoints/ folder but no model/config.json, so it is '
                    'not a complete training workdir; pass its export/ or a finished run')
  with storage.local_copy(config_dir) as local:
    config = auto.config_from_dict(hf_checkpoint.read_config_dict(local), str(config_dir))
  flax_model = FlaxAutoModelForMaskedLM.from_config(config, _do_init=False, **kwargs)
  # Onto this host's first device, whatever the topology the checkpoint was saved from.
  params = checkpoint.restore_params(
      workdir, step, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  flax_model.check_params(params, f'the checkpoint in {workdir}')
  return Predictor(flax_model, params, tokenizer_lib.load_saved_tokenizer(workdir))


def _bucket(n: int, minimum: int = 8) -> int:
  """n rounded up to one of 8 sizes per power of two (multiples of 8 up to 64, of 16 up to
  128, ...), at least `minimum`: padding by at most an eighth of the next power of two, where
  rounding up to that power pads up to 2x (64 for texts of at most 42 tokens: a third of the
  forward wasted), and still few compiled shapes."""
  n = max(n, minimum)
  step = max(minimum, 1 << max(0, (n - 1).bit_length() - 3))
  return -(-n // step) * step


def _top_k_at(params, ids, attention_mask, predict_at, candidate_ids, *, logits_fn, top_k):
  """Top-k (probability, index into candidate_ids) at the token indices `predict_at`
  [batch, masks]."""
  logits = logits_fn(params, ids, attention_mask, predict_at)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  if candidate_ids is not None:
    probs = probs[..., candidate_ids]
  return jax.lax.top_k(probs, top_k)


def target_ids(tokenizer, targets: Sequence[str]) -> np.ndarray:
  """The ids of `targets` as the fill-mask pipeline finds them: whole tokens, else the first piece."""
  vocab = tokenizer.get_vocab()
  ids = []
  for target in targets:
    id_ = vocab.get(target)
    if id_ is None:
      pieces = tokenizer(target, add_special_tokens=False)['input_ids']
      if not pieces:
        continue
      id_ = pieces[0]
    ids.append(id_)
  if not ids:
    raise UserError(f'none of the targets {list(targets)} is in the vocabulary; '
                    'pass words the model knows with --targets')
  return np.asarray(sorted(set(ids)), np.int32)


def encode(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
  """Every text's ids, checked before any is run: a bad text 900 fails before text 1 prints."""
  encoded = []
  for number, text in enumerate(texts, start=1):
    if not text.strip():
      raise UserError(f'text {number} is empty; give a text with {USER_MASK} in it')
    ids = tokenizer(text.replace(USER_MASK, tokenizer.mask_token))['input_ids']
    if tokenizer.mask_token_id not in ids:
      raise UserError(f'text {number} ({text!r}) has no mask token; write {USER_MASK} '
                      'where the model should fill in a word')
    if len(ids) > max_length:
      raise UserError(f'text {number} has {len(ids)} tokens; the model\'s position embeddings '
                      f'take at most {max_length}: shorten it')
    encoded.append(ids)
  return encoded


def iter_fill_mask(predictor: Predictor, texts: Sequence[str], top_k: int = 5,
                   targets: Sequence[str] | str | None = None,
                   batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[list[list[dict]]]:
  """`fill_mask`'s results one text at a time, a window of `batch_size * SORTED_BATCHES` texts
  at a time: the fills held are one window's, whatever the number of texts (the texts are all
  tokenized and checked before the first batch runs)."""
  if top_k < 1:
    raise UserError(f'top_k={top_k} must be at least 1')
  if batch_size < 1:
    raise UserError(f'batch_size={batch_size} must be at least 1')
  if not texts:
    raise UserError('no text given; pass at least one text with <mask> in it')
  if isinstance(targets, str):
    targets = [targets]
  if targets is not None and not targets:
    raise UserError('targets is empty; pass at least one word, or None to score every token')
  tokenizer = predictor.tokenizer
  encoded = encode(tokenizer, texts, model_lib.max_block_size(predictor.model.config))
  candidates = None if targets is None else target_ids(tokenizer, targets)
  # Rows beyond the tokenizer pad the table (`vocabulary.py`) and are never offered.
  k = min(top_k, len(tokenizer) if candidates is None else len(candidates))
  window = batch_size * SORTED_BATCHES
  for start in range(0, len(encoded), window):
    fills = {}
    for batch in padded_batches(tokenizer, encoded[start:start + window], batch_size):
      scores, indices = predictor.top_k(batch, candidates, k)
      if candidates is not None:
        indices = candidates[indices]
      for row, (index, seq, where) in enumerate(zip(batch.order, batch.encoded, batch.mask_at)):
        fills[index] = _fills(tokenizer, seq, where, scores[row], indices[row])
    yield from (fills[index] for index in range(len(fills)))


def target_pieces(tokenizer, target: str) -> list[int]:
  """A target's ids: the token itself where the vocabulary has it, else all its pieces."""
  id_ = tokenizer.get_vocab().get(target)
  return [id_] if id_ is not None else tokenizer(target, add_special_tokens=False)['input_ids']


def iter_fill_targets_by_pll(predictor: Predictor, texts: Sequence[str], targets: Sequence[str],
                             top_k: int = 5,
                             batch_size: int = DEFAULT_SCORE_BATCH_SIZE
                             ) -> Iterator[list[list[dict]]]:
  """`iter_fill_mask` with `targets` of several pieces scored whole: each target's pieces
  put in the mask's place and their PLL summed (`within_word_l2r`: a piece is predicted
  with the target's later pieces masked, so the score is the model's pseudo-probability of
  the whole word there); `score` is exp(PLL), and for a one-piece target exactly the
  probability `fill_mask` gives it. Each text has one mask. Fills have the pipeline's keys
  and `tokens`, the target's ids (`token` is its first)."""
  if top_k < 1:
    raise UserError(f'top_k={top_k} must be at least 1')
  tokenizer = predictor.tokenizer
  max_length = model_lib.max_block_size(predictor.model.config)
  encoded = encode(tokenizer, texts, max_length)
  pieces = {target: target_pieces(tokenizer, target) for target in dict.fromkeys(targets)}
  pieces = {target: ids for target, ids in pieces.items() if ids}
  if not pieces:
    raise UserError(f'none of the targets {list(targets)} has a token; pass words with --targets')
  filled = []  # (text index, target, ids, mask index): each text, each target in the mask's place.
  for number, ids in enumerate(encoded):
    at = np.flatnonzero(np.asarray(ids) == tokenizer.mask_token_id)
    if len(at) != 1:
      raise UserError(f'text {number + 1} has {len(at)} masks; scoring targets by PLL takes '
                      f'texts with one {USER_MASK}')
    for target, target_ids in pieces.items():
      sequence = ids[:at[0]] + target_ids + ids[at[0] + 1:]
      if len(sequence) > max_length:
        raise UserError(f'text {number + 1} with the target {target!r} has {len(sequence)} '
                        f'tokens; the model takes at most {max_length}: shorten it')
      filled.append((number, target, sequence, int(at[0])))
  def sequences():
    for _, target, sequence, start in filled:
      scored = np.zeros(len(sequence), bool)
      scored[start:start + len(pieces[target])] = True
      words = np.where(scored, 0, scoring.NO_WORD).astype(np.int32)  # The target: one word.
      yield scoring.Encoded(np.asarray(sequence, np.int32), scored, words)
  scores = iter_scores(predictor, sequences(), 'within_word_l2r', batch_size)
  for _, group in itertools.groupby(zip(filled, scores), key=lambda item: item[0][0]):
    fills = [{'score': float(np.exp(score.pll)), 'token': pieces[target][0],
              'tokens': pieces[target], 'token_str': tokenizer.decode(pieces[target]),
              'sequence': tokenizer.decode(sequence, skip_special_tokens=True)}
             for (_, target, sequence, _), score in group]
    yield [sorted(fills, key=lambda fill: -fill['score'])[:top_k]]


def fill_mask(predictor: Predictor, texts: Sequence[str], top_k: int = 5,
              targets: Sequence[str] | str | None = None,
              batch_size: int = DEFAULT_BATCH_SIZE) -> list[list[list[dict]]]:
  """For each text, for each mask in it: the top-k fills, best first.

  Each fill is a dict with the pipeline's keys: score, token, token_str, sequence. With a
  tiny untrained RoBERTa and a tokenizer trained on the spot (no hub; `load_predictor` loads
  a workdir, an export or a hub id instead), one text with one mask:

  >>> import transformers
  >>> from mlm_jax import infer
  >>> from mlm_jax.data import tokenizer as tokenizer_lib
  >>> from mlm_jax.models import FlaxAutoModelForMaskedLM
  >>> tokenizer = tokenizer_lib.train_bpe_tokenizer(
  ...     ['the sky is blue', 'the sea is blue', 'grass is green'] * 20, vocab_size=300,
  ...     model_max_length=64)
  >>> config = transformers.RobertaConfig(
  ...     vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
  ...     intermediate_size=32, max_position_embeddings=66, pad_token_id=tokenizer.pad_token_id)
  >>> model = FlaxAutoModelForMaskedLM.from_config(config, seed=0)
  >>> predictor = infer.Predictor(model, model.params, tokenizer)
  >>> fills = infer.fill_mask(predictor, ['the sky is <mask>'], top_k=3)
  >>> len(fills), len(fills[0]), len(fills[0][0])  # texts, masks in the text, fills
  (1, 1, 3)
  >>> sorted(fills[0][0][0])
  ['score', 'sequence', 'token', 'token_str']
  >>> scores = [fill['score'] for fill in fills[0][0]]
  >>> scores == sorted(scores, reverse=True)
  True
  """
  return list(iter_fill_mask(predictor, texts, top_k, targets, batch_size))


def _score_windows(sequences: Iterable[scoring.Encoded],
                   copies: int) -> Iterator[list[scoring.Encoded]]:
  """The sequences in consecutive windows of about `copies` masked copies (one copy per scored
  token; a window holds at least one sequence)."""
  window, held = [], 0
  for sequence in sequences:
    window.append(sequence)
    held += sequence.tokens
    if held >= copies:
      yield window
      window, held = [], 0
  if window:
    yield window


def iter_scores(predictor: Predictor, sequences: Iterable[scoring.Encoded],
                variant: str = 'original',
                batch_size: int = DEFAULT_SCORE_BATCH_SIZE) -> Iterator[scoring.Score]:
  """Each sequence's PLL (see `scoring`), in order: the masked copies of a window of sequences
  (about `batch_size * SORTED_BATCHES` copies) run `batch_size` at a time, copies of one padded
  length together (`length_batches`), so memory stays bounded whatever the number of texts."""
  validation.check_scoring(variant, batch_size)
  tokenizer = predictor.tokenizer
  for window in _score_windows(sequences, batch_size * SORTED_BATCHES):
    copies, positions = zip(*(scoring.masked_copies(s, tokenizer.mask_token_id, variant)
                              for s in window))
    owner = np.repeat(np.arange(len(window)), [len(p) for p in positions])
    targets = np.concatenate([s.ids[s.scored] for s in window])
    copies, positions = [c for text in copies for c in text], np.concatenate(positions)
    pending = []  # Dispatched batches, read back once all are queued.
    for order in length_batches([len(c) for c in copies], batch_size):
      rows = min(_bucket(len(order), minimum=1), batch_size)
      length = _bucket(max(len(copies[i]) for i in order))
      ids = np.full((rows, length), tokenizer.pad_token_id, np.int32)
      attention_mask = np.zeros((rows, length), np.int32)
      at, true = np.zeros(rows, np.int32), np.zeros(rows, np.int32)
      for row, index in enumerate(order):
        ids[row, :len(copies[index])], attention_mask[row, :len(copies[index])] = copies[index], 1
      at[:len(order)], true[:len(order)] = positions[order], targets[order]
      pending.append((order, predictor.token_log_probs(predictor.params, ids, attention_mask,
                                                       at, true)))
    plls = np.zeros(len(window), np.float64)
    for order, log_probs in pending:
      np.add.at(plls, owner[order], np.asarray(log_probs)[:len(order)].astype(np.float64))
    yield from (scoring.Score(float(pll), s.tokens) for pll, s in zip(plls, window))


def score_texts(predictor: Predictor, texts: Sequence[str], variant: str = 'original',
                batch_size: int = DEFAULT_SCORE_BATCH_SIZE) -> Iterator[scoring.Score]:
  """Each text's PLL, in order (all texts tokenized and checked before the first runs)."""
  if not texts:
    raise UserError('no text given; pass at least one text to score')
  encoded = scoring.encode_texts(predictor.tokenizer, texts,
                                 model_lib.max_block_size(predictor.model.config), variant)
  return iter_scores(predictor, encoded, variant, batch_size)


@dataclasses.dataclass
class PaddedBatch:
  """At most `batch_size` encoded texts, padded to bucketed [rows, length] arrays."""
  order: list[int]  # Each text's index in the list `padded_batches` was given.
  encoded: list[list[int]]
  mask_at: list[np.ndarray]  # Each text's mask-token indices.
  ids: np.ndarray
  attention_mask: np.ndarray
  predict_at: np.ndarray  # [rows, masks]: mask_at, padded.


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
  """Indices into `lengths`, shortest first, cut into batches of at most `batch_size` that each
  hold one padded length (`_bucket`), so that a short text does not pad to a long one's length;
  except that a bucket of fewer than a quarter of `batch_size` texts joins the next longer
  one (the last joins the one before), so that few small batches are compiled and run."""
  by_length = sorted(range(len(lengths)), key=lambda index: lengths[index])
  groups, pending = [], []
  for _, members in itertools.groupby(by_length, key=lambda index: _bucket(lengths[index])):
    pending += members
    if len(pending) >= max(1, batch_size // 4):
      groups.append(pending)
      pending = []
  if pending and groups:
    groups[-1] += pending
  elif pending:
    groups.append(pending)
  return [group[start:start + batch_size] for group in groups
          for start in range(0, len(group), batch_size)]


def padded_batches(tokenizer, encoded: list[list[int]],
                   batch_size: int) -> Iterator[PaddedBatch]:
  """The texts in `length_batches`, so that each batch pads to about its own texts' length;
  rows and length bucketed (`_bucket`; rows at most `batch_size`) so few shapes are compiled."""
  for order in length_batches([len(seq) for seq in encoded], batch_size):
    chunk = [encoded[index] for index in order]
    mask_at = [np.flatnonzero(np.asarray(seq) == tokenizer.mask_token_id) for seq in chunk]
    rows = min(_bucket(len(chunk), minimum=1), batch_size)
    length, masks = _bucket(max(map(len, chunk))), _bucket(max(map(len, mask_at)), minimum=1)
    ids = np.full((rows, length), tokenizer.pad_token_id, np.int32)
    attention_mask = np.zeros((rows, length), np.int32)
    predict_at = np.zeros((rows, masks), np.int32)
    for row, (seq, where) in enumerate(zip(chunk, mask_at)):
      ids[row, :len(seq)], attention_mask[row, :len(seq)] = seq, 1
      predict_at[row, :len(where)] = where
    yield PaddedBatch(order, chunk, mask_at, ids, attention_mask, predict_at)


def _fills(tokenizer, seq: list[int], mask_at: np.ndarray, scores: np.ndarray,
           tokens: np.ndarray) -> list[list[dict]]:
  """The pipeline's output for one text: its sequences decode the way the pipeline's do."""
  seq = np.asarray(seq)
  single_mask = len(mask_at) == 1
  result = []
  for mask, position in enumerate(mask_at):
    row = []
    for score, token in zip(scores[mask], tokens[mask]):
      filled = seq.copy()
      filled[position] = token
      filled = filled[filled != tokenizer.pad_token_id]
      row.append({'score': float(score), 'token': int(token),
                  'token_str': tokenizer.decode([int(token)]),
                  'sequence': tokenizer.decode(filled, skip_special_tokens=single_mask)})
    result.append(row)
  return result


def format_table(texts: Sequence[str], results: list[list[list[dict]]]) -> str:
  """A readable table: per text, per mask, rank / score / token / sequence."""
  lines = []
  for text, masks in zip(texts, results):
    lines.append(f'{text}')
    for number, fills in enumerate(masks, start=1):
      if len(masks) > 1:
        lines.append(f'  mask {number}:')
      for rank, fill in enumerate(fills, start=1):
        lines.append(f'  {rank:>3}. {fill["score"]:.4f}  {fill["token_str"]!r:<16} '
                     f'{fill["sequence"]}')
    lines.append('')
  return '\n'.join(lines)
