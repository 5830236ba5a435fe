"""Config validation (`mlm_jax.validation`, `cli.check_config_overrides`): every value and
every key is checked before any data is read or model built, as one line naming the key
and the fix."""

import os
import subprocess
import sys

import pytest

from mlm_jax import checkpoint
from mlm_jax import train
from mlm_jax import validation
from mlm_jax.errors import UserError
from tests.conftest import ROOT, load_config


@pytest.mark.parametrize('key, value, says', [
    ('lr_schedule', 'cos', 'one of linear, cosine'),
    ('warmup_steps', -1, 'must not be negative'),
    ('weight_decay', -0.01, 'must not be negative'),
    ('max_grad_norm', 0.0, 'must be positive'),
    ('learning_rate', 0.0, 'must be positive'),
    ('test_size', 0.0, 'must be a fraction in (0, 1) or a whole count'),
    ('test_size', 2.5, 'must be a fraction in (0, 1) or a whole count'),
    ('max_eval_blocks', -1, 'must not be negative'),
    ('tokenizer_train_max_texts', 0, 'must be at least 1'),
    ('mlm_probability', 1.0, 'must be in (0, 1)'),
    ('block_size', 0, 'must be at least 1'),
    ('tokenizer_vocab_size', 0, 'must be at least 1'),
    ('dtype', 'float16', 'one of float32, bfloat16'),
    ('attention_impl', 'flash', 'one of auto, xla, blocked, cudnn, splash'),
    ('attention_impl', 'cudnn',
     'needs a GPU (this backend: cpu); set --config.attention_impl to one of auto, xla, blocked'),
    ('attention_impl', 'splash', 'needs a TPU (this backend: cpu)'),
    ('remat_policy', 'everything', 'one of none, full, minimal, dots'),
    ('num_train_steps', -2, 'or -1 to train for num_epochs'),
    ('wsd_decay_fraction', 0.0, 'must be in (0, 1]'),
    ('wsd_decay_fraction', 1.5, 'must be in (0, 1]'),
    ('wsd_decay', 'sqrt', 'one of 1-sqrt, linear'),
    ('attention_scope', 'doc', 'one of block, document'),
])
def test_a_bad_value_names_its_key_and_the_fix(key, value, says):
  config = load_config('tiny_test')
  config[key] = value
  with pytest.raises(UserError) as error:
    validation.validate_config(config)
  message = str(error.value)
  assert message.startswith(f'{key}=') and says in message
  assert f'--config.{key}' in message or key == 'num_train_steps'


def test_the_default_and_shipped_configs_are_valid():
  for name in ('default', 'tiny_test', 'eli5_distilroberta'):
    validation.validate_config(load_config(name))


# Config keys added after checkpoints were first written (each release adds its own).
_ADDED_SINCE_FIRST_RELEASE = ('wsd_decay_fraction', 'wsd_decay', 'attention_scope',
                              'keep_best_by', 'add_tokens', 'add_tokens_file',
                              'new_token_init', 'pad_vocab_to_multiple_of', 'mixture')


def test_a_checkpoint_without_the_added_keys_compares_against_their_defaults():
  """A checkpoint made before a key existed resumes under the key's default only."""
  default = load_config('default').to_dict()
  assert checkpoint.ADDED_KEYS == {key: default[key] for key in _ADDED_SINCE_FIRST_RELEASE}
  current = load_config('tiny_test').to_dict()
  older = {k: v for k, v in current.items() if k not in _ADDED_SINCE_FIRST_RELEASE}
  assert checkpoint.config_differences(older, current) == []
  current['attention_scope'] = 'document'
  assert checkpoint.config_differences(older, current) == [
      "attention_scope: 'block' -> 'document'"]


def test_a_resume_may_lower_the_memory_a_step_needs_but_not_the_batch():
  """What the out-of-memory line advises is resumable: the same global batch in smaller
  micro-batches, a remat policy, a smaller eval batch; another global batch is not."""
  saved = load_config('tiny_test').to_dict() | {'global_batch_size': 32}
  saved.update(per_device_batch_size=32, grad_accum_steps=1)
  lower = saved | dict(per_device_batch_size=8, grad_accum_steps=4, remat_policy='full',
                       eval_batch_size=1)
  assert checkpoint.config_differences(saved, lower) == []
  assert checkpoint.config_differences(saved, lower | {'global_batch_size': 8}) == [
      'global_batch_size: 32 -> 8']


def test_a_bad_value_fails_before_data_or_tokenizer(tmp_path):
  config = load_config('tiny_test')
  config.data_files = '/nonexistent/eli5.jsonl'  # Would be the error after loading began.
  config.lr_schedule = 'cos'
  with pytest.raises(UserError, match='^lr_schedule='):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()  # Not even the workdir was made.


def _run_train(*args):
  return subprocess.run([sys.executable, str(ROOT / 'run_train.py'), *args], cwd=ROOT,
                        env=dict(os.environ), capture_output=True, text=True, timeout=600,
                        check=False)


@pytest.mark.parametrize('flag, line', [
    ('--config.learning_rat=1e-4',
     'error: --config.learning_rat is not a config key; the closest are learning_rate '
     '(all keys: configs/default.py)'),
    ('--config.model_config.hiden_size=8',
     'error: --config.model_config.hiden_size is not a config key; the closest are '
     'model_config.hidden_size, model_config.num_hidden_layers, '
     'model_config.intermediate_size (all keys: configs/default.py)'),
])
def test_cli_names_a_misspelled_key_and_the_closest_valid_ones(tmp_path, flag, line):
  result = _run_train('--config=configs/tiny_test.py', f'--workdir={tmp_path}', flag)
  assert result.returncode == 2
  assert result.stderr.strip() == line


def test_cli_with_the_default_config_names_an_unknown_key(tmp_path):
  result = _run_train(f'--workdir={tmp_path}', '--config.nope=1')
  assert result.returncode == 2
  [line] = result.stderr.strip().splitlines()
  assert line.startswith('error: --config.nope is not a config key; the closest are ')


def test_cli_bad_value_is_one_line_before_any_work(tmp_path):
  result = _run_train('--config=configs/tiny_test.py', f'--workdir={tmp_path / "run"}',
                      '--config.warmup_steps=-5')
  assert result.returncode == 2
  assert result.stderr.strip() == ('error: warmup_steps=-5 must not be negative; '
                                   'set --config.warmup_steps')
  assert result.stdout == '' and not (tmp_path / 'run').exists()
