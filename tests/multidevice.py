"""Runs Python in subprocesses that see N CPU devices, alone or as the hosts of a cluster.

XLA reads the device count once, before jax is first imported, so tests that need
several devices run their code in a fresh interpreter; several hosts are several
processes on 127.0.0.1 joined by `jax.distributed` with gloo collectives.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np

from mlm_jax import infer
from mlm_jax import metric_writers
from tests.conftest import ROOT


def _xla_flags(devices: int) -> str:
  """The tests' XLA flags (conftest.py) with `devices` CPU devices."""
  return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"


def run_with_devices(code: str, devices: int = 8, timeout: float = 900) -> str:
  """Runs `code` with `devices` CPU devices; returns its stdout, failing on a non-zero exit."""
  env = dict(os.environ, XLA_FLAGS=_xla_flags(devices))
  env['PYTHONPATH'] = os.pathsep.join([str(ROOT), env.get('PYTHONPATH', '')])
  result = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  return result.stdout


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def cluster_env(devices: int) -> dict:
  """The environment of one host of a CPU cluster with `devices` devices per host."""
  env = dict(os.environ, PYTHONUNBUFFERED='1', JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo',
             XLA_FLAGS=_xla_flags(devices))
  env['PYTHONPATH'] = os.pathsep.join([str(ROOT), env.get('PYTHONPATH', '')])
  return env


