"""Document-aware attention (`config.attention_scope='document'`, `steps.document_ids`).

Guards where a document ends (its separator included), which separator a tokenizer's
blocks use, and that the compiled train and eval steps keep attention inside each
document: changing one document of a block leaves the other documents' logits, as the
step's own forward computes them, exactly as they were, while with 'block' it does not.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tokenizers
import transformers
from tokenizers import models, pre_tokenizers, processors

from mlm_jax import masking
from mlm_jax import model as model_lib
from mlm_jax import run as run_lib
from mlm_jax import sharding
from mlm_jax import steps as steps_lib
from mlm_jax.data import tokenizer as tokenizer_lib
from mlm_jax.errors import UserError
from mlm_jax.models import FlaxAutoModelForMaskedLM
from tests.conftest import load_config

BOS, PAD, SEP, MASK = 0, 1, 2, 4  # RoBERTa's special ids (<unk> is 3).
# Two rows of three documents each (the first and last cut by the block's edges); a
# document runs up to and including its separator.
_ROW = [9, 10, 11, SEP, BOS, 12, 13, 14, 15, 16, SEP, BOS, 17, 18, 19, 20]
_DOC = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2])
_SIZES = dict(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0, pad_token_id=PAD)
_SPEC = masking.MaskingSpec(mask_token_id=MASK, special_ids=(BOS, PAD, SEP, 3, MASK),
                            vocab_size=40, probability=0.3)


def test_a_document_ends_with_its_separator():
  ids = jnp.asarray([_ROW, [5, 6, SEP, SEP] + _ROW[4:]])
  np.testing.assert_array_equal(steps_lib.document_ids(ids, SEP)[0], _DOC)
  # A separator right after another closes a document of its own.
  np.testing.assert_array_equal(steps_lib.document_ids(ids, SEP)[1, :6], [0, 0, 0, 1, 2, 2])


def _bpe_tokenizer():
  return tokenizer_lib.train_bpe_tokenizer(['the sky is blue', 'why is it'] * 5, vocab_size=300,
                                           model_max_length=64)


def _document_config():
  config = load_config('tiny_test')
  config.attention_scope = 'document'
  return config


def test_the_separator_is_the_token_that_ends_each_text():
  bpe = _bpe_tokenizer()
  assert run_lib.document_separator(_document_config(), bpe) == bpe.convert_tokens_to_ids('</s>')
  vocab = {'[PAD]': 0, '[UNK]': 1, '[CLS]': 2, '[SEP]': 3, '[MASK]': 4, 'a': 5}
  backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token='[UNK]'))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  backend.post_processor = processors.BertProcessing(('[SEP]', 3), ('[CLS]', 2))
  bert = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, cls_token='[CLS]', sep_token='[SEP]', pad_token='[PAD]',
      unk_token='[UNK]', mask_token='[MASK]')
  assert run_lib.document_separator(_document_config(), bert) == 3
  assert run_lib.document_separator(load_config('tiny_test'), bert) is None  # 'block'.


def test_a_tokenizer_that_ends_texts_with_no_separator_is_refused():
  bpe = _bpe_tokenizer()
  bpe.backend_tokenizer.post_processor = None  # Texts concatenate with nothing between.
  with pytest.raises(UserError, match='^attention_scope=document needs a tokenizer that ends'):
    run_lib.document_separator(_document_config(), bpe)


@pytest.fixture(scope='module')
def models_by_family():
  models = {'roberta': transformers.RobertaConfig(**_SIZES),
            'bert': transformers.BertConfig(**_SIZES)}
  for family, config in models.items():
    models[family] = FlaxAutoModelForMaskedLM.from_config(config, _do_init=False)
    models[family].params = jax.jit(models[family].init_weights)(models[family].key)
  return models


class _Recorder:
  """The model, recording what every forward the compiled step runs computes (from inside
  the jit, through `jax.debug.callback`): the logits, and the token each row of them is
  for (`predict_at`: every token unless the masked head chose some)."""

  def __init__(self, model):
    self.model, self.config, self.seen = model, model.config, []

  def __call__(self, input_ids, predict_at=None, **kwargs):
    output = self.model(input_ids, predict_at=predict_at, **kwargs)
    if predict_at is None:
      predict_at = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
    jax.debug.callback(lambda *arrays: self.seen.append(tuple(map(np.asarray, arrays))),
                       output.logits, predict_at)
    return output


def _changed_middle_document():
  """Two rows, and the same rows with document 1's tokens (not its separator) changed."""
  ids = np.array([_ROW, _ROW[::-1]], np.int32)
  changed = ids.copy()
  middle = (_documents(ids) == 1) & (ids > MASK)
  changed[middle] = 30 + np.arange(middle.sum())
  return ids, changed


def _documents(ids):
  return np.asarray(steps_lib.document_ids(jnp.asarray(ids), SEP))


def _step_logits(model, batches, sep_id, step):
  """For each of `batches` ([rows, length] ids), (logits, the document of the token each
  row of them is for) of the forward in the compiled `step` (compiled once): 'eval',
  'train' (full head) or 'train_masked_head'."""
  schedule = optax.constant_schedule(0.0)
  recorder, tx = _Recorder(model), optax.sgd(schedule)
  steps = steps_lib.compile_steps(
      recorder, tx, schedule, _SPEC, seed=0, mesh=sharding.make_mesh(),
      head_fn=model_lib.head_fn(recorder) if step == 'train_masked_head' else None,
      max_predictions=model_lib.max_predictions(batches[0].shape[-1], _SPEC.probability),
      sep_id=sep_id)
  for ids in batches:
    if step == 'eval':
      steps.evaluate_batch(model.params, ids, np.ones(len(ids), np.float32), np.int32(0))
    else:
      params = jax.tree_util.tree_map(jnp.copy, model.params)  # The step donates its state.
      steps.train(steps_lib.create_train_state(params, tx, seed=0), ids[None])
  jax.effects_barrier()
  assert len(recorder.seen) == len(batches)
  # `predict_at` indexes each group of rows pooled (the masked-only head's), flattened.
  return [(logits, np.take_along_axis(_documents(ids).reshape(len(predict_at), -1), predict_at,
                                      axis=1))
          for ids, (logits, predict_at) in zip(batches, recorder.seen)]


# Every step's forward with 'document', and both kinds of step with 'block' (where the
# change reaches every token: what the 'document' cases would see of a leak).
@pytest.mark.parametrize('family, step, scope', [
    ('roberta', 'eval', 'document'), ('bert', 'eval', 'document'), ('roberta', 'eval', 'block'),
    ('roberta', 'train', 'document'), ('roberta', 'train_masked_head', 'document'),
    ('roberta', 'train_masked_head', 'block')])
def test_the_steps_attend_within_documents_only_with_document_scope(models_by_family, family,
                                                                     step, scope):
  ids, changed = _changed_middle_document()
  sep_id = SEP if scope == 'document' else None
  (before, documents), (after, _) = _step_logits(models_by_family[family], [ids, changed],
                                                 sep_id, step)
  others = documents != 1
  assert others.any() and not others.all()
  assert not np.array_equal(before[~others], after[~others])  # The change is seen ...
  # ... by the other documents' tokens only when they attend to the whole block.
  assert np.array_equal(before[others], after[others]) == (scope == 'document')
