"""Shared fixtures: the tiny test config, caches isolated in a temporary folder, a GCS emulator."""

import contextlib
import importlib.util
import json
import os
import pathlib
import pkgutil
import shutil
import socket
import subprocess
import sys
import tempfile
import time

# Read by `datasets` and `huggingface_hub` when they are imported, so set before any test module
# imports them: no test reaches the network or writes to the user's caches. One folder for the
# whole run: pytest-xdist's workers and the tests' subprocesses inherit it.
_CACHE = os.environ.get('MLM_JAX_TEST_CACHE') or tempfile.mkdtemp(prefix='mlm_jax_test_cache_')
os.environ['MLM_JAX_TEST_CACHE'] = _CACHE
os.environ['MLM_JAX_CACHE'] = os.path.join(_CACHE, 'mlm_jax')
os.environ['HF_HOME'] = os.path.join(_CACHE, 'hf')
os.environ['HF_DATASETS_CACHE'] = os.path.join(_CACHE, 'hf_datasets')
os.environ['HF_HUB_OFFLINE'] = '1'
os.environ['HF_DATASETS_OFFLINE'] = '1'
os.environ['TOKENIZERS_PARALLELISM'] = 'false'
# JAX's persistent compilation cache: the many runs of the tiny config (in subprocesses
# too) compile the same programs once.
os.environ['JAX_COMPILATION_CACHE_DIR'] = os.path.join(_CACHE, 'jax')
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '-1'
# The tests compile hundreds of small programs and run each a few times: LLVM's optimisation
# of the CPU code costs more than it saves (test_steps.py: 81 s with it, 46 s without), and
# XLA:CPU's older fusion emitters, where the installed jaxlib still has them (0.11.1 dropped
# them), compile faster than its newer ones (test_steps.py 49 s -> 38 s, test_cpu_speed.py
# 36 s -> 25 s, one core). Comparisons between runs are unaffected: both sides of each are
# compiled alike, and the golden fixtures' tolerances hold (test_goldens.py compiles so).
# Subprocesses inherit these flags.
_SPEED_OPTIONS = {'xla_backend_optimization_level': 0, 'xla_cpu_use_fusion_emitters': False}


def _known_xla_options(options: dict) -> list[str]:
  """The names of `options` that the installed jaxlib knows. An XLA_FLAGS entry it lacks
  aborts every process that starts jax, so they are probed first as compile options (an
  unknown one is an exception there), in a child process: this one's XLA_FLAGS must be set
  before jax starts. Once for the run: the workers inherit the answer."""
  if 'MLM_JAX_TEST_XLA_OPTIONS' not in os.environ:
    probe = ('import json, sys; from mlm_jax import compiler_options; '
             'print(json.dumps(list(compiler_options.accepted(json.loads(sys.argv[1])))))')
    result = subprocess.run([sys.executable, '-c', probe, json.dumps(options)], check=True,
                            capture_output=True, text=True, timeout=300,
                            cwd=pathlib.Path(__file__).resolve().parent.parent)
    os.environ['MLM_JAX_TEST_XLA_OPTIONS'] = result.stdout.strip().splitlines()[-1]
  return json.loads(os.environ['MLM_JAX_TEST_XLA_OPTIONS'])


for _name in _known_xla_options(_SPEED_OPTIONS):
  if f'--{_name}=' not in os.environ.get('XLA_FLAGS', ''):
    _value = str(_SPEED_OPTIONS[_name]).lower()
    os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} --{_name}={_value}".strip()

import jax  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position
# The compile events' names, which no public module names.
from jax._src import dispatch  # pylint: disable=wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `configs.*` imports, as run_train.py allows.


def _own_modules() -> list[str]:
  """The project's module names, and `__main__` (run_train.py, run_infer.py, `python -c`)."""
  package = [m.name for m in pkgutil.walk_packages([str(ROOT / 'mlm_jax')], 'mlm_jax.')]
  return ['__main__', 'mlm_jax', *package]


# setup.cfg makes a deprecated call from the project's own code an error in the tests; the same
# for the processes they start, whose -W filters name each module (their module field is a
# literal name, not a pattern).
_OWN_WARNINGS = ','.join(f'error::DeprecationWarning:{name}' for name in _own_modules())
if _OWN_WARNINGS not in os.environ.get('PYTHONWARNINGS', ''):
  os.environ['PYTHONWARNINGS'] = ','.join(
      filter(None, [os.environ.get('PYTHONWARNINGS'), _OWN_WARNINGS]))


