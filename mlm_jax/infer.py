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
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mlm_jax import checkpoint
from mlm_jax import compiler_options
from mlm_jax import host_memory
from mlm_jax import model as model_lib
from mlm_jax import storage
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
    # Compiled once per padded shape and top-k for this predictor.
    self.top_k_at = jax.jit(functools.partial(_top_k_at, logits_fn=logits_fn),
                            static_argnames='top_k',
                            compiler_options=compiler_options.for_platform(platform))


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
  k = min(top_k, predictor.model.config.vocab_size if candidates is None else len(candidates))
  window = batch_size * SORTED_BATCHES
  for start in range(0, len(encoded), window):
    fills = {}
    for batch in padded_batches(tokenizer, encoded[start:start + window], batch_size):
      scores, indices = jax.device_get(predictor.top_k_at(
          predictor.params, batch.ids, batch.attention_mask, batch.predict_at, candidates,
          top_k=k))
      if candidates is not None:
        indices = candidates[indices]
      for row, (index, seq, where) in enumerate(zip(batch.order, batch.encoded, batch.mask_at)):
        fills[index] = _fills(tokenizer, seq, where, scores[row], indices[row])
    yield from (fills[index] for index in range(len(fills)))


def fill_mask(predictor: Predictor, texts: Sequence[str], top_k: int = 5,
              targets: Sequence[str] | str | None = None,
              batch_size: int = DEFAULT_BATCH_SIZE) -> list[list[list[dict]]]:
  """For each text, for each mask in it: the top-k fills, best first.

  Each fill is a dict with the pipeline's keys: score, token, token_str, sequence.
  """
  return list(iter_fill_mask(predictor, texts, top_k, targets, batch_size))


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
