"""Tokenizes a corpus into the cache ahead of training, so a pod does not wait on one host.

    python -m mlm_jax.prepare --config=configs/NAME.py [--config.KEY=VALUE ...]

writes exactly what `run_train.py` with the same config would prepare (the tokenizer
trained from scratch, if any, and the token blocks of both splits, of each source of a
mixture) and prints where;
`run_train.py` then starts from it without tokenizing.
"""

import sys

from absl import app
from ml_collections import config_flags

from mlm_jax import cli
from mlm_jax import validation

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file (a Python file with get_config()), as run_train.py takes; '
    'override keys with --config.KEY=VALUE.', lock_config=True)


def main(argv) -> None:
  del argv
  if _CONFIG.value is None:
    cli.fail('pass --config=configs/NAME.py (the config run_train.py will use)')
  cli.run_user_facing(lambda: validation.validate_config(_CONFIG.value))
  # Imported once the config is known good: transformers and friends take seconds.
  from mlm_jax.data import preparation  # pylint: disable=import-outside-toplevel
  cli.quiet_libraries()
  # Says where the tokenizer and blocks are, as it finds or writes them.
  cli.run_user_facing(lambda: preparation.prepare_sources(_CONFIG.value, log=_print))


def _print(message: str) -> None:
  print(message, flush=True)


if __name__ == '__main__':
  sys.path.insert(0, '.')  # So config files can import each other as `configs.*`.
  cli.check_config_file(sys.argv)
  app.run(main)