# pytest-xdist (`-n`, setup.cfg) hands out whole modules (the scheduler below), so a module's
# fixtures are made once; these modules share a session fixture (`layout_runs` and
# `two_host_run`; `tiny_run` and `tiny_run_copy`), so they go to one worker together.
_SAME_WORKER = {'test_multihost': 'test_distributed', 'test_evaluate': 'test_infer',
                'test_reliability': 'test_infer', 'test_train': 'test_infer'}
# The longest groups, longest first (one core: the multi-process runs about 190 s, the tiny
# run's users about 130 s, no other module over 30 s), are handed out first so that the many
# short modules fill in beside them, not after them. setup.cfg's --no-loadscope-reorder keeps
# this order: by default xdist hands out the groups with the most tests first.
_FIRST = ('test_distributed', 'test_infer')


def _group(nodeid: str) -> str:
  """The worker group of a test: its module's name, or the module whose fixtures it shares."""
  module = nodeid.split('::', 1)[0].rsplit('/', 1)[-1].removesuffix('.py')
  return _SAME_WORKER.get(module, module)


def pytest_xdist_make_scheduler(config, log):
  """`--dist loadgroup` with the groups above, read from the test ids.

  xdist's own loadgroup groups by `xdist_group` marks, which it passes on by appending them to
  the test ids, and pytest 9.2's ids no longer take that (pytest-xdist issue #1386): every test
  went to any worker, each worker made the shared runs again (one core: 780 s, not 610 s).
  """
  if config.getvalue('dist') != 'loadgroup':
    return None  # xdist's own scheduler for another --dist.
  from xdist.scheduler import LoadScopeScheduling  # pylint: disable=import-outside-toplevel

  class ModuleGroupScheduling(LoadScopeScheduling):
    def _split_scope(self, nodeid: str) -> str:
      return _group(nodeid)

  return ModuleGroupScheduling(config, log)


def pytest_collection_modifyitems(items):
  # Stable: modules stay contiguous, the others in their order.
  items.sort(key=lambda item: _FIRST.index(_group(item.nodeid)) if _group(item.nodeid) in _FIRST
             else len(_FIRST))


def load_config(name: str = 'tiny_test'):
  """`get_config()` of configs/NAME.py, as `--config=configs/NAME.py` would load it."""
  spec = importlib.util.spec_from_file_location(f'configs.{name}', ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@contextlib.contextmanager
def traces_of(function_name: str):
  """A list that gets an entry each time jit traces the function named `function_name` within
  the block: jit traces it again for arguments its cache does not hold (another shape, dtype
  or placement), so again compiles it, whatever JAX's persistent cache (which the tests use)
  would save of that compilation."""
  traces = []
  def listen(event, duration, fun_name='', **kwargs):
    del duration, kwargs
    if event == dispatch.JAXPR_TRACE_EVENT and fun_name == function_name:
      traces.append(fun_name)
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield traces
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


@pytest.fixture
def tiny_config(tmp_path):
  config = load_config('tiny_test')
  config.cache_dir = str(tmp_path / 'cache')
  return config


@pytest.fixture(scope='session')
def _tiny_run_as_trained(tmp_path_factory):
  """The tiny config trained once: (config, workdir, summary); nothing reads this workdir but
  the fixtures below, so it stays as training left it."""
  from mlm_jax import train  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path_factory.mktemp('tiny_run'))
  config = load_config('tiny_test')
  return config, workdir, train.train_and_evaluate(config, workdir)


@pytest.fixture(scope='session')
def tiny_run(_tiny_run_as_trained, tmp_path_factory):
  """A finished run of the tiny config, shared read-only: (config, workdir, summary).

  Checkpoints at steps 10 and 20 and an export.
  """
  config, trained, summary = _tiny_run_as_trained
  workdir = str(tmp_path_factory.mktemp('tiny_run_shared') / 'run')
  shutil.copytree(trained, workdir)
  return config, workdir, summary


@pytest.fixture
def tiny_run_copy(_tiny_run_as_trained, tmp_path) -> pathlib.Path:
  """A private copy of the finished tiny run as training left it, for a test to damage or
  extend (the tests that share `tiny_run` may leave files in theirs: curves.png...)."""
  workdir = tmp_path / 'run'
  shutil.copytree(_tiny_run_as_trained[1], workdir)
  return workdir


