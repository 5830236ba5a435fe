"""ModernBERT against PyTorch transformers' `ModernBertForMaskedLM` (skipped without torch).

Guards `mlm_jax/models/modernbert/` and its checkpoint names: tiny random PyTorch models,
every parameter perturbed (norm weights off 1, biases off 0), saved with `save_pretrained`,
loaded with `FlaxAutoModelForMaskedLM`: the same float32 logits with and without padding,
the same masked-LM loss gradients, and an export PyTorch loads with no missing or
unexpected keys and the same logits. The configs cover sliding windows shorter than the
sequence (odd too), global layers every 2 or 3, tied and untied decoders, biases on and off,
and a config.json in the released checkpoints' older layout.
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

torch = pytest.importorskip('torch')

VOCAB, SEQ, PAD = 61, 24, 0
ATOL = 1e-5

BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_attention_heads=2,
            max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
            cls_token_id=1, sep_token_id=2)
CONFIGS = {
    # ModernBERT-base's shape: tied, decoder bias; here every bias and norm bias on too.
    'tied-biases-window8-every3': dict(
        num_hidden_layers=4, global_attn_every_n_layers=3, local_attention=8, norm_bias=True,
        attention_bias=True, mlp_bias=True, classifier_bias=True),
    'untied-nobias-window4-every2': dict(
        num_hidden_layers=3, global_attn_every_n_layers=2, local_attention=4,
        tie_word_embeddings=False, decoder_bias=False, classifier_activation='silu'),
    # config.json as released checkpoints have it; an odd window (PyTorch keeps +-2).
    'old-layout-window5-every2': dict(
        num_hidden_layers=4, global_attn_every_n_layers=2, local_attention=5,
        global_rope_theta=500.0, local_rope_theta=20.0, tie_word_embeddings=False),
}
OLD_LAYOUT = {'old-layout-window5-every2'}


def _torch_model(name: str, directory: str):
  """A perturbed tiny PyTorch ModernBERT saved to `directory` (its config.json rewritten in
  the older layout where `name` asks)."""
  torch.manual_seed(0)
  options = BASE | CONFIGS[name]
  config = transformers.ModernBertConfig(**options, attn_implementation='eager')
  model = transformers.ModernBertForMaskedLM(config).eval()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.1 * torch.randn_like(param))
  model.save_pretrained(directory)
  if name in OLD_LAYOUT:
    _write_old_layout(directory, options)
  return model


def _write_old_layout(directory: str, options: dict) -> None:
  path = os.path.join(directory, 'config.json')
  with open(path, encoding='utf-8') as f:
    config = json.load(f)
  for key in ('layer_types', 'rope_parameters'):
    del config[key]
  config.update(options)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(config, f)


@pytest.fixture(scope='module', params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
  """(PyTorch model, our model loaded from its save_pretrained directory, directory)."""
  directory = str(tmp_path_factory.mktemp(request.param))
  torch_model = _torch_model(request.param, directory)
  return torch_model, FlaxAutoModelForMaskedLM.from_pretrained(directory), directory


def _inputs():
  rng = np.random.RandomState(0)
  ids = rng.randint(3, VOCAB, (2, SEQ))
  mask = np.ones_like(ids)
  mask[1, 15:] = 0
  return ids, mask


def _torch_logits(model, ids, mask=None) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(ids), attention_mask=None if mask is None else
                 torch.tensor(mask)).logits.numpy()


def _logits(model, ids, mask=None) -> np.ndarray:
  apply = jax.jit(lambda params, ids, mask: model(ids, attention_mask=mask, params=params).logits)
  return np.asarray(apply(model.params, ids, mask))


def test_config_layout_read(pair):
  """The old layout's windows and thetas reach the model as PyTorch reads them."""
  torch_model, model, _ = pair
  assert model.config.layer_types == torch_model.config.layer_types
  assert model.config.rope_parameters == torch_model.config.rope_parameters


def test_logits_match_pytorch(pair):
  torch_model, model, _ = pair
  ids, _ = _inputs()
  np.testing.assert_allclose(_logits(model, ids), _torch_logits(torch_model, ids),
                             rtol=0, atol=ATOL)


def test_padded_logits_match_pytorch_on_real_tokens(pair):
  torch_model, model, _ = pair
  ids, mask = _inputs()
  ids = np.where(mask > 0, ids, PAD)
  real = mask.astype(bool)
  np.testing.assert_allclose(_logits(model, ids, mask)[real],
                             _torch_logits(torch_model, ids, mask)[real], rtol=0, atol=ATOL)


def _labels(ids):
  """Every third token labelled, as a masked-LM batch; -100 elsewhere."""
  labels = np.full_like(ids, -100)
  labels[:, ::3] = ids[:, ::3]
  return labels


def _torch_gradients(model, ids, labels) -> dict[str, np.ndarray]:
  model.zero_grad()
  model(torch.tensor(ids), labels=torch.tensor(labels)).loss.backward()
  return {name: p.grad.numpy() for name, p in model.named_parameters()}


def _gradients(model, ids, labels) -> dict[str, np.ndarray]:
  at = labels >= 0

  def loss(params):
    logits = model(ids, params=params).logits
    losses = -jnp.take_along_axis(jax.nn.log_softmax(logits), np.maximum(labels, 0)[..., None],
                                  axis=-1)[..., 0]
    return jnp.sum(losses * at) / at.sum()
  grads = jax.jit(jax.grad(loss))(model.params)
  return hf_checkpoint.from_params(jax.device_get(grads),
                                   model.family.checkpoint_names(model.config))


def test_mlm_loss_gradients_match_pytorch(pair):
  """Padding ids without a mask too: PyTorch's padding row gets no gradient from the lookup."""
  torch_model, model, _ = pair
  ids, _ = _inputs()
  ids[:, 5] = PAD
  labels = _labels(ids)
  expected = _torch_gradients(torch_model, ids, labels)
  got = _gradients(model, ids, labels)
  assert set(got) == set(expected)
  for name, grad in expected.items():
    np.testing.assert_allclose(got[name], grad, rtol=0, atol=ATOL, err_msg=name)


def test_export_loads_in_pytorch_with_the_same_logits(pair, tmp_path):
  torch_model, model, _ = pair
  model.save_pretrained(str(tmp_path))
  reloaded, info = transformers.ModernBertForMaskedLM.from_pretrained(
      str(tmp_path), output_loading_info=True, attn_implementation='eager')
  assert {k: v for k, v in info.items() if v} == {}
  ids, _ = _inputs()
  np.testing.assert_allclose(_torch_logits(reloaded.eval(), ids), _torch_logits(torch_model, ids),
                             rtol=0, atol=1e-6)


def test_export_writes_the_tensors_pytorch_saves(pair, tmp_path):
  """Tied: no `decoder.weight`, as save_pretrained writes it."""
  _, model, directory = pair
  model.save_pretrained(str(tmp_path))
  assert (sorted(hf_checkpoint.read_tensors(str(tmp_path)))
          == sorted(hf_checkpoint.read_tensors(directory)))
