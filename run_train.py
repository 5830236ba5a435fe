"""Fine-tunes a masked language model: `python run_train.py [--config=...] [--workdir=...]`."""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from mlm_jax import cli
from mlm_jax import host_memory
from mlm_jax import validation

_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_CONFIG = os.path.join(_HERE, 'configs', 'default.py')
if __name__ == '__main__':  # Before DEFINE_config_file, which applies the overrides at once.
  sys.path.insert(0, _HERE)  # So config files can import each other as `configs.*`.
  cli.check_config_file(sys.argv)
  cli.check_config_overrides(sys.argv, _DEFAULT_CONFIG)
config_flags.DEFINE_config_file(
    'config', _DEFAULT_CONFIG,
    'Config file (a Python file with get_config()); override keys with --config.KEY=VALUE.',
    lock_config=True)
flags.DEFINE_string('workdir', None,
                    'Where checkpoints, metrics and the export go; rerun with the same '
                    'workdir to resume. Default: a new folder under ./runs.')
flags.DEFINE_string('coordinator_address', None,
                    'HOST:PORT of process 0, for multi-host runs that JAX does not detect.')
flags.DEFINE_integer('num_processes', None, 'Number of processes of a multi-host run.')
flags.DEFINE_integer('process_id', None, 'This process\'s index in a multi-host run.')
flags.DEFINE_integer('distributed_timeout_s', 300,
                     'Seconds to wait for every process of a multi-host run to join.')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  host_memory.keep_freed_memory_if_on_cpu()  # Before JAX's threads start (see host_memory).
  cli.run_user_facing(lambda: validation.validate_config(FLAGS.config))  # In the first second.
  cli.quiet_libraries()
  cli.use_compilation_cache()  # A rerun or a resumed run starts without compiling again.
  cli.run_user_facing(
      lambda: cli.train(FLAGS.config, FLAGS.workdir, FLAGS.coordinator_address,
                        FLAGS.num_processes, FLAGS.process_id,
                        FLAGS.distributed_timeout_s))


if __name__ == '__main__':
  app.run(main)
