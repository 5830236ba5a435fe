"""Fill-mask inference: top-k predictions for every mask token, as the transformers pipeline gives them.

A model comes from a training workdir (its orbax checkpoint: the latest or a given
step), an HF-format directory (such as a workdir's export) or a hub id. All texts
run as one padded batch through one jit-compiled forward pass; batch size and
length are bucketed to powers of two so the compiled function is reused.
"""

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import transformers

from mlm_jax import checkpoint
from mlm_jax import model as model_lib
from mlm_jax import storage
from mlm_jax import tokenizer as tokenizer_lib
from mlm_jax.errors import UserError, first_line

USER_MASK = '<mask>'


@dataclasses.dataclass
class Predictor:
  """A model, its parameters and its tokenizer, ready for `fill_mask`."""
  model: transformers.FlaxPreTrainedModel
  params: Any
  tokenizer: transformers.PreTrainedTokenizerBase

  def __post_init__(self):
    # One function object per predictor, so the jit cache keyed on it is reused.
    self.logits_fn = _logits_at_positions_fn(self.model)


def _logits_at_positions_fn(model) -> Callable:
  """`fn(params, ids, attention_mask, positions)` -> logits at `positions` only.

  RoBERTa-family models run the vocabulary head on those positions alone; others
  compute every position's logits and gather.
  """
  if model_lib.supports_masked_head(model):
    head = model_lib.masked_head_fn(model)
    return lambda params, ids, mask, positions: head(ids, positions, params, False, None, mask)

  def gather(params, ids, mask, positions):
    logits = model(ids, attention_mask=mask, params=params, train=False).logits
    return jnp.take_along_axis(logits, positions[:, :, None], axis=1)
  return gather


def _restore_params(workdir: str, step: int | None) -> Any:
  manager = checkpoint.make_manager(workdir, keep=None, create=False)
  steps = manager.all_steps()
  if not steps:
    raise UserError(f'{workdir} has no checkpoint; train first or pass an export directory')
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise UserError(f'{workdir} has no checkpoint at step {step}; '
                    f'available steps: {", ".join(map(str, sorted(steps)))}')
  # Onto this host's first device, whatever the topology the checkpoint was saved from.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  metadata = manager.item_metadata(step)['state']
  target = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target)))
  return restored.state['params']


def load_predictor(model: str, step: int | None = None) -> Predictor:
  """Loads a training workdir, an HF-format directory or a hub id."""
  if checkpoint.checkpoint_dir(model).is_dir():
    config_dir = checkpoint.model_config_dir(model)
    if not (config_dir / 'config.json').is_file():
      raise UserError(f'{model!r} has a checkpoints/ folder but no model/config.json, so it is '
                      'not a complete training workdir; pass its export/ or a finished run')
    with storage.local_copy(config_dir) as local:
      config = transformers.AutoConfig.from_pretrained(local)
    flax_model = transformers.FlaxAutoModelForMaskedLM.from_config(config, _do_init=False)
    return Predictor(flax_model, _restore_params(model, step),
                     tokenizer_lib.load_saved_tokenizer(model))
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
    try:
      flax_model = transformers.FlaxAutoModelForMaskedLM.from_pretrained(model)
    except (OSError, ValueError) as e:
      raise UserError(f'could not load a masked-LM model from {model!r} '
                      f'({first_line(e)}); pass a training workdir, an HF-format '
                      'directory or a hub id') from None
    return Predictor(flax_model, flax_model.params,
                     tokenizer_lib.load_pretrained_tokenizer(model))


def _bucket(n: int, minimum: int = 8) -> int:
  """The next power of two at or above n, so few shapes are compiled."""
  return max(minimum, 1 << (n - 1).bit_length())


@functools.partial(jax.jit, static_argnames=('logits_fn', 'top_k'))
def _top_k_at(params, ids, attention_mask, positions, candidate_ids, *, logits_fn, top_k):
  """Top-k (probability, index into candidate_ids) at `positions` [batch, masks]."""
  logits = logits_fn(params, ids, attention_mask, positions)
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


def _encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
  max_length = tokenizer.model_max_length if tokenizer.model_max_length < 1e6 else 512
  encoded = []
  for number, text in enumerate(texts, start=1):
    if not text.strip():
      raise UserError(f'text {number} is empty; give a text with {USER_MASK} in it')
    ids = tokenizer(text.replace(USER_MASK, tokenizer.mask_token))['input_ids']
    if tokenizer.mask_token_id not in ids:
      raise UserError(f'text {number} ({text!r}) has no mask token; write {USER_MASK} '
                      'where the model should fill in a word')
    if len(ids) > max_length:
      raise UserError(f'text {number} has {len(ids)} tokens; the model takes at most '
                      f'{max_length}: shorten it')
    encoded.append(ids)
  return encoded


def fill_mask(predictor: Predictor, texts: Sequence[str], top_k: int = 5,
              targets: Sequence[str] | str | None = None) -> list[list[list[dict]]]:
  """For each text, for each mask in it: the top-k fills, best first.

  Each fill is a dict with the pipeline's keys: score, token, token_str, sequence.
  """
  if top_k < 1:
    raise UserError(f'top_k={top_k} must be at least 1')
  if not texts:
    raise UserError('no text given; pass at least one text with <mask> in it')
  if isinstance(targets, str):
    targets = [targets]
  if targets is not None and not targets:
    raise UserError('targets is empty; pass at least one word, or None to score every token')
  tokenizer = predictor.tokenizer
  encoded = _encode(tokenizer, texts)
  candidates = None if targets is None else target_ids(tokenizer, targets)
  k = min(top_k, predictor.model.config.vocab_size if candidates is None else len(candidates))
  mask_positions = [np.flatnonzero(np.asarray(seq) == tokenizer.mask_token_id) for seq in encoded]
  length, batch = _bucket(max(map(len, encoded))), _bucket(len(encoded), minimum=1)
  masks = _bucket(max(map(len, mask_positions)), minimum=1)
  ids = np.full((batch, length), tokenizer.pad_token_id, np.int32)
  attention_mask = np.zeros((batch, length), np.int32)
  positions = np.zeros((batch, masks), np.int32)
  for row, (seq, where) in enumerate(zip(encoded, mask_positions)):
    ids[row, :len(seq)], attention_mask[row, :len(seq)] = seq, 1
    positions[row, :len(where)] = where
  scores, indices = jax.device_get(_top_k_at(
      predictor.params, ids, attention_mask, positions, candidates,
      logits_fn=predictor.logits_fn, top_k=k))
  if candidates is not None:
    indices = candidates[indices]
  return [_fills(tokenizer, seq, where, scores[row], indices[row])
          for row, (seq, where) in enumerate(zip(encoded, mask_positions))]


def _fills(tokenizer, seq: list[int], positions: np.ndarray, scores: np.ndarray,
           tokens: np.ndarray) -> list[list[dict]]:
  """The pipeline's output for one text: its sequences decode the way the pipeline's do."""
  seq = np.asarray(seq)
  single_mask = len(positions) == 1
  result = []
  for mask, position in enumerate(positions):
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
