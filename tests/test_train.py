"""Training, evaluation, checkpoints and export, on the tiny config with real libraries."""

import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import traverse_util

from mlm_jax import checkpoint
from mlm_jax import infer
from mlm_jax import masking
from mlm_jax import metric_writers
from mlm_jax import model as model_lib
from mlm_jax import optim
from mlm_jax import plot
from mlm_jax import report
from mlm_jax import run as run_lib
from mlm_jax import sharding
from mlm_jax import steps as steps_lib
from mlm_jax import train
from mlm_jax.errors import UserError
from mlm_jax.tokenizer import train_bpe_tokenizer
from tests.conftest import ROOT, load_config


@pytest.fixture
def trained(tiny_run):
  """The shared finished tiny run: (config, workdir, summary)."""
  return tiny_run


def _tiny_run(config):
  """The prepared data, tokenizer and model of `config`, in a fresh workdir."""
  import tempfile  # pylint: disable=import-outside-toplevel
  return run_lib.prepare(config, tempfile.mkdtemp())


def test_training_lowers_train_loss_and_perplexity(trained):
  _, workdir, summary = trained
  records = metric_writers.read_metrics(workdir)
  train_losses = [r['loss'] for r in records if 'loss' in r]
  assert train_losses[-1] < train_losses[0]
  assert summary['perplexity_after'] < summary['perplexity_before']


def test_evaluates_at_step_zero_every_eval_steps_and_at_the_end(trained):
  config, workdir, _ = trained
  eval_steps = [r['step'] for r in metric_writers.read_metrics(workdir) if 'eval_perplexity' in r]
  assert eval_steps == [0, config.eval_every_steps, config.num_train_steps]


def test_logs_learning_rate_following_warmup(trained):
  config, workdir, _ = trained
  rates = {r['step']: r['learning_rate'] for r in metric_writers.read_metrics(workdir) if 'loss' in r}
  # The rate logged at step s is the one used by update s (schedule(s - 1)).
  assert rates[config.num_train_steps] < rates[config.log_every_steps]
  assert max(rates.values()) <= config.learning_rate


def test_run_writes_checkpoints_export_tensorboard_and_metrics(trained):
  config, workdir, _ = trained
  manager = checkpoint.make_manager(workdir, keep=None, create=False)
  assert manager.latest_step() == config.num_train_steps
  assert len(manager.all_steps()) <= config.keep_checkpoints
  assert os.path.isfile(os.path.join(workdir, 'export', 'flax_model.msgpack'))
  assert os.path.isfile(os.path.join(workdir, 'export', 'tokenizer.json'))
  assert os.listdir(os.path.join(workdir, 'tensorboard'))


def test_checkpoint_holds_data_position_and_config(trained):
  config, workdir, _ = trained
  manager = checkpoint.make_manager(workdir, keep=None, create=False)
  step = manager.latest_step()
  position, saved_config = checkpoint.read_metadata(manager, step)
  assert saved_config['block_size'] == config.block_size
  assert set(position) == {'epoch', 'batch'}


def test_second_run_in_a_finished_workdir_does_not_train(trained):
  config, workdir, _ = trained
  summary = train.train_and_evaluate(config, workdir)
  assert summary['steps_this_run'] == 0


def test_resume_with_a_changed_model_is_refused(trained):
  config, workdir, _ = trained
  changed = load_config('tiny_test')
  changed.block_size = 16
  with pytest.raises(UserError, match='block_size: 32 -> 16'):
    train.train_and_evaluate(changed, workdir)


