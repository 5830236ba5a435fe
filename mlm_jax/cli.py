"""What the entry points share: multi-host start-up and one-line errors for user mistakes."""

import ast
import difflib
import importlib.util
import logging
import os
import socket
import sys
import time
from typing import Callable, NoReturn, TypeVar

import jax

from mlm_jax import errors
from mlm_jax import memory
from mlm_jax import preemption
from mlm_jax import validation
from mlm_jax.errors import UserError

T = TypeVar('T')

# How long a host that is done waits at JAX's shutdown barrier for the others (JAX's default:
# 300 s). Hosts that finish, stop or fail together reach it within seconds of each other. A host
# that fails alone (within the step loop) leaves the others in a collective that never ends, and
# the barrier's timeout is what ends them all: JAX's coordination service then terminates them.
SHUTDOWN_TIMEOUT_S = 60


def quiet_libraries() -> None:
  """Keeps the console for this program's own messages and real warnings.

  Orbax logs every file it writes, and transformers its notices on tokenizers and configs.
  A failed checkpoint save (a full disk) is reported once, as one line (`checkpoint.save_errors`),
  not also by orbax's background threads (see `_OrbaxTracebacks`, `_ignore_closed_loop`).
  """
  import transformers  # pylint: disable=import-outside-toplevel
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_logging.set_verbosity(absl_logging.ERROR)
  for logger in (absl_logging.get_absl_logger(), logging.getLogger('asyncio')):
    if not any(isinstance(f, _OrbaxTracebacks) for f in logger.filters):
      logger.addFilter(_OrbaxTracebacks())
  if sys.unraisablehook is not _ignore_closed_loop:
    _ignore_closed_loop.default = sys.unraisablehook
    sys.unraisablehook = _ignore_closed_loop
  transformers.utils.logging.set_verbosity_error()


class _OrbaxTracebacks(logging.Filter):
  """Drops the tracebacks logged for a failed save. Orbax logs the failure of each thread of
  an asynchronous save with its traceback (a full disk: seven of them, 350 lines), and asyncio
  its write tasks whose failure nobody awaited ('Task exception was never retrieved'), while
  orbax raises the same failure in the main thread, where the entry points report it as one
  line. Orbax's other logged failures (an old checkpoint it could not delete) are not raised
  again, and stay."""
  RAISED_AGAIN = ('/orbax/checkpoint/_src/futures/future.py',
                  '/orbax/checkpoint/_src/checkpointers/async_checkpointer.py',
                  '/orbax/checkpoint/checkpoint_manager.py',
                  '/orbax/checkpoint/_src/metadata/checkpoint.py')

  def filter(self, record: logging.LogRecord) -> bool:
    where = record.pathname.replace(os.sep, '/')
    if record.exc_info and where.endswith(self.RAISED_AGAIN):
      return False
    message = record.getMessage()
    unawaited = message.startswith('Task exception was never retrieved')
    return not (record.name == 'asyncio' and unawaited and '/orbax/' in message)


def _ignore_closed_loop(unraisable) -> None:
  """`sys.unraisablehook` less one message: when a save fails, orbax closes the event loop of
  its writes while tensorstore still completes the others, and each completion's call onto the
  closed loop raises 'Event loop is closed' in a callback, which nothing can catch."""
  error = unraisable.exc_value
  if isinstance(error, RuntimeError) and str(error) == 'Event loop is closed':
    return
  _ignore_closed_loop.default(unraisable)


def use_compilation_cache() -> None:
  """JAX's persistent compilation cache in `$MLM_JAX_CACHE/jax` (default ~/.cache/mlm_jax/jax),
  unless JAX_COMPILATION_CACHE_DIR names another: a program compiled once (the forward of a
  model at a padded shape, seconds at distilroberta-base size) is read back by later runs.
  Call it before anything is compiled."""
  if jax.config.jax_compilation_cache_dir:
    return
  root = os.environ.get('MLM_JAX_CACHE') or os.path.join(os.path.expanduser('~'), '.cache',
                                                          'mlm_jax')
  jax.config.update('jax_compilation_cache_dir', root.rstrip('/') + '/jax')
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)


def run_user_facing(fn: Callable[[], T], out_of_memory: str = memory.TRAIN_ADVICE) -> T:
  """Runs `fn`; a `UserError` becomes one line on stderr and exit status 2, and so does a full
  disk wherever it is met (the checkpoints and the export say more: `checkpoint.save_errors`,
  `train.train_and_evaluate`), and running out of device or host memory, with the
  `out_of_memory` advice (`memory.*_ADVICE`: what to lower).

  A run stopped by a signal (after saving) exits with 128 + the signal's number.
  """
  try:
    return fn()
  except UserError as e:
    fail(str(e))
  except preemption.Stopped as e:
    print(str(e), file=sys.stderr, flush=True)
    sys.exit(e.exit_code)
  except Exception as e:  # pylint: disable=broad-except
    if memory.is_out_of_memory(e):
      fail(memory.out_of_memory_message(e, out_of_memory))
    if not errors.is_disk_full(e):
      raise
    fail(f'a disk is full ({errors.described(e)}); free disk space and rerun the same command')


