"""ModernBERT without torch: the bad configs it refuses, how far its sliding window reaches,
document attention, the masked-positions-only head, the dropouts, and the fresh
initialisation's scales (`mlm_jax/models/modernbert/`).

PyTorch parity is in test_modernbert_live.py; these hold where torch is absent.
"""

import functools
import json
import math

import jax
import numpy as np
import pytest
import transformers

from mlm_jax.errors import UserError
from mlm_jax.models import FlaxAutoModelForMaskedLM

VOCAB, SEQ = 61, 24
GLOBAL, LOCAL = 'full_attention', 'sliding_attention'


def _config(**overrides) -> transformers.ModernBertConfig:
  """Tiny, with weights large enough (initializer_range 0.5) that every path shows."""
  options = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                 num_attention_heads=2, max_position_embeddings=64, pad_token_id=0,
                 bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                 initializer_range=0.5)
  return transformers.ModernBertConfig(**options | overrides)


def _model(**overrides) -> FlaxAutoModelForMaskedLM:
  """A model of `_config(**overrides)` with the one set of shared parameters: the overrides
  these tests make change no shapes."""
  model = FlaxAutoModelForMaskedLM.from_config(_config(**overrides), _do_init=False)
  model.params = _shared_params()
  return model


@functools.cache
def _shared_params() -> dict:
  return _fresh_params(_config())


def _fresh_params(config) -> dict:
  model = FlaxAutoModelForMaskedLM.from_config(config, _do_init=False)
  return jax.jit(model.init_weights)(model.key)


