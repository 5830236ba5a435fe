"""The optimizer (`mlm_jax.optim`): which parameters get weight decay, and the schedule.

The decay mask is checked against explicit lists of parameter paths of the models this
package trains (RoBERTa, BERT, DistilBERT, ALBERT), not against a copy of its own rule; the
schedules at chosen steps (warmup-stable-decay's phases and its 1-sqrt and linear decays
included); a resumed run's schedule length.
"""

import pytest
import transformers
from flax import traverse_util

from mlm_jax import optim
from mlm_jax.models import FlaxAutoModelForMaskedLM
from tests.conftest import load_config

_SIZES = dict(vocab_size=50, max_position_embeddings=20, num_attention_heads=2)
_CONFIGS = {
    'roberta': transformers.RobertaConfig(hidden_size=8, num_hidden_layers=1,
                                          intermediate_size=16, **_SIZES),
    'bert': transformers.BertConfig(hidden_size=8, num_hidden_layers=1, intermediate_size=16,
                                    **_SIZES),
    'distilbert': transformers.DistilBertConfig(dim=8, n_layers=1, n_heads=2, hidden_dim=16,
                                                vocab_size=50, max_position_embeddings=20),
    'albert': transformers.AlbertConfig(embedding_size=4, hidden_size=8, num_hidden_layers=1,
                                        intermediate_size=16, **_SIZES),
}
# Every parameter that gets weight decay: matrices and embeddings. Biases and every layer
# norm (`LayerNorm`, `layer_norm`, `sa_layer_norm`, `full_layer_layer_norm`, ...) do not.
_DECAYED = {
    'roberta': [
        'roberta/embeddings/word_embeddings/embedding',
        'roberta/embeddings/position_embeddings/embedding',
        'roberta/embeddings/token_type_embeddings/embedding',
        'roberta/encoder/layer/0/attention/self/query/kernel',
        'roberta/encoder/layer/0/attention/self/key/kernel',
        'roberta/encoder/layer/0/attention/self/value/kernel',
        'roberta/encoder/layer/0/attention/output/dense/kernel',
        'roberta/encoder/layer/0/intermediate/dense/kernel',
        'roberta/encoder/layer/0/output/dense/kernel',
        'lm_head/dense/kernel',
    ],
    'bert': [
        'bert/embeddings/word_embeddings/embedding',
        'bert/embeddings/position_embeddings/embedding',
        'bert/embeddings/token_type_embeddings/embedding',
        'bert/encoder/layer/0/attention/self/query/kernel',
        'bert/encoder/layer/0/attention/self/key/kernel',
        'bert/encoder/layer/0/attention/self/value/kernel',
        'bert/encoder/layer/0/attention/output/dense/kernel',
        'bert/encoder/layer/0/intermediate/dense/kernel',
        'bert/encoder/layer/0/output/dense/kernel',
        'cls/predictions/transform/dense/kernel',
    ],
    'distilbert': [
        'distilbert/embeddings/word_embeddings/embedding',
        'distilbert/embeddings/position_embeddings/embedding',
        'distilbert/transformer/layer/0/attention/q_lin/kernel',
        'distilbert/transformer/layer/0/attention/k_lin/kernel',
        'distilbert/transformer/layer/0/attention/v_lin/kernel',
        'distilbert/transformer/layer/0/attention/out_lin/kernel',
        'distilbert/transformer/layer/0/ffn/lin1/kernel',
        'distilbert/transformer/layer/0/ffn/lin2/kernel',
        'vocab_transform/kernel',
    ],
    'albert': [
        'albert/embeddings/word_embeddings/embedding',
        'albert/embeddings/position_embeddings/embedding',
        'albert/embeddings/token_type_embeddings/embedding',
        'albert/encoder/embedding_hidden_mapping_in/kernel',
        'albert/encoder/albert_layer_groups/0/albert_layers/0/attention/query/kernel',
        'albert/encoder/albert_layer_groups/0/albert_layers/0/attention/key/kernel',
        'albert/encoder/albert_layer_groups/0/albert_layers/0/attention/value/kernel',
        'albert/encoder/albert_layer_groups/0/albert_layers/0/attention/dense/kernel',
        'albert/encoder/albert_layer_groups/0/albert_layers/0/ffn/kernel',
        'albert/encoder/albert_layer_groups/0/albert_layers/0/ffn_output/kernel',
        'predictions/dense/kernel',
    ],
}


