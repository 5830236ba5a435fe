"""Whole training runs of the tiny config through `train_and_evaluate` and `run_train.py`.

Guards what a run writes (checkpoints with their data cursor, schedule length and config;
the export; metrics with the interval's token-weighted means and the rate applied), that
training lowers the loss, exact resume after SIGKILL (compiling nothing the killed run had
compiled: `run_train.py` keeps JAX's programs in the package's cache folder), the PyTorch
export, fine-tuning from a local model (safetensors, or PyTorch .bin weights through torch),
and the closing hub upload's failure path.
Step-level numbers are in test_steps.py, the optimizer in test_optim.py.
"""

import importlib.metadata
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import transformers

from mlm_jax import checkpoint
from mlm_jax import infer
from mlm_jax import metric_writers
from mlm_jax import model as model_lib
from mlm_jax import plot
from mlm_jax import report
from mlm_jax import train
from mlm_jax.errors import UserError
from mlm_jax.data.tokenizer import train_bpe_tokenizer
from mlm_jax.models import FlaxAutoModelForMaskedLM
from tests.conftest import ROOT, load_config


@pytest.fixture
def trained(tiny_run):
  """The shared finished tiny run: (config, workdir, summary)."""
  return tiny_run


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


def test_logs_the_rate_each_interval_ends_with_warmup_then_linear_decay(trained):
  _, workdir, _ = trained
  rates = {r['step']: r['learning_rate'] for r in metric_writers.read_metrics(workdir)
           if 'loss' in r}
  # Update s applies schedule(s - 1): 1e-2 after 2 warmup steps, then down to 0 at step 20.
  expected = {5: 1e-2 * 16 / 18, 10: 1e-2 * 11 / 18, 15: 1e-2 * 6 / 18, 20: 1e-2 / 18}
  assert rates == pytest.approx(expected, rel=1e-5)


def test_run_writes_checkpoints_export_tensorboard_and_metrics(trained):
  config, workdir, _ = trained
  manager = checkpoint.make_manager(workdir, keep=None, create=False)
  assert manager.latest_step() == config.num_train_steps
  assert len(manager.all_steps()) <= config.keep_checkpoints
  assert os.path.isfile(os.path.join(workdir, 'export', 'model.safetensors'))
  assert os.path.isfile(os.path.join(workdir, 'export', 'tokenizer.json'))
  assert os.listdir(os.path.join(workdir, 'tensorboard'))


