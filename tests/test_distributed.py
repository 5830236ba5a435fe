"""One code path for 1 device, N devices and N hosts: the layout never changes the result.

Several devices are CPU devices (`--xla_force_host_platform_device_count`), several
hosts are processes on 127.0.0.1 joined by `jax.distributed` with gloo collectives.
"""

import re
import subprocess
import sys

from tests.conftest import ROOT
from tests.multidevice import assert_same_training, cluster_env


def test_eight_devices_train_exactly_like_one(layout_runs):
  assert_same_training(layout_runs['replicated'], layout_runs['one_device'])


def test_modernbert_on_eight_fsdp_devices_trains_exactly_like_one(layout_runs):
  assert_same_training(layout_runs['modernbert_one_device'], layout_runs['modernbert_fsdp'])


def test_fsdp_sharded_state_trains_exactly_like_replicated(layout_runs):
  assert_same_training(layout_runs['fsdp'], layout_runs['one_device'])


def test_fsdp_shards_large_arrays_and_replicates_small_ones(layout_runs):
  assert layout_runs['born']['specs'] == [['fsdp', None], []]


def test_the_train_state_is_born_sharded(layout_runs):
  """fsdp=4 on 8 devices: created by one jitted function with `out_shardings`, so no whole
  large array ever lives on one device (neither the model's own parameters nor a state
  made eagerly and then placed), and every large array of the parameters and Adam moments
  holds a quarter per device (that it trains like a replicated one is the test above)."""
  born = layout_runs['born']
  assert not born['whole']
  assert born['fractions'] and all('fsdp' in spec and fraction == 0.25
                                   for spec, fraction in born['fractions'])


_GLOO_PIECES = (r'\[Gloo\] Rank | is connected to | peer ranks\.|'
                r'Expected number of connected peer ranks is :|\d+|\s+')


def test_two_hosts_reach_the_same_loss_as_one_host(two_host_run):
  """2 processes x 2 devices on 127.0.0.1 train as one process does (here: 1 device x 8 rows;
  the 8-device test above shows the device count of one process does not matter)."""
  outputs = two_host_run['outputs']
  assert '4 device(s)' in outputs[0][0]
  # Only process 0 prints. Gloo's connection lines aside: its threads write their pieces
  # to the same stdout, interleaved ('... ranks is : 3' and a lone '3' on the next line).
  assert not re.sub(_GLOO_PIECES, '', outputs[1][0]).strip()
  assert_same_training(two_host_run['hosts'], two_host_run['one_device'])


def test_a_detected_cluster_that_cannot_be_joined_is_a_one_line_error(tmp_path):
  """SLURM variables for task 1 of 2, whose process 0 never starts: not a silent
  single-process run (which would write into the shared workdir), and not JAX's abort."""
  env = cluster_env(1)
  env.update(SLURM_JOB_ID='4242', SLURM_STEP_NODELIST='127.0.0.1', SLURM_NTASKS='2',
             SLURM_PROCID='1', SLURM_LOCALID='0')
  result = subprocess.run(
      [sys.executable, 'run_train.py', '--config=configs/tiny_test.py',
       f'--workdir={tmp_path / "run"}', '--distributed_timeout_s=2'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 2
  assert result.stderr.strip().count('\n') == 0
  assert 'coordinator (process 0) at 127.0.0.1:' in result.stderr
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_a_jax_without_its_private_cluster_detection_says_so_in_one_line_and_runs():
  """Where a jax release changes the private `jax._src.clusters` the CLI reads (here its
  module is made unimportable, as a rename would), a machine without a cluster still runs as
  one process, after one line, not a traceback; `jax.distributed.initialize()` detects
  clusters itself."""
  probe = ('import sys, jax, jax._src; del jax._src.clusters; '
           'sys.modules["jax._src.clusters"] = None; '
           'from mlm_jax import cli; cli.initialize_distributed(None, None, None); '
           'print(jax.process_count())')
  result = subprocess.run([sys.executable, '-c', probe], cwd=ROOT, env=cluster_env(1),
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ['1']
  assert result.stderr.strip().count('\n') == 0
  assert 'private cluster detection' in result.stderr