def _ids(seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randint(3, VOCAB, (1, SEQ))


@functools.cache
def _apply(model):
  return jax.jit(lambda params, ids, arrays: model(ids, params=params, **arrays).logits)


def _logits(model, ids, **arrays) -> np.ndarray:
  """The model's logits, compiled (once per model and shapes of `arrays`)."""
  return np.asarray(_apply(model)(model.params, ids, arrays))


# --- bad configs: one-line errors when the model is built --------------------------
# transformers refuses the first and last when it builds a config itself, so these edit one.

def test_layer_types_of_another_length_are_refused():
  config = _config(num_hidden_layers=3)
  config.layer_types = [GLOBAL, LOCAL]
  with pytest.raises(UserError, match='2 layer_types for num_hidden_layers=3'):
    FlaxAutoModelForMaskedLM.from_config(config)


def test_a_config_json_whose_layer_types_disagree_is_one_line(tmp_path):
  """What a user meets: transformers' own validation of config.json, as one line."""
  config = _config(num_hidden_layers=3).to_dict() | {'layer_types': [GLOBAL, LOCAL]}
  (tmp_path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(UserError, match=r'config.json is not a valid modernbert config \(.*'
                     r'`num_hidden_layers` \(3\) must be equal to the number of `layer_types` '
                     r'\(2\)\); fix or re-save it$'):
    FlaxAutoModelForMaskedLM.from_pretrained(str(tmp_path))


@pytest.mark.parametrize('local_attention', [0, -4])
def test_a_window_of_no_tokens_is_refused(local_attention):
  with pytest.raises(UserError, match=f'local_attention={local_attention}'):
    _model(local_attention=local_attention)


def test_an_unknown_layer_type_is_refused():
  config = _config()
  config.layer_types = [GLOBAL, 'chunked_attention']
  with pytest.raises(UserError, match="'chunked_attention' is not a ModernBERT layer"):
    FlaxAutoModelForMaskedLM.from_config(config)


# --- the sliding window -----------------------------------------------------------

@pytest.mark.parametrize('local_attention', [4, 5])  # 5 rounds down to +-2, as PyTorch does.
def test_local_layers_reach_half_the_window_per_layer(local_attention):
  """Two local layers of +-2 keys: position 5 sees tokens 1 and 9 (2 + 2 away), not 0 or 10.
  What is out of reach leaves its logits bit for bit; what is in reach moves them at all."""
  model = _model(layer_types=[LOCAL, LOCAL], local_attention=local_attention)
  ids = _ids()
  before = _logits(model, ids)[0, 5]
  moved = lambda at: np.abs(_logits(model, _replaced(ids, at))[0, 5] - before).max()
  assert [moved(at) > 0 for at in (0, 1, 9, 10)] == [False, True, True, False]


def _replaced(ids: np.ndarray, at: int) -> np.ndarray:
  return np.where(np.arange(SEQ) == at, ids % 50 + 3, ids)


@pytest.fixture(scope='module')
def mixed():
  """A local layer of +-2 keys, then a global one."""
  return _model(layer_types=[LOCAL, GLOBAL], local_attention=4)


def test_a_global_layer_reaches_every_token(mixed):
  ids = _ids()
  assert np.abs(_logits(mixed, _replaced(ids, SEQ - 1))[0, 0] - _logits(mixed, ids)[0, 0]).max() > 0


# --- calls --------------------------------------------------------------------------

def test_documents_packed_with_segment_ids_predict_as_alone(mixed):
  """Document attention, the window included: a packed row equals its documents run alone
  (rotary positions are relative, so the offset does not matter), up to float32 rounding: a
  row of 20 keys and one of 10 sum in another order (1.03e-5 apart on jax 0.10's CPU); a leak
  between the documents moves the logits by about 1e-1."""
  ids = _ids()
  segments = (np.arange(SEQ) >= 10).astype(np.int32)[None]
  packed = _logits(mixed, ids, segment_ids=segments)
  np.testing.assert_allclose(packed[:, :10], _logits(mixed, ids[:, :10]), rtol=0, atol=3e-5)
  np.testing.assert_allclose(packed[:, 10:], _logits(mixed, ids[:, 10:]), rtol=0, atol=3e-5)


@pytest.fixture(scope='module')
def plain():
  return _model()


def test_predict_at_gives_the_rows_of_the_full_logits(plain):
  ids = np.concatenate([_ids(0), _ids(1)])
  at = np.array([[3, 0, 17], [23, 5, 5]])
  full = _logits(plain, ids)
  # The head's product over 3 rows rounds apart from the one over all rows, by a few float32
  # ulps that differ between CPUs (2e-6 on logits near 6 seen on one); a wrong row is off by 1.
  np.testing.assert_allclose(_logits(plain, ids, predict_at=at),
                             np.take_along_axis(full, at[..., None], axis=1), rtol=0, atol=1e-5)


def _random_draws(model, ids, train: bool) -> list[tuple[int, ...]]:
  """The shapes of the random bits the call draws (dropout masks), from its trace."""
  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      yield eqn
      for value in eqn.params.values():
        for sub in value if isinstance(value, (list, tuple)) else [value]:
          if isinstance(sub, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
            yield from walk(getattr(sub, 'jaxpr', sub))
  rng = jax.random.PRNGKey(0) if train else None
  traced = jax.make_jaxpr(lambda params: model(ids, params=params, train=train,
                                               dropout_rng=rng).logits)(model.params)
  return sorted(tuple(eqn.outvars[0].aval.shape) for eqn in walk(traced.jaxpr)
                if eqn.primitive.name == 'random_bits')


# Where PyTorch drops, by the shape dropped (batch 1, 24 tokens, hidden 32, 2 heads,
# intermediate 40, 2 layers): the embeddings' output; attention probabilities and Wo's output
# in every layer; the GeGLU product before Wo in every layer.
DROPPED = {'embedding_dropout': [(1, SEQ, 32)],
           'attention_dropout': [(1, 2, SEQ, SEQ)] * 2 + [(1, SEQ, 32)] * 2,
           'mlp_dropout': [(1, SEQ, 40)] * 2}


@pytest.mark.parametrize('rate', sorted(DROPPED))
def test_each_dropout_drops_where_pytorch_does(rate):
  assert _random_draws(_model(**{rate: 0.5}), _ids(), train=True) == sorted(DROPPED[rate])


def test_no_dropout_at_inference():
  model = _model(**{rate: 0.5 for rate in DROPPED})
  assert _random_draws(model, _ids(), train=False) == []


# --- a fresh model --------------------------------------------------------------------

def _truncated_std(cutoff: float) -> float:
  """The standard deviation of a unit normal truncated to [-cutoff, cutoff]."""
  density = math.exp(-cutoff**2 / 2) / math.sqrt(2 * math.pi)
  return math.sqrt(1 - 2 * cutoff * density / math.erf(cutoff / math.sqrt(2)))


def test_fresh_weights_follow_the_references_truncated_normals():
  """std initializer_range for the embeddings and the weights that read the residual stream,
  initializer_range / sqrt(2 * layers) for those that write it, the head and the decoder;
  cut at initializer_cutoff_factor standard deviations; zero biases, unit norms."""
  config = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                num_hidden_layers=2, tie_word_embeddings=False, attention_bias=True,
                norm_bias=True, initializer_range=0.05, initializer_cutoff_factor=1.5)
  params = _fresh_params(_config(**config))
  std_in, std_out = 0.05, 0.05 / np.sqrt(4)
  kernels = {'embedding': (params['model']['embeddings']['tok_embeddings']['embedding'], std_in),
             'Wqkv': (params['model']['layers']['1']['attn']['Wqkv']['kernel'], std_in),
             'mlp Wi': (params['model']['layers']['0']['mlp']['Wi']['kernel'], std_in),
             'attn Wo': (params['model']['layers']['0']['attn']['Wo']['kernel'], std_out),
             'mlp Wo': (params['model']['layers']['1']['mlp']['Wo']['kernel'], std_out),
             'head': (params['head']['dense']['kernel'], std_out),
             'decoder': (params['decoder']['kernel'], std_out)}
  for name, (kernel, std) in kernels.items():
    assert np.abs(kernel).max() <= 1.5 * std, name
    np.testing.assert_allclose(np.std(kernel), std * _truncated_std(1.5), rtol=0.05, err_msg=name)
  np.testing.assert_array_equal(params['model']['layers']['1']['attn']['Wqkv']['bias'], 0)
  np.testing.assert_array_equal(params['model']['layers']['1']['attn_norm']['scale'], 1)
  np.testing.assert_array_equal(params['decoder']['bias'], 0)


def test_layer_0_has_no_attn_norm(plain):
  assert 'attn_norm' not in plain.params['model']['layers']['0']
  assert 'attn_norm' in plain.params['model']['layers']['1']


def test_max_positions_is_max_position_embeddings():
  config = _config(max_position_embeddings=48)
  assert FlaxAutoModelForMaskedLM.from_config(config, _do_init=False).max_positions == 48
