"""One code path for 1 device, N devices and N hosts: the layout never changes the result.

Several devices are CPU devices (`--xla_force_host_platform_device_count`), several
hosts are processes on 127.0.0.1 joined by `jax.distributed` with gloo collectives.
"""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from mlm_jax import infer
from mlm_jax import metric_writers
from tests.conftest import ROOT
from tests.multidevice import cluster_env, free_port, run_hosts, run_with_devices

# Dropout on, so its random draws are part of what must not depend on the layout.
_TRAIN = '''
import json
from tests.conftest import load_config
from mlm_jax import train
for per_device, fsdp, workdir in {runs!r}:
  config = load_config('tiny_test')
  config.split = 'train[:40]'
  config.model_config.hidden_dropout_prob = 0.1
  config.model_config.hidden_size = 64
  config.num_train_steps = 6
  config.log_every_steps = 1  # Each step's loss and gradient norm.
  config.eval_every_steps = 6
  config.checkpoint_every_steps = 6
  config.per_device_batch_size = per_device
  config.fsdp = fsdp
  train.train_and_evaluate(config, workdir)
'''


def _train(devices: int, runs: list[tuple[int, int, str]]) -> None:
  """Trains each (per_device_batch_size, fsdp, workdir) in one process with `devices` devices."""
  run_with_devices(_TRAIN.format(runs=[(p, f, str(w)) for p, f, w in runs]), devices=devices)


def _params(workdir) -> dict[str, np.ndarray]:
  """The trained parameters by path, without the attention key biases: their true gradient
  is zero (softmax ignores a shift shared by every key), so Adam moves them by about the
  learning rate on the sign of rounding noise, whatever the layout."""
  flat = jax.tree_util.tree_leaves_with_path(infer.load_predictor(str(workdir)).params)
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat
          if not jax.tree_util.keystr(path).endswith("['key']['bias']")}


def _assert_same_run(workdir_a, workdir_b) -> None:
  """Float32 reductions in another order differ by a few ulps (~1e-7 relative) per step;
  six steps of Adam on a 64-wide model stay within 2e-5 relative, 1e-6 absolute. A layout
  bug (a row counted twice, a dropped shard, another mask) moves far more."""
  params_a, params_b = _params(workdir_a), _params(workdir_b)
  assert params_a.keys() == params_b.keys()
  for path, a in params_a.items():
    np.testing.assert_allclose(a, params_b[path], rtol=2e-5, atol=1e-6, err_msg=path)
  records_a, records_b = (
      [r for r in metric_writers.read_metrics(str(w)) if 'loss' in r]
      for w in (workdir_a, workdir_b))
  for key in ('loss', 'grad_norm', 'masked_tokens'):  # The gradients' norm, step by step.
    np.testing.assert_allclose([r[key] for r in records_a], [r[key] for r in records_b],
                               rtol=1e-5, err_msg=key)


@pytest.fixture(scope='module')
def one_device_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('one_device')
  _train(devices=1, runs=[(8, 1, workdir)])
  return workdir


@pytest.fixture(scope='module')
def eight_device_runs(tmp_path_factory):
  """Replicated and fsdp-sharded state on 8 devices, one row per device."""
  replicated, fsdp = tmp_path_factory.mktemp('replicated'), tmp_path_factory.mktemp('fsdp')
  _train(devices=8, runs=[(1, 1, replicated), (1, 4, fsdp)])
  return replicated, fsdp


def test_eight_devices_train_exactly_like_one(one_device_run, eight_device_runs):
  _assert_same_run(eight_device_runs[0], one_device_run)


def test_fsdp_sharded_state_trains_exactly_like_replicated(one_device_run, eight_device_runs):
  _assert_same_run(eight_device_runs[1], one_device_run)


def test_fsdp_shards_large_arrays_and_replicates_small_ones():
  out = run_with_devices('''
    import json
    import jax.numpy as jnp
    from mlm_jax import sharding
    mesh = sharding.make_mesh(fsdp=4)
    specs = sharding.state_sharding({'big': jnp.zeros((400, 64)), 'small': jnp.zeros(64)}, mesh)
    print(json.dumps([list(specs['big'].spec), list(specs['small'].spec)]))
  ''')
  assert json.loads(out) == [['fsdp', None], []]


