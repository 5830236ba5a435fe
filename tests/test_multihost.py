"""Several hosts act as one: they stop together, restore the same checkpoint (a run with new
words and early stopping too), resume on another layout (elastic resume) where the interrupted run
would have gone, and end together when one of them fails alone.

Several hosts are run_train.py processes on 127.0.0.1 joined by `jax.distributed` (gloo);
several devices are CPU devices. Dropout is on, so its draws must not depend on the layout.
"""

import shutil
import signal
import time

import jax
import numpy as np
import pytest

from mlm_jax import checkpoint
from mlm_jax import infer
from mlm_jax import metric_writers
from tests.multidevice import LAYOUT_FLAGS, assert_same_training, finish, hosts_flags
from tests.multidevice import hosts_model, start_hosts


def _interrupted_copy(straight, target):
  """`straight` as a preemption after step 3 would leave it: the export gone and the step-6
  checkpoint half written (its files truncated, a corrupt checkpoint)."""
  shutil.copytree(straight, target)
  shutil.rmtree(target / 'export')
  for path in (target / 'checkpoints' / '6' / 'state').rglob('*'):
    if path.is_file() and path.stat().st_size > 64:
      with open(path, 'r+b') as f:
        f.truncate(path.stat().st_size // 2)
  return target


@pytest.fixture(scope='module')
def two_hosts_resume_an_eight_device_checkpoint(layout_runs, tmp_path_factory):
  """Elastic resume: 2 processes x 1 device (4 rows each, the same global batch) resume the
  one-process 8-device run, whose latest checkpoint is corrupt, as a preempted slice that
  comes back smaller does."""
  workdir = _interrupted_copy(layout_runs['replicated'],
                              tmp_path_factory.mktemp('hosts') / 'run')
  processes = start_hosts([*LAYOUT_FLAGS, '--config.per_device_batch_size=4',
                           f'--workdir={workdir}'], devices=1)
  outputs = finish(processes)
  for p, (_, stderr) in zip(processes, outputs):
    assert p.returncode == 0, stderr[-3000:]
  return workdir, outputs


def test_two_hosts_on_two_devices_resume_an_eight_device_checkpoint(
    layout_runs, two_hosts_resume_an_eight_device_checkpoint):
  workdir, outputs = two_hosts_resume_an_eight_device_checkpoint
  assert 'Resuming from the checkpoint at step 3' in outputs[0][0]
  assert '2 device(s)' in outputs[0][0]
  assert_same_training(workdir, layout_runs['replicated'])


def test_hosts_set_a_corrupt_checkpoint_aside_once_and_restore_the_same_step(
    two_hosts_resume_an_eight_device_checkpoint):
  workdir, _ = two_hosts_resume_an_eight_device_checkpoint
  assert len(list((workdir / 'unrestorable_checkpoints').iterdir())) == 1
  steps = [r['step'] for r in metric_writers.read_metrics(str(workdir)) if 'loss' in r]
  assert steps == sorted(set(steps)) and steps[-1] == 6


@pytest.fixture(scope='module')
def sigterm_to_one_host(two_host_run, tmp_path_factory):
  """2 hosts (`two_host_run`'s flags: new words, an evaluation every 2 steps, early stopping,
  a checkpoint only when stopped, at a new best and at the end), SIGTERM to process 1 only
  once training is under way (step 2, the first evaluation's, logged); then the rerun.

  Returns (workdir, [(status, stderr)] of the stopped hosts).
  """
  workdir = tmp_path_factory.mktemp('sigterm') / 'run'
  processes = start_hosts([*two_host_run['flags'], f'--workdir={workdir}'])
  try:
    deadline = time.time() + 240
    while not any(r['step'] >= 2 for r in metric_writers.read_metrics(str(workdir))):
      assert time.time() < deadline and all(p.poll() is None for p in processes)
      time.sleep(0.05)
    processes[1].send_signal(signal.SIGTERM)
  finally:
    outputs = finish(processes, timeout=120)
  stopped = [(p.returncode, stderr) for p, (_, stderr) in zip(processes, outputs)]
  rerun = start_hosts([*two_host_run['flags'], f'--workdir={workdir}'])
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
                                                                      two_host_run):
  """The same 2 hosts never interrupted (conftest's `two_host_run`, the same flags): the same
  reduction order, so equal leaf by leaf, the attention key biases too (another layout differs
  by float32 rounding, which Adam amplifies in those biases, whose true gradient is zero).
  The rerun takes up the saved tokenizer's words (each host: process 1 reads it too) and stops
  early at the uninterrupted run's step. (The signal lands before the best evaluation, where a
  lost count changes nothing: test_reliability.py and test_early_stopping.py show on one host
  that the count survives.)"""
  workdir, _ = sigterm_to_one_host
  steps = [r['step'] for r in metric_writers.read_metrics(str(workdir))]
  assert max(steps) == two_host_run['summary']['steps']
  for a, b in zip(*(jax.tree_util.tree_leaves(infer.load_predictor(str(w)).params)
                    for w in (workdir, two_host_run['hosts']))):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)


@pytest.mark.slow  # About 70 s, mostly the shutdown timeout: `python -m pytest -m slow`.
def test_a_host_that_fails_alone_in_the_step_loop_ends_every_host_within_the_shutdown_timeout(
    tmp_path):
  """Process 0 fails opening its metrics file (a folder here) while process 1 goes on into
  the first step's collective, which never completes. The shutdown barrier process 0
  waits at times out after `cli.SHUTDOWN_TIMEOUT_S` (60 s; JAX's default of 300 s left both
  hosts there for over 5 minutes), and JAX's coordination service then ends both."""
  (tmp_path / 'run' / 'metrics.jsonl').mkdir(parents=True)
  # One device per host: the step's collectives then use the gloo context that the hosts'
  # earlier agreements set up. (With two, setting up a new one times out after 30 s and ends
  # process 1 with an error of its own, whatever the shutdown timeout.)
  flags = hosts_flags(hosts_model(str(tmp_path / 'model')))
  processes = start_hosts([*flags, f'--workdir={tmp_path / "run"}'], devices=1)
  outputs = finish(processes, timeout=200)  # Raises TimeoutExpired where the hosts hang on.
  assert all(p.returncode != 0 for p in processes)
  assert 'metrics.jsonl' in outputs[0][1]  # Process 0 reported its own failure first.