def run_hosts(commands: list[list[str]], devices: int,
              timeout: float = 300) -> list[tuple[str, str]]:
  """Runs one command per host at once; returns each (stdout, stderr), failing on a non-zero exit.

  The processes are killed on the way out, whatever happens.
  """
  processes = [subprocess.Popen(command, cwd=ROOT, env=cluster_env(devices),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for command in commands]
  try:
    outputs = [p.communicate(timeout=timeout) for p in processes]
  finally:
    for p in processes:
      p.kill()
      p.wait()
  for p, (_, stderr) in zip(processes, outputs):
    assert p.returncode == 0, stderr[-3000:]
  return outputs


def start_hosts(flags: list[str], hosts: int = 2, devices: int = 2) -> list[subprocess.Popen]:
  """Starts `hosts` run_train.py processes of one multi-host run on 127.0.0.1."""
  address = f'127.0.0.1:{free_port()}'
  return [subprocess.Popen(
      [sys.executable, 'run_train.py', *flags, f'--coordinator_address={address}',
       f'--num_processes={hosts}', f'--process_id={index}'],
      cwd=ROOT, env=cluster_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for index in range(hosts)]


def finish(processes: list[subprocess.Popen], timeout: float = 300) -> list[tuple[str, str]]:
  """(stdout, stderr) of each process once it exits; every process is killed at the end."""
  try:
    return [p.communicate(timeout=timeout) for p in processes]
  finally:
    for p in processes:
      p.kill()
      p.wait()


# ----------------------------------------------------------------------------
# The layout runs: one small training on 1 device, 8 devices and fsdp-sharded 8 devices,
# shared by the tests of layout independence, elastic resume and multi-host resume.

# 6 steps of 8 rows; dropout on, so its draws are part of what must not depend on the layout.
_LAYOUT = {'split': 'train[:40]', 'model_config.hidden_size': 64,
           'model_config.hidden_dropout_prob': 0.1, 'num_train_steps': 6, 'log_every_steps': 1,
           'eval_every_steps': 6, 'checkpoint_every_steps': 3}
LAYOUT_FLAGS = ['--config=configs/tiny_test.py', *(f'--config.{k}={v}' for k, v in _LAYOUT.items())]

# The hosts runs (`conftest.two_host_run`, the SIGTERM scenario of test_multihost.py) adapt a
# pretrained model (`hosts_model`: the model `_LAYOUT` trains from scratch, saved as a
# pretrained one) as a domain run does: new words, the table padded to 64 rows, and early
# stopping. 2 rows per device, so 2 hosts x 2 devices make 8 rows; a checkpoint only when
# stopped, at a new best and at the end, the newest 3 kept (the SIGTERM test finds the step it
# stopped at among them). Evaluated every 2 steps on 4 blocks, the eval loss falls and then
# rises (on one device: 5.95 at step 2, 5.56 at 4, 5.63 at 6), so patience 1 stops the run at
# step 6 of 16, its best at step 4, with margins far above rounding. The learning rate stays
# low: 2 hosts and 1 device round differently and Adam amplifies that. The worst parameter's
# share of `assert_same_training`'s tolerance, measured with jax 0.10 when its absolute part
# was 1e-6: here 0.35 after 4 steps and 0.46 after 6; at lr 1e-2 0.11 after 6 steps, 0.10
# after 12, 0.36 after 20, 0.78 after 24; at lr 0.1 (where the loss rises at once) 1.6 after
# 2 steps and 11,000 after 10. With jax 0.12.1, here after 6 steps: 1.17 of that tolerance,
# 0.58 of today's (3e-6).
HOSTS_WORDS = ('molecules', 'electrons')  # Each in pieces before, and frequent in the data.
_HOSTS = {**{k: v for k, v in _LAYOUT.items() if not k.startswith('model_config.')},
          'num_train_steps': 16, 'eval_every_steps': 2,
          'max_eval_blocks': 4, 'checkpoint_every_steps': 1000, 'keep_checkpoints': 3,
          'per_device_batch_size': 2,
          'add_tokens': ','.join(HOSTS_WORDS), 'pad_vocab_to_multiple_of': 64,
          'learning_rate': 0.02, 'early_stopping_patience': 1}


def hosts_model(directory: str) -> str:
  """The pretrained model the hosts runs adapt, saved in `directory`."""
  from tests import tiny_models  # pylint: disable=import-outside-toplevel
  return tiny_models.save_roberta(directory, _tiny_config(_LAYOUT).model_config.to_dict())


def hosts_flags(model_dir: str) -> list[str]:
  """run_train.py's flags of the hosts runs, adapting `model_dir` (`hosts_model`)."""
  return ['--config=configs/tiny_test.py', f'--config.model_name_or_path={model_dir}',
          *(f'--config.{k}={v}' for k, v in _HOSTS.items())]


def _tiny_config(settings: dict):
  """configs/tiny_test.py with `settings` ({'a.b': value}) set, as `--config.a.b=value` does."""
  from tests.conftest import load_config  # pylint: disable=import-outside-toplevel
  config = load_config('tiny_test')
  for key, value in settings.items():
    *parents, name = key.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value
  return config


def hosts_config_on_one_device(model_dir: str):
  """The training `hosts_flags(model_dir)` name, on 1 device x 8 rows."""
  config = _tiny_config(_HOSTS)
  config.model_name_or_path, config.per_device_batch_size = model_dir, 8
  return config


def layout_config(per_device_batch_size: int = 8, fsdp: int = 1, model_dir: str = ''):
  """The config `LAYOUT_FLAGS` name, with this layout's batch split and fsdp. With `model_dir`
  (a local ModernBERT, `tiny_models.save_modernbert`) it fine-tunes that model with whole-word
  masking and document-aware attention instead."""
  config = _tiny_config(_LAYOUT)
  config.per_device_batch_size, config.fsdp = per_device_batch_size, fsdp
  if model_dir:
    config.model_name_or_path = model_dir
    config.masking, config.attention_scope = 'whole_word', 'document'
  return config

_LAYOUT_RUNS = '''
import json
import jax
import jax.numpy as jnp
from mlm_jax import model as model_lib, optim, sharding, steps as steps_lib, train
from mlm_jax.data import sources, tokenizer as tokenizer_lib
from tests.multidevice import layout_config
config = layout_config()
report = {{}}
if jax.device_count() == 8:
  # The state is born sharded: made inside one jitted function with out_shardings, so no
  # large array is ever whole on one device, and each device holds a quarter of it.
  mesh = sharding.make_mesh(fsdp=4)
  specs = sharding.state_sharding({{'big': jnp.zeros((400, 64)), 'small': jnp.zeros(64)}}, mesh)
  report['specs'] = [list(specs['big'].spec), list(specs['small'].spec)]
  texts = [line[:400] for line in open(sources.sample_data_path(), encoding='utf-8')]
  tokenizer = tokenizer_lib.train_bpe_tokenizer(texts, 400, 64)
  model = model_lib.create_model(config, tokenizer)
  tx, _ = optim.make_optimizer(config, total_steps=10)
  with jax.transfer_guard_device_to_device('disallow'):
    state, _ = steps_lib.init_train_state(model, tx, config.seed, mesh)
  report['whole'] = [list(a.shape) for a in jax.live_arrays()
                     if a.size >= 1 << 14 and len(a.sharding.device_set) == 1]
  report['fractions'] = [
      (str(leaf.sharding.spec), leaf.addressable_shards[0].data.size / leaf.size)
      for leaf in jax.tree_util.tree_leaves((state.params, state.opt_state))
      if leaf.size >= 1 << 14]
  del state
for per_device, fsdp, workdir, model_dir in {runs!r}:
  train.train_and_evaluate(layout_config(per_device, fsdp, model_dir), workdir)
print(json.dumps(report))
'''


def train_layouts(devices: int, runs: list[tuple[int, int, str, str]]) -> dict:
  """Trains `LAYOUT_FLAGS` once per (per_device_batch_size, fsdp, workdir, model_dir), in one
  process with `devices` devices; with 8, also reports how a fsdp=4 state is born (see above)."""
  code = _LAYOUT_RUNS.format(runs=[(p, f, str(w), m) for p, f, w, m in runs])
  return json.loads(run_with_devices(code, devices=devices).strip().splitlines()[-1])


def trained_params(workdir) -> dict[str, np.ndarray]:
  """The trained parameters by path, without the attention key biases: their true gradient
  is zero (softmax ignores a shift shared by every key), so Adam moves them by about the
  learning rate on the sign of rounding noise, whatever the layout."""
  flat = jax.tree_util.tree_leaves_with_path(infer.load_predictor(str(workdir)).params)
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat
          if not jax.tree_util.keystr(path).endswith("['key']['bias']")}


def assert_same_training(workdir_a, workdir_b, metrics: bool = True) -> None:
  """Float32 reductions in another order differ by a few ulps (~1e-7 relative) per step;
  six steps of Adam on a 64-wide model stay within 2e-5 relative, 3e-6 absolute. The
  absolute part is for the odd element whose gradient is near zero, where Adam's step
  amplifies the rounding: with jax 0.12.1, 2 hosts against 1 device, one element of the
  word and one of the position embeddings moved by 1.9e-6 (the loss agreed to 1e-7). A
  layout bug (a row counted twice, a dropped shard, another mask) moves parameters by about
  the learning rate. With `metrics`, the logged loss, gradient norm and masked-token count
  agree step by step too."""
  params_a, params_b = trained_params(workdir_a), trained_params(workdir_b)
  assert params_a.keys() == params_b.keys()
  for path, a in params_a.items():
    np.testing.assert_allclose(a, params_b[path], rtol=2e-5, atol=3e-6, err_msg=path)
  if not metrics:
    return
  records_a, records_b = (
      [r for r in metric_writers.read_metrics(str(w)) if 'loss' in r]
      for w in (workdir_a, workdir_b))
  for key in ('loss', 'grad_norm', 'masked_tokens'):  # The gradients' norm, step by step.
    np.testing.assert_allclose([r[key] for r in records_a], [r[key] for r in records_b],
                               rtol=1e-5, err_msg=key)
