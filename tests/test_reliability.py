"""Preemption, crashes and bad state: nothing saved is lost, and the run says what happened.

Guards SIGTERM/Ctrl-C (a checkpoint, then exit 128 + signal), a second signal, half-written
and corrupted checkpoints (skipped, named, set aside), resumes with another length (the
saved schedule kept unless re-planned, and said), refused config changes, non-finite
runs, an unwritable workdir, a bad config file and a full disk (one line on the command line),
and hosts left waiting on each other (a failed process 0, a collective reached from
different lines).
"""

import errno
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mlm_jax import checkpoint
from mlm_jax import cli
from mlm_jax import infer
from mlm_jax import metric_writers
from mlm_jax import train
from mlm_jax.errors import UserError
from tests import multidevice
from tests.conftest import ROOT, load_config

TINY = '--config=configs/tiny_test.py'


def _start(workdir, *args) -> subprocess.Popen:
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  return subprocess.Popen([sys.executable, str(ROOT / 'run_train.py'), TINY,
                           f'--workdir={workdir}', *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# Guards against a hang only: three runs starting side by side on a loaded 2-core machine
# took over the 180 s this once was (the suite's one flaky failure).
_HANG_S = 900


def _wait_until_training(workdir: pathlib.Path, process: subprocess.Popen, step: int = 5):
  """Polls metrics.jsonl until a train step at or past `step` is logged."""
  deadline = time.time() + _HANG_S
  while time.time() < deadline and process.poll() is None:
    logged = [r['step'] for r in metric_writers.read_metrics(str(workdir)) if 'loss' in r]
    if logged and logged[-1] >= step:
      return
    time.sleep(0.05)
  if process.poll() is not None:
    raise AssertionError(f'the run exited ({process.returncode}) before training: '
                         f'{process.stderr.read()[-2000:]}')
  raise AssertionError(f'the run did not train within {_HANG_S} s (hung?)')


def _latest_step(workdir) -> int | None:
  return checkpoint.make_manager(str(workdir), keep=None, create=False).latest_step()


_FOREVER = ['--config.num_train_steps=100000', '--config.log_every_steps=1',
            '--config.checkpoint_every_steps=100000', '--config.eval_every_steps=100000']
_SIGNALS = {'SIGTERM': [signal.SIGTERM], 'SIGINT': [signal.SIGINT],
            'SIGTERM+SIGINT': [signal.SIGTERM, signal.SIGINT]}


@pytest.fixture(scope='module')
def signalled_runs(tmp_path_factory) -> dict:
  """Runs interrupted by each entry of _SIGNALS once training is under way.

  The SIGTERM run goes first and alone: it compiles the steps into the persistent compilation
  cache (conftest.py), which the other two, started side by side once it has stopped, read
  instead of each compiling them at the same time (one core: 36 s -> 24-30 s).

  Returns {name: (workdir, exit status, stderr)}.
  """
  workdirs = {name: tmp_path_factory.mktemp(name.replace('+', '_')) for name in _SIGNALS}
  results = {}
  for batch in (['SIGTERM'], ['SIGINT', 'SIGTERM+SIGINT']):
    processes = {name: _start(workdirs[name], *_FOREVER) for name in batch}
    try:
      for name, process in processes.items():
        _wait_until_training(workdirs[name], process)
        # Two signals are two different ones: the kernel would merge two pending SIGTERMs.
        for number in _SIGNALS[name]:
          process.send_signal(number)
      for name, process in processes.items():
        _, stderr = process.communicate(timeout=_HANG_S)
        results[name] = (workdirs[name], process.returncode, stderr)
    finally:
      for process in processes.values():
        process.kill()
        process.wait()
  return results


@pytest.mark.parametrize('name', ['SIGTERM', 'SIGINT'])
def test_signal_saves_a_checkpoint_and_exits_non_zero(signalled_runs, name):
  workdir, status, stderr = signalled_runs[name]
  assert status == 128 + signal.Signals[name]
  last_line = stderr.strip().splitlines()[-1]
  assert f'stopped by {name} at step' in last_line
  assert 'Resume with the same command' in last_line
  stopped_at = int(last_line.split(' at step ')[1].split()[0])
  assert _latest_step(workdir) == stopped_at > 0


def test_the_signals_checkpoint_holds_the_early_stopping_count(signalled_runs):
  """What a resume after SIGTERM counts on from (`early_stopping.Record`): the run evaluated
  at step 0 only, which is not counted."""
  workdir, _, _ = signalled_runs['SIGTERM']
  manager = checkpoint.make_manager(str(workdir), keep=None, create=False)
  cursor, _ = checkpoint.read_metadata(manager, manager.latest_step())
  assert cursor['early_stopping'] == {'best_loss': None, 'best_step': None,
                                      'evals_since_best': 0}


def test_second_signal_exits_at_once_without_saving(signalled_runs):
  workdir, status, stderr = signalled_runs['SIGTERM+SIGINT']
  assert status in (128 + signal.SIGTERM, 128 + signal.SIGINT)
  assert 'exiting now without saving' in stderr
  assert _latest_step(workdir) is None


@pytest.fixture
def finished_run(tiny_run_copy):
  """A private copy of the tiny run (conftest.py; checkpoints at steps 10 and 20), for a test
  to damage or extend: (its config, workdir)."""
  assert sorted(checkpoint.make_manager(str(tiny_run_copy), None, create=False).all_steps()) == [
      10, 20]
  return load_config('tiny_test'), tiny_run_copy


def test_a_half_written_checkpoint_is_ignored(finished_run, capsys):
  config, workdir = finished_run
  checkpoints = workdir / 'checkpoints'
  shutil.copytree(checkpoints / '20', checkpoints / '30.orbax-checkpoint-tmp-1234')
  config.num_train_steps = 25
  summary = train.train_and_evaluate(config, str(workdir))
  assert summary['steps_this_run'] == 5
  assert 'Resuming from the checkpoint at step 20' in capsys.readouterr().out


def _truncate_state_files(step_dir: pathlib.Path) -> None:
  for path in (step_dir / 'state').rglob('*'):
    if path.is_file() and path.stat().st_size > 64:
      with open(path, 'r+b') as f:
        f.truncate(path.stat().st_size // 2)


def test_a_corrupted_latest_checkpoint_is_named_and_the_previous_one_used(finished_run, capsys):
  config, workdir = finished_run
  _truncate_state_files(workdir / 'checkpoints' / '20')
  shutil.rmtree(workdir / 'export')
  summary = train.train_and_evaluate(config, str(workdir))
  out = capsys.readouterr().out
  assert f'Checkpoint {workdir / "checkpoints" / "20"} could not be restored' in out
  assert list((workdir / 'unrestorable_checkpoints').iterdir())  # Kept for inspection.
  assert 'Resuming from the checkpoint at step 10' in out
  assert summary['steps_this_run'] == 10


def test_only_a_damaged_checkpoint_counts_as_corrupt(finished_run):
  """A truncated file is corrupt (set aside); storage that cannot be reached now is not
  (the run stops and the checkpoint stays where it is)."""
  _, workdir = finished_run
  _truncate_state_files(workdir / 'checkpoints' / '20')
  with pytest.raises(Exception) as truncated:  # The real error orbax/tensorstore raise.
    infer.load_predictor(str(workdir), step=20)
  assert checkpoint.is_corrupt(truncated.value)
  for transient in (ConnectionError('connection reset by peer'), TimeoutError('timed out'),
                    OSError(5, 'Input/output error'),
                    ValueError('UNAVAILABLE: Error reading "gs://b/run/checkpoints/20/state": '
                               'CURL error Could not connect to server')):
    assert not checkpoint.is_corrupt(transient), transient


def test_no_restorable_checkpoint_is_a_clear_error(finished_run):
  config, workdir = finished_run
  for step in (10, 20):
    _truncate_state_files(workdir / 'checkpoints' / str(step))
  with pytest.raises(UserError, match='no checkpoint in .* could be restored'):
    train.train_and_evaluate(config, str(workdir))


def test_a_finished_run_without_its_export_exports_on_rerun(finished_run):
  """As after a preemption between the last checkpoint and the end of the export."""
  config, workdir = finished_run
  shutil.rmtree(workdir / 'export')
  summary = train.train_and_evaluate(config, str(workdir))
  assert summary['steps_this_run'] == 0
  exported = infer.load_predictor(str(workdir / 'export')).params
  restored = infer.load_predictor(str(workdir)).params
  for a, b in zip(jax.tree_util.tree_leaves(exported), jax.tree_util.tree_leaves(restored)):
    np.testing.assert_array_equal(a, b)


def test_resume_drops_the_metrics_logged_after_the_restored_checkpoint(finished_run):
  """Steps 11-20 were logged once, then lost with their checkpoint: after the rerun each
  step appears once, with the rerun's values."""
  config, workdir = finished_run
  shutil.rmtree(workdir / 'checkpoints' / '20')
  shutil.rmtree(workdir / 'export')
  train.train_and_evaluate(config, str(workdir))
  logged = [r['step'] for r in metric_writers.read_metrics(str(workdir)) if 'loss' in r]
  evaluated = [r['step'] for r in metric_writers.read_metrics(str(workdir))
               if 'eval_loss' in r]
  assert logged == [5, 10, 15, 20]
  assert evaluated == [0, 10, 20]


def _rates(workdir) -> dict[int, float]:
  return {r['step']: r['learning_rate'] for r in metric_writers.read_metrics(str(workdir))
          if 'loss' in r}


def test_more_steps_on_resume_keep_the_saved_schedule_and_say_so(finished_run, capsys):
  config, workdir = finished_run
  config.num_train_steps = 30
  summary = train.train_and_evaluate(config, str(workdir))
  assert summary['steps_this_run'] == 10 and _latest_step(workdir) == 30
  assert ('Continuing the checkpoint\'s learning-rate schedule over 20 steps although this '
          'run trains 30') in capsys.readouterr().out
  # The 20-step schedule ended at 0: no jump back up (a 30-step one has 3.6e-3 at step 20).
  assert _rates(workdir)[25] == pytest.approx(0.0, abs=1e-9)
  assert _rates(workdir)[30] == pytest.approx(0.0, abs=1e-9)
  manager = checkpoint.make_manager(str(workdir), keep=None, create=False)
  assert checkpoint.read_metadata(manager, 30)[0]['schedule_steps'] == 20


def test_replan_schedule_plans_the_rate_over_the_new_length(finished_run, capsys):
  config, workdir = finished_run
  config.num_train_steps = 30
  config.replan_schedule = True
  train.train_and_evaluate(config, str(workdir))
  assert 'Re-planning the learning-rate schedule over 30 steps' in capsys.readouterr().out
  # Update 25 applies the 30-step schedule at 24: 1e-2 * (1 - 22 / 28).
  assert _rates(workdir)[25] == pytest.approx(1e-2 * 6 / 28, rel=1e-5)


def test_resume_lists_every_difference_that_changes_the_checkpoints_meaning(finished_run):
  config, workdir = finished_run
  config.block_size = 16
  config.seed = 7
  with pytest.raises(UserError, match=r'block_size: 32 -> 16; seed: 0 -> 7'):
    train.train_and_evaluate(config, str(workdir))


def test_non_finite_losses_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
  config = load_config('tiny_test')
  config.num_train_steps = 40
  config.checkpoint_every_steps = 1
  config.warmup_steps = 0
  config.max_grad_norm = 1e30
  config.learning_rate = 1e30  # Parameters overflow within a few steps.
  config.max_nonfinite_steps = 3
  with pytest.raises(UserError, match=r'3 consecutive non-finite .* at step \d+'):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / 'export').exists()
  params = infer.load_predictor(str(tmp_path)).params  # The latest checkpoint.
  assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(params))


def test_an_unwritable_workdir_is_refused_at_start(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  with pytest.raises(UserError, match='cannot be written'):
    train.train_and_evaluate(load_config('tiny_test'), str(blocker / 'run'))


@pytest.mark.parametrize('config_file, content', [
    ('missing.py', None),
    ('no_get_config.py', 'X = 1\n'),
])
def test_a_bad_config_file_is_a_short_error(tmp_path, config_file, content):
  path = tmp_path / config_file
  if content is not None:
    path.write_text(content)
  result = subprocess.run([sys.executable, str(ROOT / 'run_train.py'), f'--config={path}',
                           f'--workdir={tmp_path / "run"}'], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr
  assert config_file in result.stderr


@pytest.fixture
def small_disk(tmp_path):
  """mount(size): a tmpfs of `size` ('900k') at tmp_path/disk, mounted or resized, as a disk
  that fills up (and is then given more room)."""
  mount_point = tmp_path / 'disk'
  mount_point.mkdir()

  def mount(size: str) -> pathlib.Path:
    remount = ['-o', f'remount,size={size}'] if os.path.ismount(mount_point) else [
        '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs']
    mounted = subprocess.run(['mount', *remount, str(mount_point)], capture_output=True,
                             check=False)
    if mounted.returncode != 0:
      pytest.skip('mounting a small tmpfs needs root: ' + mounted.stderr.decode().strip())
    return mount_point

  yield mount
  if os.path.ismount(mount_point):
    subprocess.run(['umount', str(mount_point)], check=False)


def test_a_full_disk_at_save_time_is_one_line_and_keeps_the_previous_checkpoint(small_disk):
  """The command line, not just the library: orbax's save threads log their failures with
  tracebacks (seven on a full disk), which the entry point must not show."""
  workdir = small_disk('900k') / 'run'  # Room for the run's files and one checkpoint, not two.
  result = subprocess.run([sys.executable, str(ROOT / 'run_train.py'), TINY,
                           f'--workdir={workdir}'], cwd=ROOT, capture_output=True, text=True,
                          timeout=_HANG_S, check=False)
  assert result.returncode == 2
  not_progress = [line for line in result.stderr.splitlines()  # tqdm's: 'train: ... [00:06<'
                  if line.strip() and not re.match(r'\w+: .*\[\d\d:\d\d', line)]
  assert len(not_progress) == 1, result.stderr[-3000:]
  assert re.fullmatch(r'error: could not write the checkpoint at step 20 .*\(the disk is full\); '
                      r'the checkpoint at step 10 is intact\. .*', not_progress[0])
  predictor = infer.load_predictor(str(workdir))  # The step-10 checkpoint restores.
  assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(predictor.params))


def test_a_full_disk_at_export_time_is_a_clear_error_and_the_rerun_writes_the_export(small_disk):
  """A finished run whose export is gone (as after a stop between the last checkpoint and the
  export) is rerun on a disk left with 64 KB free: too little for the export (about 200 KB),
  enough for what the rerun writes before it."""
  workdir = small_disk('4m') / 'run'
  train.train_and_evaluate(load_config('tiny_test'), str(workdir))
  shutil.rmtree(workdir / 'export')
  disk = os.statvfs(workdir)
  small_disk(f'{(disk.f_blocks - disk.f_bfree) * disk.f_frsize // 1024 + 64}k')
  with pytest.raises(UserError, match=r'could not write the export in .*export \(the disk is '
                     r'full\); the checkpoint at step 20 holds the trained parameters\. '):
    train.train_and_evaluate(load_config('tiny_test'), str(workdir))
  assert [p.name for p in workdir.iterdir() if p.name.startswith('export')] == []  # No partial.
  small_disk('4m')  # Space freed.
  assert train.train_and_evaluate(load_config('tiny_test'), str(workdir))['steps_this_run'] == 0
  exported = jax.tree_util.tree_leaves(infer.load_predictor(str(workdir / 'export')).params)
  checkpointed = jax.tree_util.tree_leaves(infer.load_predictor(str(workdir)).params)
  assert len(exported) == len(checkpointed)
  for a, b in zip(exported, checkpointed):
    np.testing.assert_array_equal(a, b)


def test_a_full_disk_while_preparing_names_the_cache_folder_and_leaves_no_partial_blocks(
    small_disk, tiny_config):
  from mlm_jax.data import preparation  # pylint: disable=import-outside-toplevel
  tiny_config.cache_dir = str(small_disk('64k') / 'cache')  # The tokenizer fits, the blocks not.
  with pytest.raises(UserError, match=r'the cache folder .*/cache/blocks is on a full disk; .*'
                     r'--config.cache_dir'):
    preparation.prepare(tiny_config, progress=False, log=lambda _: None)
  assert not any((small_disk('64k') / 'cache' / 'blocks').iterdir())


@pytest.mark.parametrize('error', [
    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), 'metrics.jsonl'),
    RuntimeError('I/O error: No space left on device (os error 28)'),  # safetensors' kind
])
def test_a_full_disk_anywhere_else_is_one_line_on_the_command_line(error, capsys):
  def fn():
    raise error
  with pytest.raises(SystemExit) as exited:
    cli.run_user_facing(fn)
  assert exited.value.code == 2
  assert re.fullmatch(r'error: a disk is full \(.*\); free disk space and rerun the same '
                      r'command\n', capsys.readouterr().err)