def test_export_reloads_with_the_checkpoints_logits(trained):
  _, workdir, _ = trained
  from_checkpoint = infer.load_predictor(workdir)
  exported = transformers.FlaxAutoModelForMaskedLM.from_pretrained(
      os.path.join(workdir, 'export'))
  ids = np.asarray(from_checkpoint.tokenizer(['Why is the sky blue?'])['input_ids'])
  expected = from_checkpoint.model(ids, params=from_checkpoint.params).logits
  np.testing.assert_allclose(exported(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_export_loads_in_pytorch_with_the_same_logits(trained):
  torch = pytest.importorskip('torch')
  _, workdir, _ = trained
  export = os.path.join(workdir, 'export')
  flax_model = transformers.FlaxAutoModelForMaskedLM.from_pretrained(export)
  # The export carries PyTorch weights when torch is installed (see export.export).
  torch_model = transformers.AutoModelForMaskedLM.from_pretrained(export).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(export)
  ids = tokenizer(['Why is the sky blue?'])['input_ids']
  with torch.no_grad():
    torch_logits = torch_model(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(torch_logits, flax_model(np.asarray(ids)).logits,
                             rtol=1e-4, atol=1e-4)


def test_weight_decay_mask_excludes_exactly_biases_and_layernorm_scales():
  model = transformers.FlaxAutoModelForMaskedLM.from_config(
      transformers.RobertaConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=16))
  mask = traverse_util.flatten_dict(optim.decay_mask(model.params))
  for path, decayed in mask.items():
    no_decay = path[-1] == 'bias' or path[-2:] == ('LayerNorm', 'scale')
    assert decayed == (not no_decay), path
  assert any(mask.values()) and not all(mask.values())


def _fresh_state_and_steps(config, run):
  """A fresh train state and the compiled steps for `run`."""
  mesh = sharding.make_mesh()
  tx, schedule = optim.make_optimizer(config, total_steps=10)
  state, _ = steps_lib.init_train_state(run.model, tx, config.seed, mesh)
  spec = masking.masking_spec(run.tokenizer, config.mlm_probability)
  steps = steps_lib.compile_steps(run.model.__call__, tx, schedule, spec, config.seed, mesh)
  return state, steps


def test_gradient_accumulation_equals_one_batch_k_times_larger():
  config = load_config('tiny_test')
  run = _tiny_run(config)
  blocks = jnp.asarray(run.blocks.train[:8], jnp.int32)
  state, steps = _fresh_state_and_steps(config, run)
  big, big_metrics = steps.train(state, blocks.reshape(1, 8, -1))
  state, steps = _fresh_state_and_steps(config, run)
  accumulated, acc_metrics = steps.train(state, blocks.reshape(4, 2, -1))
  np.testing.assert_allclose(acc_metrics['loss'], big_metrics['loss'], rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(accumulated.params),
                  jax.tree_util.tree_leaves(big.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_non_finite_loss_skips_the_update_and_is_counted():
  config = load_config('tiny_test')
  run = _tiny_run(config)
  state, steps = _fresh_state_and_steps(config, run)
  nan_params = jax.tree_util.tree_map(lambda x: x * jnp.nan, state.params)
  state = state.replace(params=nan_params)
  ids = jnp.asarray(run.blocks.train[:8], jnp.int32)[None]
  new_state, step_metrics = steps.train(state, ids)
  assert int(step_metrics['nonfinite']) == 1 and int(new_state.step) == 1
  assert int(new_state.opt_state[1][0].count) == 0  # Adam's moments were not updated.


def _uniform_logits(ids, params, train):  # pylint: disable=redefined-outer-name
  """A 'model' whose logits are `params['vocab']` everywhere: all zero, a uniform prediction."""
  del train

  class Output:
    logits = jnp.broadcast_to(params['vocab'], ids.shape + params['vocab'].shape)
  return Output()


def _evaluate_uniform_model(batch_size: int, vocab: int = 37) -> dict:
  """Eval metrics of the uniform model on 10 fixed random blocks."""
  spec = masking.MaskingSpec(mask_token_id=4, special_ids=(0, 1, 2, 3, 4), vocab_size=vocab)
  blocks = np.random.default_rng(0).integers(5, vocab, (10, 16)).astype(np.int32)
  tx, schedule = optim.make_optimizer(load_config('tiny_test'), 10)
  steps = steps_lib.compile_steps(_uniform_logits, tx, schedule, spec, seed=0,
                              mesh=sharding.make_mesh())
  return steps_lib.evaluate(steps, {'vocab': jnp.zeros(vocab)}, blocks, batch_size)


@pytest.mark.parametrize('batch_size', [4, 7])
def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(batch_size):
  np.testing.assert_allclose(_evaluate_uniform_model(batch_size, vocab=37)['eval_perplexity'],
                             37, rtol=1e-5)


def test_eval_counts_every_block_once_whatever_the_batch_size():
  counts = {b: _evaluate_uniform_model(b)['eval_masked_tokens'] for b in (3, 4, 10, 16)}
  assert len(set(counts.values())) == 1
  assert 0 < counts[4] < 10 * 16


def test_eval_is_deterministic(trained):
  config, workdir, _ = trained
  predictor = infer.load_predictor(workdir)
  spec = masking.masking_spec(predictor.tokenizer, config.mlm_probability)
  tx, schedule = optim.make_optimizer(config, 10)
  steps = steps_lib.compile_steps(predictor.model.__call__, tx, schedule, spec, config.seed,
                              sharding.make_mesh())
  blocks = np.asarray(predictor.tokenizer(['Why is the sky blue? ' * 20])['input_ids'][0][:64],
                      np.int32).reshape(2, 32)
  first = steps_lib.evaluate(steps, predictor.params, blocks, 2)
  second = steps_lib.evaluate(steps, predictor.params, blocks, 2)
  assert first == second


def _run_train_cli(*args, timeout=240):
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  return subprocess.run([sys.executable, str(ROOT / 'run_train.py'), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)


def test_cli_rejects_an_unknown_config_key(tmp_path):
  result = _run_train_cli('--config=configs/tiny_test.py', f'--workdir={tmp_path}',
                          '--config.no_such_key=1')
  assert result.returncode != 0
  assert 'no_such_key' in result.stderr


def test_cli_reports_a_missing_data_file_in_one_line(tmp_path):
  result = _run_train_cli('--config=configs/tiny_test.py', f'--workdir={tmp_path}',
                          '--config.data_files=/nonexistent/eli5.jsonl')
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: data file') and 'nonexistent' in last
  assert 'Traceback' not in result.stderr


def _final_params(workdir):
  return jax.tree_util.tree_leaves(infer.load_predictor(workdir).params)


def test_run_killed_mid_training_resumes_to_the_same_parameters(trained, tmp_path):
  """SIGKILL after the first checkpoint, restart: same result as the uninterrupted tiny run.

  Saving every 2 steps changes when the state is written, not what is trained.
  """
  _, straight, _ = trained
  common = ['--config=configs/tiny_test.py', '--config.checkpoint_every_steps=2']
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  killed = subprocess.Popen([sys.executable, str(ROOT / 'run_train.py'), *common,
                             f'--workdir={tmp_path}'], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 180
    while not (tmp_path / 'checkpoints' / '2').exists() and killed.poll() is None:
      assert time.time() < deadline
      time.sleep(0.02)
    killed.kill()
  finally:
    killed.wait(timeout=60)
  killed_at = checkpoint.make_manager(str(tmp_path), keep=None, create=False).latest_step()
  assert killed_at is not None and killed_at < 20

  result = _run_train_cli(*common, f'--workdir={tmp_path}')
  assert result.returncode == 0, result.stderr[-2000:]
  assert f'Resuming from the checkpoint at step {killed_at}' in result.stdout
  for a, b in zip(_final_params(str(tmp_path)), _final_params(straight)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  straight_evals = [r for r in metric_writers.read_metrics(straight) if 'eval_loss' in r]
  resumed_evals = [r for r in metric_writers.read_metrics(str(tmp_path)) if 'eval_loss' in r]
  np.testing.assert_allclose(resumed_evals[-1]['eval_loss'], straight_evals[-1]['eval_loss'],
                             rtol=1e-5)


def test_fine_tunes_a_pretrained_model_from_a_local_directory(trained, tmp_path):
  """The hub-id code path (`from_pretrained` of model and tokenizer), through a local export."""
  _, workdir, _ = trained
  config = load_config('tiny_test')
  config.model_name_or_path = os.path.join(workdir, 'export')
  config.num_train_steps = 5
  summary = train.train_and_evaluate(config, str(tmp_path))
  pretrained = infer.load_predictor(config.model_name_or_path)
  assert len(infer.load_predictor(str(tmp_path)).tokenizer) == len(pretrained.tokenizer)
  # Starting from trained weights, step 0 is already far better than a fresh model's 398.
  assert summary['perplexity_before'] < 250


def test_loads_pytorch_only_weights_with_from_pt(tmp_path):
  torch = pytest.importorskip('torch')
  del torch
  torch_dir = tmp_path / 'torch_only'
  config = transformers.RobertaConfig(vocab_size=300, hidden_size=8, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=16)
  transformers.AutoModelForMaskedLM.from_config(config).save_pretrained(torch_dir)
  run_config = load_config('tiny_test')
  run_config.model_name_or_path = str(torch_dir)
  tokenizer = train_bpe_tokenizer(['a b c d e f g'] * 10, vocab_size=40, model_max_length=64)
  model = model_lib.create_model(run_config, tokenizer)
  assert model.config.vocab_size == 300


def test_push_to_hub_failure_is_one_line_and_keeps_the_export(trained, capsys):
  _, workdir, _ = trained
  export = os.path.join(workdir, 'export')
  before = sorted(os.listdir(export))
  report.push_to_hub(export, 'someone/tiny-mlm')  # HF_HUB_OFFLINE=1: the upload cannot happen.
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('push_to_hub failed')
  assert f'the export is saved in {export}' in lines[0]
  assert sorted(os.listdir(export)) == before


def test_plot_writes_curves_png(trained):
  _, workdir, _ = trained
  path = plot.plot_curves(workdir)
  assert path == os.path.join(workdir, 'curves.png')
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def _one_step(config, run, impl: str, masked_head: bool):
  """(new state, metrics) of one train step from a fresh state with the given forward."""
  state, _ = _fresh_state_and_steps(config, run)
  tx, schedule = optim.make_optimizer(config, total_steps=10)
  apply_fn, head_fn = model_lib.forward_fns(run.model, impl)
  steps = steps_lib.compile_steps(
      apply_fn, tx, schedule, masking.masking_spec(run.tokenizer, 0.15), config.seed,
      sharding.make_mesh(), head_fn=head_fn if masked_head else None,
      max_predictions=model_lib.max_predictions(config.block_size, 0.15))
  return steps.train(state, jnp.asarray(run.blocks.train[:8], jnp.int32)[None])


def _assert_same_step(result, expected):
  (state, step_metrics), (expected_state, expected_metrics) = result, expected
  np.testing.assert_allclose(step_metrics['loss'], expected_metrics['loss'], rtol=1e-5)
  assert step_metrics['masked_tokens'] == expected_metrics['masked_tokens']
  for a, b in zip(jax.tree_util.tree_leaves(state.params),
                  jax.tree_util.tree_leaves(expected_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope='module')
def dropout_run():
  config = load_config('tiny_test')
  config.model_config.hidden_dropout_prob = 0.1  # The same dropout draws on every path.
  config.model_config.attention_probs_dropout_prob = 0.1
  return config, _tiny_run(config)


def test_masked_only_head_gives_the_full_heads_loss_and_update(dropout_run):
  config, run = dropout_run
  _assert_same_step(_one_step(config, run, 'transformers', masked_head=True),
                    _one_step(config, run, 'transformers', masked_head=False))


@pytest.mark.parametrize('masked_head', [False, True])
def test_fast_forward_gives_transformers_loss_and_update(dropout_run, masked_head):
  config, run = dropout_run
  _assert_same_step(_one_step(config, run, 'fast', masked_head),
                    _one_step(config, run, 'transformers', masked_head))
