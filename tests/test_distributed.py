"""One code path for 1 device, N devices and N hosts: the layout never changes the result.

Several devices are CPU devices (`--xla_force_host_platform_device_count`), several
hosts are processes on 127.0.0.1 joined by `jax.distributed` with gloo collectives. The
2-host run adapts a pretrained model as a domain run does (`multidevice.hosts_flags`): its
hosts add the same words, train as one host does, and stop early at one host's step.
"""

import json
import re
import subprocess
import sys

import jax
import numpy as np

from mlm_jax import checkpoint
from mlm_jax import metric_writers
from mlm_jax import vocabulary
from mlm_jax.data import preparation
from mlm_jax.data import tokenizer as tokenizer_lib
from mlm_jax.models import FlaxAutoModelForMaskedLM
from tests.conftest import ROOT
from tests.multidevice import HOSTS_WORDS, assert_same_training, cluster_env


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


def test_hosts_add_the_same_words_as_one_host_and_export_the_grown_table(two_host_run):
  """Process 1 extends the pretrained tokenizer itself, from the config, and opens the blocks
  process 0 prepared under its own tokenizer's fingerprint: a host with other words finds
  none and fails. The new rows start alike on every host, or the losses above differ (the
  tied decoder scores every masked token against them)."""
  pretrained = tokenizer_lib.load_pretrained_tokenizer(two_host_run['model'])
  pieces = [tokenizer_lib.word_pieces(pretrained, w) for w in HOSTS_WORDS]
  assert all(len(p) > 1 for p in pieces)  # Each word was split before.
  rows = vocabulary.table_rows(len(pretrained) + len(HOSTS_WORDS), len(pretrained), 64)
  fingerprints = []
  for workdir in (two_host_run['hosts'], two_host_run['one_device']):
    export = workdir / 'export'
    tokenizer = tokenizer_lib.load_pretrained_tokenizer(str(export))
    assert tokenizer_lib.added_words(tokenizer) == list(HOSTS_WORDS)
    ids = tokenizer(' '.join(HOSTS_WORDS), add_special_tokens=False)['input_ids']
    assert ids == tokenizer.convert_tokens_to_ids(list(HOSTS_WORDS))
    with open(export / 'config.json', encoding='utf-8') as f:
      assert json.load(f)['vocab_size'] == rows > len(tokenizer)
    fingerprints.append(preparation.tokenizer_fingerprint(tokenizer))
  assert fingerprints[0] == fingerprints[1]
  assert f'the table {len(pretrained)} -> {rows} rows' in two_host_run['outputs'][0][0]


def test_hosts_stop_early_at_one_hosts_step_and_export_the_best(two_host_run):
  """Every host decides from the same global eval loss: had one gone on training, the other's
  export (a collective gather) could not have completed, and both ended normally. They stop
  where one host stops, and export its best checkpoint."""
  summary, hosts = two_host_run['summary'], two_host_run['hosts']
  stop, best = summary['steps'], summary['best_step']
  assert summary['stopped_early'] and best < stop < summary['planned_steps']
  evals = [[r['step'] for r in metric_writers.read_metrics(str(w)) if 'eval_loss' in r]
           for w in (hosts, two_host_run['one_device'])]
  assert evals[0] == evals[1] and evals[0][-1] == stop
  assert f'Stopping early at step {stop}:' in two_host_run['outputs'][0][0]
  assert f'Done: {stop} steps (stopped early;' in two_host_run['outputs'][0][0]
  assert checkpoint.make_manager(str(hosts), None, create=False,
                                 best_by='eval_loss').best_step() == best
  exported = FlaxAutoModelForMaskedLM.from_pretrained(str(hosts / 'export')).params
  saved = checkpoint.restore_params(str(hosts), best,
                                    jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  for a, b in zip(jax.tree_util.tree_leaves(exported), jax.tree_util.tree_leaves(saved)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert_same_training(hosts / 'export', two_host_run['one_device'] / 'export', metrics=False)


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