def test_other_errors_keep_their_traceback_on_the_command_line():
  def fn():
    raise OSError(errno.EACCES, os.strerror(errno.EACCES), 'metrics.jsonl')
  with pytest.raises(PermissionError):
    cli.run_user_facing(fn)


_HOST_WAITING_FOR_PROCESS_ZERO = '''
import sys
from mlm_jax import cli
cli.initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
from mlm_jax import sharding
from mlm_jax.errors import UserError
def export():
  raise OSError('the export could not be written')
print(sharding.on_process_zero(lambda: 'written', 'process 0 failed'))
try:
  sharding.on_process_zero(export, 'process 0 failed (see its error)')
except (OSError, UserError) as e:
  print(f'{type(e).__name__}: {e}')
'''


def test_hosts_waiting_for_process_zero_stop_when_it_fails_instead_of_waiting_forever():
  """What process 0 alone does (preparing the data, writing the export), the others wait
  for: they learn whether it failed, and say so. A barrier alone would leave them, and process
  0's exit, waiting forever (seen with the export before this: both hosts hung)."""
  address = f'127.0.0.1:{multidevice.free_port()}'
  outputs = multidevice.run_hosts(
      [[sys.executable, '-c', _HOST_WAITING_FOR_PROCESS_ZERO, address, str(index)]
       for index in range(2)], devices=1, timeout=300)  # A hang guard, not a time limit.
  assert [stdout.splitlines()[-2:] for stdout, _ in outputs] == [  # After gloo's own line.
      ['written', 'OSError: the export could not be written'],
      ['None', 'UserError: process 0 failed (see its error)']]