# The same run as `_TRAIN` with 2 rows per device: 2 hosts x 2 devices x 2 = 8 rows, as one_device_run.
_CLI_FLAGS = ['--config=configs/tiny_test.py', '--config.split=train[:40]',
              '--config.num_train_steps=6', '--config.log_every_steps=1',
              '--config.eval_every_steps=6', '--config.checkpoint_every_steps=6',
              '--config.per_device_batch_size=2', '--config.model_config.hidden_size=64',
              '--config.model_config.hidden_dropout_prob=0.1']


def test_two_hosts_reach_the_same_loss_as_one_host(one_device_run, tmp_path):
  """2 processes x 2 devices on 127.0.0.1 train as one process does (here: 1 device x 8 rows;
  the 8-device test above shows the device count of one process does not matter)."""
  multi = tmp_path / 'multi'
  address = f'127.0.0.1:{free_port()}'
  outputs = run_hosts([[sys.executable, 'run_train.py', *_CLI_FLAGS, f'--workdir={multi}',
                        f'--coordinator_address={address}', '--num_processes=2',
                        f'--process_id={index}'] for index in range(2)], devices=2,
                       timeout=900)  # A hang guard, not a time limit.
  assert '4 device(s)' in outputs[0][0]
  own_lines = [line for line in outputs[1][0].splitlines() if not line.startswith('[Gloo]')]
  assert not own_lines  # Only process 0 prints (gloo's own connection lines aside).
  _assert_same_run(multi, one_device_run)


def test_the_train_state_is_born_sharded_and_trains_like_a_replicated_one():
  """fsdp=4 on 4 devices: created by one jitted function with `out_shardings`, so no whole
  large array ever lives on one device (neither the model's own parameters nor a state
  made eagerly and then placed), every large array of the parameters and Adam moments
  holds a quarter per device, and 3 steps on it give the replicated state's parameters."""
  out = run_with_devices('''
    import json
    import jax
    import numpy as np
    from tests.conftest import load_config
    from mlm_jax import masking, model as model_lib, optim, sharding, steps as steps_lib
    from mlm_jax.tokenizer import train_bpe_tokenizer
    from mlm_jax import data
    config = load_config('tiny_test')
    config.model_config.hidden_size = 64
    texts = [line[:400] for line in open(data.sample_data_path(), encoding='utf-8')]
    tokenizer = train_bpe_tokenizer(texts, 400, model_max_length=64)
    model = model_lib.create_model(config, tokenizer)
    tx, schedule = optim.make_optimizer(config, total_steps=10)
    spec = masking.masking_spec(tokenizer, 0.15)
    ids = np.random.default_rng(0).integers(5, 400, (1, 16, 32)).astype(np.int32)
    params, sharded_fractions = {}, []
    for fsdp in (4, 1):
      mesh = sharding.make_mesh(fsdp=fsdp)
      with jax.transfer_guard_device_to_device('disallow'):
        state, shardings = steps_lib.init_train_state(model, tx, config.seed, mesh)
      if fsdp == 4:
        whole = [a.shape for a in jax.live_arrays()
                 if a.size >= 1 << 14 and len(a.sharding.device_set) == 1]
        assert not whole, whole
        for leaf in jax.tree_util.tree_leaves((state.params, state.opt_state)):
          if leaf.size >= 1 << 14:
            assert 'fsdp' in leaf.sharding.spec, leaf.sharding
            sharded_fractions.append(leaf.addressable_shards[0].data.size / leaf.size)
      steps = steps_lib.compile_steps(model.__call__, tx, schedule, spec, config.seed, mesh,
                                      shardings)
      for _ in range(3):
        state, _ = steps.train(state, sharding.shard_batch(ids, mesh, batch_axis=1))
      params[fsdp] = [np.asarray(x).tolist() for x in
                      jax.tree_util.tree_leaves(sharding.to_host(state.params))]
    print(json.dumps({'fractions': sharded_fractions, 'params': params}))
  ''', devices=4)
  result = json.loads(out.strip().splitlines()[-1])
  assert result['fractions'] and set(result['fractions']) == {0.25}
  for a, b in zip(result['params']['4'], result['params']['1']):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-5)


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
