"""The optimizer (`mlm_jax.optim`): which parameters get weight decay, and the schedule.

The decay mask is checked against explicit lists of parameter paths of the models this
package trains (RoBERTa, BERT, DistilBERT, ALBERT), not against
a copy of its own rule; the schedule at chosen steps; a resumed run's schedule length.
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