def _flag_value(argv: list[str], name: str) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
    if arg == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def check_config_file(argv: list[str]) -> None:
  """Exits with one line if --config names a file that is missing or has no get_config().

  absl would otherwise print several lines and a traceback for either.
  """
  path = _flag_value(argv, 'config')
  if path is None:
    return
  path = path.split(':', 1)[0]  # `file.py:arg` passes an argument to get_config.
  try:
    with open(path, encoding='utf-8') as f:
      tree = ast.parse(f.read(), filename=path)
  except OSError as e:
    fail(f'config file {path!r} cannot be read ({e.strerror}); pass --config=configs/NAME.py')
  except SyntaxError as e:
    fail(f'config file {path!r} is not valid Python (line {e.lineno}: {e.msg})')
  if not any(isinstance(node, ast.FunctionDef) and node.name == 'get_config'
             for node in tree.body):
    fail(f'config file {path!r} has no get_config() function; define one that returns an '
         'ml_collections.ConfigDict (see configs/default.py)')


def _config_keys(config, prefix: str = '') -> list[str]:
  """Every dotted key of a ConfigDict, nested ones included."""
  keys = []
  for name, value in config.items():
    keys.append(prefix + name)
    if hasattr(value, 'items'):
      keys += _config_keys(value, f'{prefix}{name}.')
  return keys


def load_config_file(spec: str):
  """`get_config()` of `path[:arg]`, as --config loads it."""
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('mlm_jax_config_file', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def check_config_overrides(argv: list[str], default_config: str) -> None:
  """Exits with one line naming a misspelled --config.KEY and the closest valid keys.

  absl would print a 49-line traceback for it. Run after `check_config_file`.
  """
  overrides = [arg[len('--config.'):].split('=', 1)[0] for arg in argv
               if arg.startswith('--config.')]
  if not overrides:
    return
  valid = _config_keys(load_config_file(_flag_value(argv, 'config') or default_config))
  for key in overrides:
    if key not in valid:
      closest = (difflib.get_close_matches(key, valid, n=3)
                 or difflib.get_close_matches(key, valid, n=3, cutoff=0.0))
      fail(f'--config.{key} is not a config key; the closest are '
           f'{", ".join(closest)} (all keys: configs/default.py)')


def fail(message: str) -> NoReturn:
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


# `_cluster_env`'s answer where jax's private cluster detection is not there as expected.
_DETECTION_UNAVAILABLE = object()


def _cluster_env():
  """The cluster JAX's own detection recognises here (SLURM, Open MPI, Cloud TPU, ...), if any.

  The same checks, in the same order, as `jax.distributed.initialize()` without
  arguments. JAX has no public API that only detects: `initialize()` detects and joins in
  one call, and aborts the whole process where the coordinator it finds does not answer,
  which `_wait_for_coordinator` turns into one line first. So this reads the private
  `jax._src.clusters`, guarded: where a jax release changes it, one line says so and
  `_DETECTION_UNAVAILABLE` sends the caller to `initialize()`'s own detection.
  """
  try:
    from jax._src import clusters  # pylint: disable=import-outside-toplevel
    return next((env for env in clusters.ClusterEnv._cluster_types  # pylint: disable=protected-access
                 if not env.opt_in_only_method and env.is_env_present()), None)
  except Exception as e:  # pylint: disable=broad-except
    print(f'note: jax {jax.__version__} has changed the private cluster detection this '
          f'package reads ({errors.described(e)}); jax.distributed.initialize() detects the '
          'cluster itself, without the check that its coordinator answers',
          file=sys.stderr, flush=True)
    return _DETECTION_UNAVAILABLE


def _wait_for_coordinator(address: str, timeout_s: int) -> None:
  """Waits until process 0's coordinator accepts connections.

  JAX aborts the whole process (a C++ check failure, no Python exception) when the
  coordinator cannot be reached, so the one case that is common and fixable, a worker
  started without a reachable process 0, is checked here first.
  """
  host, port = address.rsplit(':', 1)
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip('[]'), int(port)), timeout=2):
        return
    except OSError as e:
      if time.monotonic() > deadline:
        raise UserError(f'the coordinator (process 0) at {address} did not answer within '
                        f'{timeout_s} s ({e.strerror or e}); start process 0, check the '
                        'address, or raise --distributed_timeout_s') from None
      time.sleep(0.5)


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None, timeout_s: int = 300) -> None:
  """Joins a multi-host run: from flags, or where JAX detects the cluster; else one process.

  A cluster that is named or detected but cannot be joined is a `UserError`: N hosts
  silently training as N single-process runs would write over each other's workdir.
  """
  explicit = coordinator_address or num_processes or process_id is not None
  if explicit and not (coordinator_address and num_processes and process_id is not None):
    raise UserError('a multi-host run needs all of --coordinator_address, --num_processes '
                    'and --process_id (or none of them, where JAX detects the cluster)')
  env = None if explicit else _cluster_env()
  if not explicit and env is None:
    return  # A single-process run.
  if env is _DETECTION_UNAVAILABLE:
    _initialize_as_detected(timeout_s)
    return
  what = 'the coordinator given by the flags' if explicit else f'the {env.__name__} JAX detected'
  try:
    if env is not None:
      coordinator_address, _, process_id = env.auto_detect_unset_distributed_params(
          None, None, None, None, None, timeout_s)[:3]
    if process_id != 0:
      _wait_for_coordinator(coordinator_address, timeout_s)
    jax.distributed.initialize(*((coordinator_address, num_processes, process_id)
                                 if explicit else ()), initialization_timeout=timeout_s,
                               shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'could not join {what} ({errors.described(e)}); check '
                    'that jax.distributed can start here (before any JAX computation), or '
                    'pass --coordinator_address, --num_processes and --process_id') from None
  _compile_alike_on_every_host()


