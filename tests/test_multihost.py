"""Several hosts act as one: they stop together, restore the same checkpoint, and resume on
another layout (elastic resume) where the interrupted run would have gone.

Several hosts are run_train.py processes on 127.0.0.1 joined by `jax.distributed` (gloo);
several devices are CPU devices. Dropout is on, so its draws must not depend on the layout.
"""

import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mlm_jax import checkpoint
from mlm_jax import infer
from mlm_jax import metric_writers
from tests.conftest import ROOT
from tests.multidevice import cluster_env, finish, start_hosts

_MODEL = ['--config=configs/tiny_test.py', '--config.split=train[:40]',
          '--config.model_config.hidden_size=64', '--config.model_config.hidden_dropout_prob=0.1']
# 6 steps of 8 rows with checkpoints at 3 and 6; `per_device_batch_size` keeps the 8 rows.
_SHORT = [*_MODEL, '--config.num_train_steps=6', '--config.eval_every_steps=6',
          '--config.checkpoint_every_steps=3']
# Long enough that a signal lands mid-run; a checkpoint only when stopped and at the end.
_LONG = [*_MODEL, '--config.num_train_steps=60', '--config.eval_every_steps=60',
         '--config.checkpoint_every_steps=1000', '--config.log_every_steps=1',
         '--config.per_device_batch_size=2']


def _train_one_process(devices: int, *flags) -> None:
  result = subprocess.run([sys.executable, 'run_train.py', *flags], cwd=ROOT,
                          env=cluster_env(devices), capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]


def _params(workdir) -> list[np.ndarray]:
  return jax.tree_util.tree_leaves(infer.load_predictor(str(workdir)).params)


def _assert_same_params(workdir_a, workdir_b, atol: float) -> None:
  for a, b in zip(_params(workdir_a), _params(workdir_b)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=atol)


def _interrupted_copy(straight, target, corrupt_latest: bool = False):
  """`straight` as it was at step 3: checkpoint 6 and the export gone (or checkpoint 6
  truncated, a corrupt file, if `corrupt_latest`)."""
  shutil.copytree(straight, target)
  shutil.rmtree(target / 'export')
  latest = target / 'checkpoints' / '6'
  if not corrupt_latest:
    shutil.rmtree(latest)
    return target
  for path in (latest / 'state').rglob('*'):
    if path.is_file() and path.stat().st_size > 64:
      with open(path, 'r+b') as f:
        f.truncate(path.stat().st_size // 2)
  return target


@pytest.fixture(scope='module')
def eight_device_run(tmp_path_factory):
  """One process with 8 devices (1 row each), uninterrupted; checkpoints at 3 and 6."""
  workdir = tmp_path_factory.mktemp('eight_devices')
  _train_one_process(8, *_SHORT, '--config.per_device_batch_size=1', f'--workdir={workdir}')
  return workdir


def test_an_eight_device_checkpoint_resumes_on_two_devices(eight_device_run, tmp_path):
  """Same global batch (2 devices x 4 rows): a preempted slice coming back smaller."""
  workdir = _interrupted_copy(eight_device_run, tmp_path / 'run')
  _train_one_process(2, *_SHORT, '--config.per_device_batch_size=4', f'--workdir={workdir}')
  # atol: Adam turns float32 rounding differences of the other reduction order into ~1e-4.
  _assert_same_params(workdir, eight_device_run, atol=4e-4)


@pytest.fixture(scope='module')
def two_hosts_resume_with_a_corrupt_latest(eight_device_run, tmp_path_factory):
  """2 processes x 2 devices resume the one-process run, whose latest checkpoint is corrupt."""
  workdir = _interrupted_copy(eight_device_run, tmp_path_factory.mktemp('hosts') / 'run',
                              corrupt_latest=True)
  processes = start_hosts([*_SHORT, '--config.per_device_batch_size=2', f'--workdir={workdir}'])
  outputs = finish(processes)
  for p, (_, stderr) in zip(processes, outputs):
    assert p.returncode == 0, stderr[-3000:]
  return workdir, outputs


def test_two_hosts_resume_a_one_process_checkpoint(eight_device_run,
                                                   two_hosts_resume_with_a_corrupt_latest):
  workdir, outputs = two_hosts_resume_with_a_corrupt_latest
  assert 'Resuming from the checkpoint at step 3' in outputs[0][0]
  _assert_same_params(workdir, eight_device_run, atol=4e-4)


def test_hosts_set_a_corrupt_checkpoint_aside_once_and_restore_the_same_step(
    two_hosts_resume_with_a_corrupt_latest):
  workdir, _ = two_hosts_resume_with_a_corrupt_latest
  assert len(list((workdir / 'unrestorable_checkpoints').iterdir())) == 1
  steps = [r['step'] for r in metric_writers.read_metrics(str(workdir)) if 'loss' in r]
  assert steps == sorted(set(steps)) and steps[-1] == 6


@pytest.fixture(scope='module')
def sigterm_to_one_host(tmp_path_factory):
  """2 hosts, SIGTERM to process 1 only once training is under way; then the rerun.

  Returns (workdir, [(status, stderr)] of the stopped hosts).
  """
  workdir = tmp_path_factory.mktemp('sigterm') / 'run'
  processes = start_hosts([*_LONG, f'--workdir={workdir}'])
  try:
    deadline = time.time() + 240
    while not any(r['step'] >= 3 for r in metric_writers.read_metrics(str(workdir))):
      assert time.time() < deadline and all(p.poll() is None for p in processes)
      time.sleep(0.05)
    processes[1].send_signal(signal.SIGTERM)
  finally:
    outputs = finish(processes, timeout=120)
  stopped = [(p.returncode, stderr) for p, (_, stderr) in zip(processes, outputs)]
  rerun = start_hosts([*_LONG, f'--workdir={workdir}'])
  for p, (_, stderr) in zip(rerun, finish(rerun)):
    assert p.returncode == 0, stderr[-3000:]
  return workdir, stopped


def _stopped_at(stderr: str) -> int:
  last = stderr.strip().splitlines()[-1]
  assert 'stopped by SIGTERM at step' in last, last
  return int(last.split(' at step ')[1].split()[0])


def test_sigterm_to_one_host_stops_every_host_at_the_same_step(sigterm_to_one_host):
  workdir, stopped = sigterm_to_one_host
  assert [status for status, _ in stopped] == [128 + signal.SIGTERM] * 2
  steps = {_stopped_at(stderr) for _, stderr in stopped}
  assert len(steps) == 1
  saved = checkpoint.make_manager(str(workdir), keep=None, create=False).all_steps()
  assert steps.pop() in saved


def test_hosts_stopped_by_sigterm_resume_to_the_uninterrupted_result(sigterm_to_one_host,
                                                                      tmp_path):
  """The same 2 hosts never interrupted: the same reduction order, so equal leaf by leaf
  (another layout differs by float32 rounding, which Adam amplifies over 60 steps in the
  attention key biases, whose true gradient is zero)."""
  workdir, _ = sigterm_to_one_host
  straight = start_hosts([*_LONG, f'--workdir={tmp_path}'])
  for p, (_, stderr) in zip(straight, finish(straight)):
    assert p.returncode == 0, stderr[-3000:]
  _assert_same_params(workdir, tmp_path, atol=1e-7)