@pytest.mark.parametrize('model_type', sorted(_CONFIGS))
def test_weight_decay_reaches_matrices_and_embeddings_only(model_type):
  model = FlaxAutoModelForMaskedLM.from_config(_CONFIGS[model_type], _do_init=False)
  params = model.params_shape_tree  # Shapes only: nothing is computed.
  mask = traverse_util.flatten_dict(optim.decay_mask(params), sep='/')
  assert sorted(path for path, decayed in mask.items() if decayed) == sorted(
      _DECAYED[model_type])
  assert len(mask) > len(_DECAYED[model_type])  # The rest exist and are not decayed.


def test_schedule_warms_up_from_zero_then_decays_to_zero_at_the_end():
  config = load_config('tiny_test')  # learning_rate 1e-2, warmup_steps 2, linear.
  schedule = optim.make_schedule(config, total_steps=20)
  expected = {0: 0.0, 1: 5e-3, 2: 1e-2, 11: 5e-3, 20: 0.0}
  assert {step: float(schedule(step)) for step in expected} == pytest.approx(expected)


def test_cosine_schedule_is_halfway_down_halfway_through_the_decay():
  config = load_config('tiny_test')
  config.lr_schedule = 'cosine'
  schedule = optim.make_schedule(config, total_steps=22)
  assert float(schedule(12)) == pytest.approx(5e-3)
  assert float(schedule(22)) == pytest.approx(0.0, abs=1e-9)


def _wsd(total_steps: int, fraction: float, decay: str = '1-sqrt'):
  config = load_config('tiny_test')  # learning_rate 1e-2, warmup_steps 2.
  config.lr_schedule, config.wsd_decay_fraction, config.wsd_decay = 'wsd', fraction, decay
  schedule = optim.make_schedule(config, total_steps)
  return lambda step: float(schedule(step))


def test_wsd_warms_up_then_holds_the_peak_until_the_decay_starts():
  rate = _wsd(total_steps=20, fraction=0.5)  # Decays over steps 10..20.
  assert [rate(s) for s in (0, 1, 2, 6, 9, 10)] == pytest.approx(
      [0.0, 5e-3, 1e-2, 1e-2, 1e-2, 1e-2])


def test_wsd_decays_as_one_minus_sqrt_to_zero_at_the_end():
  rate = _wsd(total_steps=20, fraction=0.5)
  # t = 2/10 and 5/10 of the way down: lr * (1 - sqrt(t)), not lr * sqrt(1 - t).
  assert rate(12) == pytest.approx(1e-2 * (1 - 0.2 ** 0.5))
  assert rate(15) == pytest.approx(1e-2 * (1 - 0.5 ** 0.5))
  assert rate(20) == pytest.approx(0.0, abs=1e-9)
  assert rate(25) == pytest.approx(0.0, abs=1e-9)  # Past the end (a longer resumed run).


def test_wsd_linear_decay_is_halfway_down_halfway_through():
  rate = _wsd(total_steps=20, fraction=0.5, decay='linear')
  assert [rate(s) for s in (10, 15, 20)] == pytest.approx([1e-2, 5e-3, 0.0], abs=1e-9)


@pytest.mark.parametrize('total_steps, decay_steps', [(25, 3), (34, 3)])
def test_wsd_decay_takes_the_fraction_of_the_steps_to_the_nearest_step(total_steps, decay_steps):
  rate = _wsd(total_steps, fraction=0.1)  # 2.5 steps decay over 3, 3.4 over 3.
  start = total_steps - decay_steps
  assert rate(start) == pytest.approx(1e-2)
  assert rate(start + 1) == pytest.approx(1e-2 * (1 - (1 / decay_steps) ** 0.5))


def test_wsd_decay_over_all_the_steps_starts_when_the_warmup_ends():
  rate = _wsd(total_steps=20, fraction=1.0)  # No stable phase: 18 steps of decay.
  assert rate(2) == pytest.approx(1e-2)
  assert rate(11) == pytest.approx(1e-2 * (1 - 0.5 ** 0.5))


def test_a_resume_keeps_the_saved_schedule_unless_asked_and_says_which():
  said = []
  assert optim.plan_schedule(30, saved_steps=20, replan=False, log=said.append) == 20
  assert 'Continuing the checkpoint\'s learning-rate schedule over 20 steps' in said[-1]
  assert 'replan_schedule=True' in said[-1] and 'learning rate 0' in said[-1]
  assert optim.plan_schedule(30, saved_steps=20, replan=True, log=said.append) == 30
  assert said[-1].startswith('Re-planning the learning-rate schedule over 30 steps')
  assert optim.plan_schedule(30, saved_steps=None, replan=False, log=said.append) == 30
  assert optim.plan_schedule(20, saved_steps=20, replan=True, log=said.append) == 20
  assert len(said) == 2  # Nothing to say for a fresh run or an unchanged length.