_HOSTS_CALLING_FROM_DIFFERENT_LINES = '''
import sys
from mlm_jax import cli
cli.initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
from mlm_jax import sharding
if sys.argv[2] == '0':
  print(sharding.host_flag(True))
else:
  print(sharding.host_flag(False))
'''


def test_hosts_complete_a_collective_they_reach_from_different_lines():
  """Hosts that run the same program traced from different source lines (a program one host
  finds in its persistent compilation cache, traced by an earlier run, is one) complete its
  collectives. With jax 0.12.1 such hosts waited on each other forever, unless the program's
  locations leave the lines out (`cli.initialize_distributed` does)."""
  address = f'127.0.0.1:{multidevice.free_port()}'
  outputs = multidevice.run_hosts(
      [[sys.executable, '-c', _HOSTS_CALLING_FROM_DIFFERENT_LINES, address, str(index)]
       for index in range(2)], devices=1, timeout=120)  # A hang guard, not a time limit.
  assert [stdout.splitlines()[-1] for stdout, _ in outputs] == ['True', 'True']


_UNAWAITED = ('Task exception was never retrieved\nfuture: <Task finished coro=<{}() done, '
              'defined at /site-packages/{}.py:126> exception=ValueError()>')


@pytest.mark.parametrize('logger, path, message, shown', [
    # A save thread's failure, raised again in the main thread.
    ('absl', '/site-packages/orbax/checkpoint/_src/futures/future.py', 'failed', False),
    # 'Failed to remove checkpoint': not raised again.
    ('absl', '/site-packages/orbax/checkpoint/_src/path/storage_backend.py', 'failed', True),
    # An orbax write task whose failure the save raised; another library's such task.
    ('asyncio', '/asyncio/base_events.py',
     _UNAWAITED.format('async_serialize_from_host', 'orbax/checkpoint/_src/serialization'), False),
    ('asyncio', '/asyncio/base_events.py', _UNAWAITED.format('fetch', 'aiohttp/client'), True),
])
def test_the_command_line_hides_only_the_save_tracebacks_it_reports_itself(logger, path, message,
                                                                          shown):
  """The filter `cli.quiet_libraries` installs on absl's logger (which orbax logs through) and
  asyncio's."""
  try:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  except OSError:
    record = logging.LogRecord(logger, logging.ERROR, path, 1, message, None, sys.exc_info())
  assert bool(cli._OrbaxTracebacks().filter(record)) == shown  # pylint: disable=protected-access
