"""DistilBERT and ALBERT (mlm_jax/models/distilbert/, albert/) against PyTorch transformers.

Tiny PyTorch models with every parameter perturbed (no LayerNorm weight left at 1, no bias
at 0), tied and untied, saved with `save_pretrained`: our loader must give the same logits
(with a padded row), the masked-positions-only head the same rows, the same MLM-loss
gradients, and an export PyTorch reloads with no missing or unexpected tensor. Training must
drop out where PyTorch does, at the same rates, and fresh parameters start at PyTorch's
scales. Skipped where torch is absent (CI); the golden fixtures cover that side.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from mlm_jax.models import FlaxAutoModelForMaskedLM
from mlm_jax.models import hf_checkpoint
from mlm_jax.models import registry

torch = pytest.importorskip('torch')

# Hidden and attention dropout at distinct rates (inference ignores them).
CONFIGS = {
    'distilbert': lambda **kw: transformers.DistilBertConfig(
        vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=40,
        dropout=0.125, attention_dropout=0.375, **kw),
    # 3 layers over 2 groups of 2: group 0 runs twice, group 1 once.
    'albert': lambda **kw: transformers.AlbertConfig(
        vocab_size=99, embedding_size=16, hidden_size=32, num_hidden_layers=3, num_hidden_groups=2,
        inner_group_num=2, num_attention_heads=4, intermediate_size=37, max_position_embeddings=40,
        hidden_dropout_prob=0.125, attention_probs_dropout_prob=0.375, **kw),
}
CASES = [(family, tied) for family in CONFIGS for tied in (True, False)]
# What hub files of each family may hold beyond save_pretrained's tensors: the tied decoder
# repeated (older releases wrote it), buffers, ALBERT's pooler and sentence-order head.
# (A file's own tensors take precedence: an untied decoder is no repeat.)
EXTRAS = {
    'distilbert': {'vocab_projector.weight': (99, 32),
                   'distilbert.embeddings.position_ids': (1, 40)},
    'albert': {'predictions.decoder.weight': (99, 16), 'predictions.decoder.bias': (99,),
               'albert.embeddings.position_ids': (1, 40),
               'albert.embeddings.token_type_ids': (1, 40),
               'albert.pooler.weight': (32, 32), 'albert.pooler.bias': (32,),
               'sop_classifier.classifier.weight': (2, 32), 'sop_classifier.classifier.bias': (2,)},
}
PAD_FROM = 7  # Row 1 is padding from here on.
PREDICT_AT = np.array([[1, 4, 10], [0, 2, 6]])


def _inputs(config):
  ids = np.random.RandomState(0).randint(3, config.vocab_size, (2, 11))
  mask = np.ones_like(ids)
  mask[1, PAD_FROM:] = 0
  ids[1, PAD_FROM:] = config.pad_token_id
  return ids, mask


def _logits(ours, ids, **kwargs):
  return np.asarray(ours(ids, **kwargs).logits)


def _torch_logits(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.fixture(scope='module', params=CASES, ids=[f'{f}-{"tied" if t else "untied"}'
                                                    for f, t in CASES])
def pair(request, tmp_path_factory):
  """(PyTorch model, its save_pretrained directory, our model loaded from it)."""
  family, tied = request.param
  torch.manual_seed(0)
  model = transformers.AutoModelForMaskedLM.from_config(
      CONFIGS[family](tie_word_embeddings=tied)).eval()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(torch.randn_like(param) * 0.1)
  directory = str(tmp_path_factory.mktemp(f"{family}_{tied}"))
  model.save_pretrained(directory)
  return model, directory, FlaxAutoModelForMaskedLM.from_pretrained(directory)


def test_logits_match_pytorch(pair):
  model, _, ours = pair
  ids, mask = _inputs(model.config)
  np.testing.assert_allclose(_logits(ours, ids, attention_mask=mask),
                             _torch_logits(model, ids, mask), rtol=0, atol=1e-5)


def test_masked_head_gives_the_full_logits_rows(pair):
  model, _, ours = pair
  ids, mask = _inputs(model.config)
  full = _logits(ours, ids, attention_mask=mask)
  at = _logits(ours, ids, attention_mask=mask, predict_at=PREDICT_AT)
  np.testing.assert_allclose(at, np.take_along_axis(full, PREDICT_AT[..., None], axis=1),
                             rtol=0, atol=1e-6)


def test_mlm_gradients_match_pytorch(pair):
  """The gradient of the mean cross-entropy at a few positions, tensor by tensor (a tied
  word table gets both its lookup's and the decoder's share). Attention's key bias cancels
  in the softmax: its gradient is rounding noise (1e-9) on both sides, hence the floor."""
  model, _, ours = pair
  ids, mask = _inputs(model.config)
  labels = np.full_like(ids, -100)
  labels[[0, 0, 1], [1, 4, 2]] = [5, 17, 60]  # Non-padding positions of both rows.
  model.zero_grad()
  torch_loss = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     labels=torch.tensor(labels)).loss
  torch_loss.backward()
  torch_grads = dict(model.named_parameters())

  def loss(params):
    logits = ours(ids, attention_mask=mask, params=params).logits
    log_probs = jax.nn.log_softmax(logits)
    picked = jnp.take_along_axis(log_probs, np.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(labels >= 0, picked, 0.0)) / np.sum(labels >= 0)

  value, grads = jax.value_and_grad(loss)(ours.params)
  assert float(value) == pytest.approx(torch_loss.item(), rel=1e-6)
  table = ours.family.checkpoint_names(ours.config)
  ours_by_name = hf_checkpoint.from_params(jax.device_get(grads), table)
  expected = {name: torch_grads[name].grad.numpy() for name in table.all}
  floor = 1e-7 * max(np.abs(grad).max() for grad in expected.values())
  for name, grad in expected.items():
    assert np.abs(ours_by_name[name] - grad).max() <= 1e-5 * np.abs(grad).max() + floor, name


def test_export_reloads_in_pytorch_unchanged(pair, tmp_path):
  model, _, ours = pair
  ours.save_pretrained(str(tmp_path))
  reloaded, info = transformers.AutoModelForMaskedLM.from_pretrained(
      str(tmp_path), output_loading_info=True)
  assert type(reloaded) is type(model)
  assert {k: v for k, v in info.items() if v} == {}
  ids, mask = _inputs(model.config)
  np.testing.assert_array_equal(_torch_logits(reloaded.eval(), ids, mask),
                                _torch_logits(model, ids, mask))


def _rewritten(directory, copy, change):
  """A copy of the checkpoint in `directory` whose tensors are `change(tensors)`."""
  with open(os.path.join(directory, 'config.json'), encoding='utf-8') as f:
    config_dict = json.load(f)
  hf_checkpoint.write(str(copy), change(hf_checkpoint.read_tensors(directory)), config_dict)
  return str(copy)


def test_hub_files_with_repeated_and_extra_tensors_load(pair, tmp_path):
  model, directory, ours = pair
  extras = {name: np.ones(shape, np.float32)
            for name, shape in EXTRAS[model.config.model_type].items()}
  hub = _rewritten(directory, tmp_path, lambda tensors: extras | tensors)
  loaded = FlaxAutoModelForMaskedLM.from_pretrained(hub)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.params, ours.params)


def test_bare_encoder_files_load_with_a_fresh_head(pair, tmp_path):
  """A checkpoint of the encoder alone names its tensors without the base prefix."""
  _, directory, ours = pair
  base = ours.family.checkpoint_names(ours.config).base_prefix
  bare = _rewritten(directory, tmp_path, lambda tensors: {
      name.removeprefix(f'{base}.'): value for name, value in tensors.items()
      if name.startswith(f'{base}.')})
  notes = []
  loaded = FlaxAutoModelForMaskedLM.from_pretrained(bare, log=notes.append)
  assert len(notes) == 1 and 'fresh' in notes[0]
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.params[base], ours.params[base])


def test_segments_attend_within_themselves_only(pair):
  """With segment_ids, the first document of a row predicts as it would alone."""
  model, _, ours = pair
  ids, _ = _inputs(model.config)
  segment_ids = np.array([[0] * 5 + [1] * 6, [0] * 5 + [1] * 6])
  logits = _logits(ours, ids, segment_ids=segment_ids)
  alone = _torch_logits(model, ids[:, :5], np.ones_like(ids[:, :5]))
  np.testing.assert_allclose(logits[:, :5], alone, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------
# Training-mode dropout and fresh parameters.

def test_dropout_sites_and_rates_match_pytorch(pair, monkeypatch):
  """Every dropout in training, in order: the shape it drops over and its rate (the configs'
  hidden and attention rates differ, so a rate names its setting)."""
  model, _, ours = pair
  ids, mask = _inputs(model.config)
  torch_sites, our_sites = [], []
  torch_dropout, bernoulli = torch.nn.functional.dropout, jax.random.bernoulli

  def record_torch(x, p=0.5, training=True, inplace=False):
    if training and p > 0:
      torch_sites.append((tuple(x.shape), round(p, 6)))
    return torch_dropout(x, p, training, inplace)

  def record_ours(key, p, shape):
    our_sites.append((tuple(shape), round(1.0 - float(p), 6)))
    return bernoulli(key, p, shape)

  monkeypatch.setattr(torch.nn.functional, 'dropout', record_torch)
  monkeypatch.setattr(jax.random, 'bernoulli', record_ours)
  eager = transformers.AutoModelForMaskedLM.from_config(model.config, attn_implementation='eager')
  eager.train()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  ours(ids, attention_mask=mask, train=True, dropout_rng=jax.random.PRNGKey(1))
  assert len(torch_sites) > 3
  assert our_sites == torch_sites


def test_training_drops_out_and_eval_does_not(pair):
  model, _, ours = pair
  ids, mask = _inputs(model.config)
  key = jax.random.PRNGKey(3)
  trained = _logits(ours, ids, attention_mask=mask, train=True, dropout_rng=key)
  evaluated = _logits(ours, ids, attention_mask=mask)
  assert np.abs(trained - evaluated).max() > 1e-3
  np.testing.assert_array_equal(
      trained, _logits(ours, ids, attention_mask=mask, train=True, dropout_rng=key))
  np.testing.assert_array_equal(
      evaluated, _logits(ours, ids, attention_mask=mask, train=False, dropout_rng=key))


@pytest.mark.parametrize('family', CONFIGS)
def test_fresh_parameters_start_at_pytorch_scales(family):
  """Tensor by tensor (untied: every tensor a tied model has, and the decoder): zeros where
  PyTorch has zeros, ones where ones, else a centred normal of PyTorch's spread
  (initializer_range 0.05, not the default, so none is hard-coded)."""
  config = CONFIGS[family](tie_word_embeddings=False, initializer_range=0.05)
  torch.manual_seed(0)
  expected = transformers.AutoModelForMaskedLM.from_config(config).state_dict()
  ours = FlaxAutoModelForMaskedLM.from_config(config)
  table = ours.family.checkpoint_names(config)
  fresh = hf_checkpoint.from_params(jax.device_get(ours.params), table)
  for name in table.all:
    want, got = expected[name].numpy(), fresh[name]
    if np.all(want == want.flat[0]):
      np.testing.assert_array_equal(got, want, err_msg=name)
    else:  # Within 5 standard errors of the estimates.
      assert abs(got.std() / want.std() - 1) < 5 / np.sqrt(got.size), name
      assert abs(got.mean()) < 5 * want.std() / np.sqrt(got.size), name


def test_distilbert_sinusoidal_positions_start_as_in_pytorch():
  """`sinusoidal_pos_embds`: a trainable table (as in PyTorch) that starts as its sinusoids."""
  config = CONFIGS['distilbert'](sinusoidal_pos_embds=True)
  name = 'distilbert.embeddings.position_embeddings.weight'
  expected = transformers.AutoModelForMaskedLM.from_config(config).state_dict()[name].numpy()
  ours = FlaxAutoModelForMaskedLM.from_config(config)
  fresh = hf_checkpoint.from_params(jax.device_get(ours.params),
                                    ours.family.checkpoint_names(config))
  np.testing.assert_allclose(fresh[name], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize('model_type', ['distilbert', 'albert'])
def test_registered_under_its_model_type(model_type):
  family = registry.family(model_type)
  assert family.architecture == type(transformers.AutoModelForMaskedLM.from_config(
      CONFIGS[model_type]())).__name__
  assert family.max_positions(CONFIGS[model_type]()) == 40