GCS_BUCKET = 'test-bucket'


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='session')
def gcs_env():
  """Starts the emulator with one empty bucket; yields the environment that points at it.

  One for the session: gcsfs and epath keep their filesystem (and its folder listings) for the
  process, so a second emulator would answer for the same bucket with other contents. Tests
  keep to their own folder of the bucket.
  """
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  emulator = subprocess.Popen(
      [sys.executable, '-m', 'tests.gcs_emulator', str(port), GCS_BUCKET], cwd=ROOT, env=env,
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 60
    while True:
      try:
        socket.create_connection(('127.0.0.1', port), timeout=1).close()
        break
      except OSError:
        assert time.time() < deadline and emulator.poll() is None, 'the emulator did not start'
        time.sleep(0.1)
    url = f'http://127.0.0.1:{port}'
    yield {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
           'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator'}  # tensorstore then skips credentials.
  finally:
    emulator.kill()
    emulator.wait()


@pytest.fixture(scope='session')
def layout_runs(tmp_path_factory) -> dict:
  """`multidevice.LAYOUT_FLAGS` trained on 1 device x 8 rows, on 8 devices x 1 row replicated
  and fsdp=4-sharded (checkpoints at steps 3 and 6), shared by the layout tests; 'born' is
  the 8-device process's report on a fsdp=4 state as it is created. A local ModernBERT with
  dropout, whole-word masking and document attention trains on 1 device and on 8 fsdp=4."""
  from mlm_jax import train  # pylint: disable=import-outside-toplevel
  from tests import multidevice  # pylint: disable=import-outside-toplevel
  from tests import tiny_models  # pylint: disable=import-outside-toplevel
  runs = {name: tmp_path_factory.mktemp(name) for name in (
      'one_device', 'replicated', 'fsdp', 'modernbert_one_device', 'modernbert_fsdp')}
  modernbert = tiny_models.save_modernbert(str(tmp_path_factory.mktemp('modernbert')), 0.1)
  assert jax.device_count() == 1  # This process's: the one-device runs need no subprocess.
  train.train_and_evaluate(multidevice.layout_config(8, 1), str(runs['one_device']))
  train.train_and_evaluate(multidevice.layout_config(8, 1, modernbert),
                           str(runs['modernbert_one_device']))
  born = multidevice.train_layouts(8, [(1, 1, runs['replicated'], ''), (1, 4, runs['fsdp'], ''),
                                       (1, 4, runs['modernbert_fsdp'], modernbert)])
  return {**runs, 'born': born}


@pytest.fixture(scope='session')
def two_host_run(tmp_path_factory) -> dict:
  """`multidevice.hosts_flags` trained uninterrupted by 2 processes x 2 devices on 127.0.0.1,
  and by this process on 1 device x 8 rows: {'hosts': workdir, 'outputs': [(stdout, stderr)]
  of the hosts, 'one_device': workdir, 'summary': the one-device run's, 'flags': the hosts'
  flags but the workdir, 'model': the pretrained model both adapt}. test_distributed.py checks
  that the hosts train as one process does, add the same words and stop early at the same
  step; test_multihost.py that hosts stopped by SIGTERM resume to the hosts' result (one run
  serves both: a 2-host run costs half a minute of CPU, mostly start-up)."""
  from mlm_jax import train  # pylint: disable=import-outside-toplevel
  from tests import multidevice  # pylint: disable=import-outside-toplevel
  hosts, one_device = tmp_path_factory.mktemp('hosts') / 'run', tmp_path_factory.mktemp('one')
  model = multidevice.hosts_model(str(tmp_path_factory.mktemp('pretrained')))
  assert jax.device_count() == 1
  summary = train.train_and_evaluate(multidevice.hosts_config_on_one_device(model),
                                     str(one_device))
  flags = multidevice.hosts_flags(model)
  address = f'127.0.0.1:{multidevice.free_port()}'
  outputs = multidevice.run_hosts(
      [[sys.executable, 'run_train.py', *flags, f'--workdir={hosts}',
        f'--coordinator_address={address}', '--num_processes=2', f'--process_id={index}']
       for index in range(2)], devices=2, timeout=900)  # A hang guard, not a time limit.
  return {'hosts': hosts, 'outputs': outputs, 'one_device': one_device, 'summary': summary,
          'flags': flags, 'model': model}