def _compile_alike_on_every_host() -> None:
  """Leaves the Python callers' source lines out of the compiled programs' locations (op
  names stay). With jax 0.12.1, hosts whose programs differ in them never complete a collective
  over gloo, and they can differ between hosts running the same code: each host's persistent
  compilation cache, whose key ignores them, may hold a program traced from other lines."""
  jax.config.update('jax_traceback_in_locations_limit', 0)


def _initialize_as_detected(timeout_s: int) -> None:
  """`jax.distributed.initialize()` with its own cluster detection; no cluster found (its
  ValueError asking for a coordinator address) is a single-process run."""
  try:
    jax.distributed.initialize(initialization_timeout=timeout_s,
                               shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
  except ValueError:
    return
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'could not join the cluster jax.distributed detected '
                    f'({errors.described(e)}); pass --coordinator_address, --num_processes '
                    'and --process_id') from None
  _compile_alike_on_every_host()


def train(config, workdir: str | None, coordinator_address: str | None = None,
          num_processes: int | None = None, process_id: int | None = None,
          distributed_timeout_s: int = 300) -> dict:
  """Joins the cluster if any, then trains; `workdir=None` makes a new one under ./runs."""
  validation.validate_config(config)  # Before the heavy imports, let alone data or model.
  from mlm_jax import train as train_lib  # pylint: disable=import-outside-toplevel
  initialize_distributed(coordinator_address, num_processes, process_id, distributed_timeout_s)
  if workdir is None:
    if jax.process_count() > 1:  # Each host would pick its own timestamp.
      raise UserError('a multi-host run needs --workdir, on storage that every host sees '
                      '(a GCS bucket, NFS)')
    workdir = os.path.join('runs', time.strftime('%Y%m%d-%H%M%S'))
  if jax.process_index() == 0:
    print(f'Workdir: {workdir}', flush=True)
  return train_lib.train_and_evaluate(config, workdir)


def read_texts(texts: list[str], input_file: str | None,
               example: str = '... <mask> ...') -> list[str]:
  """The --text values, then the lines of --input_file (`example`: a --text for the error
  when there are none)."""
  texts = list(texts)
  if input_file:
    try:
      with open(input_file, encoding='utf-8') as f:
        texts += [line.rstrip('\n') for line in f if line.strip()]
    except FileNotFoundError:
      raise UserError(f'input file {input_file!r} does not exist; pass a file with one text '
                      'per line') from None
    except UnicodeDecodeError:
      raise UserError(f'input file {input_file!r} is not UTF-8 text; re-encode it as UTF-8'
                      ) from None
  if not texts:
    raise UserError(f'no text given; pass --text="{example}" or --input_file=FILE')
  return texts


def fill_mask(model: str, texts: list[str], input_file: str | None, top_k: int,
              targets: list[str] | None, step: int | None, batch_size: int,
              targets_by_pll: bool = False):
  """(texts, an iterator of their fills) for the run_infer.py entry point; with
  `targets_by_pll`, targets of several pieces are scored whole (`infer.iter_fill_targets_by_pll`)."""
  from mlm_jax import infer  # pylint: disable=import-outside-toplevel
  texts = read_texts(texts, input_file)
  if targets_by_pll and not targets:
    raise UserError('--targets_by_pll scores the --targets; pass --targets=WORD,WORD')
  predictor = infer.load_predictor(model, step)
  if targets_by_pll:
    return texts, infer.iter_fill_targets_by_pll(predictor, texts, targets, top_k)
  return texts, infer.iter_fill_mask(predictor, texts, top_k, targets, batch_size)


def score(model: str, texts: list[str], input_file: str | None, variant: str,
          step: int | None, batch_size: int):
  """(texts, an iterator of their `scoring.Score`s) for the `mlm_jax.score` entry point; the
  texts are all read and checked before the model is loaded."""
  from mlm_jax import infer  # pylint: disable=import-outside-toplevel
  texts = read_texts(texts, input_file, example='A sentence to score.')
  validation.check_scoring(variant, batch_size)  # Before the model is loaded.
  predictor = infer.load_predictor(model, step)
  return texts, infer.score_texts(predictor, texts, variant, batch_size)