def test_checkpoint_holds_data_cursor_schedule_and_config(trained):
  config, workdir, _ = trained
  manager = checkpoint.make_manager(workdir, keep=None, create=False)
  for step in (10, 20):  # 1,099 train blocks make 137 batches of 8 an epoch.
    cursor, saved_config = checkpoint.read_metadata(manager, step)
    best = cursor.pop('early_stopping')  # The eval loss falls at each evaluation.
    assert best == {'best_step': step, 'best_loss': pytest.approx(best['best_loss']),
                    'evals_since_best': 0}
    assert cursor == {'epoch': 0, 'batch': step, 'schedule_steps': 20}
    assert saved_config == {**config.to_dict(), 'global_batch_size': 8}


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
  exported = FlaxAutoModelForMaskedLM.from_pretrained(os.path.join(workdir, 'export'))
  ids = np.asarray(from_checkpoint.tokenizer(['Why is the sky blue?'])['input_ids'])
  expected = from_checkpoint.model(ids, params=from_checkpoint.params).logits
  np.testing.assert_allclose(exported(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_export_loads_in_pytorch_with_the_same_logits(trained):
  torch = pytest.importorskip('torch')
  _, workdir, _ = trained
  export = os.path.join(workdir, 'export')
  flax_model = FlaxAutoModelForMaskedLM.from_pretrained(export)
  torch_model, loading = transformers.AutoModelForMaskedLM.from_pretrained(
      export, output_loading_info=True)
  assert not loading['missing_keys'] and not loading['unexpected_keys'], loading
  torch_model.eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(export)
  ids = tokenizer(['Why is the sky blue?'])['input_ids']
  with torch.no_grad():
    torch_logits = torch_model(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(torch_logits, flax_model(np.asarray(ids)).logits,
                             rtol=1e-4, atol=1e-4)


def _run_train_cli(*args, timeout=900, env=None):
  env = env or dict(os.environ, PYTHONUNBUFFERED='1')
  return subprocess.run([sys.executable, str(ROOT / 'run_train.py'), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)


def test_cli_reports_a_missing_data_file_in_one_line(tmp_path):
  result = _run_train_cli('--config=configs/tiny_test.py', f'--workdir={tmp_path}',
                          '--config.data_files=/nonexistent/eli5.jsonl')
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: data file') and 'nonexistent' in last
  assert 'Traceback' not in result.stderr


def _final_params(workdir):
  return jax.tree_util.tree_leaves(infer.load_predictor(workdir).params)


@pytest.fixture(scope='module')
def killed_and_resumed(tmp_path_factory):
  """The tiny run logging every step, SIGKILLed after its first checkpoint and run again
  with the same command: (workdir, the step it resumed from, the second run's stdout, the
  compiled programs in the package's cache folder after the first run and after the second).

  Saving every 2 steps and logging every step change when state is written and metrics
  logged, not what is trained. Both runs keep their programs where run_train.py puts them
  by default, `$MLM_JAX_CACHE/jax` (in the tests' cache folder, emptied first: nothing else
  writes there, as the tests' own JAX_COMPILATION_CACHE_DIR, unset here, wins elsewhere).
  """
  workdir = tmp_path_factory.mktemp('killed')
  common = ['--config=configs/tiny_test.py', '--config.checkpoint_every_steps=2',
            '--config.log_every_steps=1', f'--workdir={workdir}']
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  env['PYTHONUNBUFFERED'] = '1'
  programs_dir = pathlib.Path(env['MLM_JAX_CACHE']) / 'jax'
  shutil.rmtree(programs_dir, ignore_errors=True)
  programs = lambda: sorted(p.name for p in programs_dir.glob('*'))
  killed = subprocess.Popen([sys.executable, str(ROOT / 'run_train.py'), *common], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 900  # A hang guard: a loaded machine may take minutes.
    while not (workdir / 'checkpoints' / '2').exists() and killed.poll() is None:
      assert time.time() < deadline, 'the run wrote no checkpoint (hung?)'
      time.sleep(0.02)
    killed.kill()
  finally:
    killed.wait(timeout=60)
  killed_at = checkpoint.make_manager(str(workdir), keep=None, create=False).latest_step()
  assert killed_at is not None and killed_at < 20
  compiled_by_the_first = programs()
  result = _run_train_cli(*common, env=env)
  assert result.returncode == 0, result.stderr[-2000:]
  return str(workdir), killed_at, result.stdout, (compiled_by_the_first, programs())


def test_run_killed_mid_training_resumes_to_the_same_parameters(trained, killed_and_resumed):
  _, straight, _ = trained
  resumed, killed_at, stdout, _ = killed_and_resumed
  assert f'Resuming from the checkpoint at step {killed_at}' in stdout
  for a, b in zip(_final_params(resumed), _final_params(straight)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  straight_evals = [r for r in metric_writers.read_metrics(straight) if 'eval_loss' in r]
  resumed_evals = [r for r in metric_writers.read_metrics(resumed) if 'eval_loss' in r]
  np.testing.assert_allclose(resumed_evals[-1]['eval_loss'], straight_evals[-1]['eval_loss'],
                             rtol=1e-5)


def test_train_metrics_are_the_intervals_means_over_its_tokens(trained, killed_and_resumed):
  """The run logging every 5 steps logs the token-weighted mean of the 5 steps' losses that
  the run logging every step logged one by one (the same steps: exact resume)."""
  _, straight, _ = trained
  per_step = {r['step']: r for r in metric_writers.read_metrics(killed_and_resumed[0])
              if 'loss' in r}  # The resumed run's records replace the killed run's.
  for record in (r for r in metric_writers.read_metrics(straight) if 'loss' in r):
    steps = [per_step[s] for s in range(record['step'] - 4, record['step'] + 1)]
    tokens = [s['masked_tokens'] - s['dropped_masked_tokens'] for s in steps]
    assert record['masked_tokens'] == sum(s['masked_tokens'] for s in steps)
    assert record['loss'] == pytest.approx(
        sum(s['loss'] * n for s, n in zip(steps, tokens)) / sum(tokens), rel=1e-5)
    assert record['accuracy'] == pytest.approx(
        sum(s['accuracy'] * n for s, n in zip(steps, tokens)) / sum(tokens), rel=1e-5)
    assert record['learning_rate'] == pytest.approx(steps[-1]['learning_rate'], rel=1e-6)


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


def test_loads_pytorch_only_weights_through_torch(tmp_path):
  torch = pytest.importorskip('torch')
  torch_dir = tmp_path / 'torch_only'
  config = transformers.RobertaConfig(vocab_size=300, hidden_size=8, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=16)
  torch_model = transformers.AutoModelForMaskedLM.from_config(config)
  torch_model.save_pretrained(torch_dir)  # transformers 5 writes safetensors: keep a .bin only.
  os.remove(torch_dir / 'model.safetensors')
  torch.save(torch_model.state_dict(), torch_dir / 'pytorch_model.bin')
  run_config = load_config('tiny_test')
  run_config.model_name_or_path = str(torch_dir)
  tokenizer = train_bpe_tokenizer(['a b c d e f g'] * 10, vocab_size=40, model_max_length=64)
  model = model_lib.create_model(run_config, tokenizer)
  np.testing.assert_array_equal(
      model.params['roberta']['embeddings']['word_embeddings']['embedding'],
      torch_model.roberta.embeddings.word_embeddings.weight.detach().numpy())
  del torch


def test_push_to_hub_failure_is_one_line_and_keeps_the_export(trained, capsys):
  _, workdir, _ = trained
  export = os.path.join(workdir, 'export')
  before = sorted(os.listdir(export))
  report.push_to_hub(export, 'someone/tiny-mlm')  # HF_HUB_OFFLINE=1: the upload cannot happen.
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('push_to_hub failed')
  assert f'the export is saved in {export}' in lines[0]
  assert sorted(os.listdir(export)) == before


def test_push_to_hub_failure_names_a_command_the_installed_hub_library_provides(trained, capsys):
  """The upload it suggests is a console script of the installed huggingface_hub (its 1.0
  removed `huggingface-cli`), given the repo id and the export folder."""
  _, workdir, _ = trained
  export = os.path.join(workdir, 'export')
  report.push_to_hub(export, 'someone/tiny-mlm')
  command = re.findall(r'`([^`]+)`', capsys.readouterr().out)[-1].split()  # The line's last.
  scripts = {e.name for e in importlib.metadata.distribution('huggingface_hub').entry_points
             if e.group == 'console_scripts'}
  assert command[0] in scripts
  assert command[-2:] == ['someone/tiny-mlm', export]


def test_plot_writes_curves_png(trained):
  _, workdir, _ = trained
  path = plot.plot_curves(workdir)
  assert path == os.path.join(workdir, 'curves.png')
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_resumed_run_compiles_nothing_the_killed_run_did_not(killed_and_resumed):
  """run_train.py keeps JAX's compiled programs in the package's cache folder, so a run
  resumed after a preemption (or any rerun) reads them back instead of compiling."""
  compiled_by_the_first, after_the_second = killed_and_resumed[3]
  assert compiled_by_the_first
  assert after_the_second == compiled_by_the_first
