"""Evaluates a model without training it: its perplexity and masked-token accuracy on a
config's held-out split, as `trainer.evaluate()` gives them in the Hugging Face guide.

    python -m mlm_jax.evaluate --model=WORKDIR|EXPORT_DIR|HUB_ID --config=configs/NAME.py \
        [--step=N] [--json=PATH] [--metric=guide|pll] [--config.KEY=VALUE ...]

The figures are those a training run with the same config records at its evaluations
(the same blocks and eval masks: see `mlm_jax/evaluation.py`), so a pretrained model
before fine-tuning, a workdir's checkpoints and its export all compare. `--metric=pll` adds
the same blocks' pseudo-perplexity (docs/scoring.md), which depends on no random mask.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from mlm_jax import cli
from mlm_jax import memory
from mlm_jax import validation

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               'configs', 'default.py')
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file (a Python file with get_config()) whose held-out split, '
    'masking and eval settings to use, as run_train.py takes; override keys with '
    '--config.KEY=VALUE.', lock_config=True)
_MODEL = flags.DEFINE_string('model', None, 'A training workdir (its latest checkpoint, or '
                             '--step), an HF-format model directory (such as WORKDIR/export) '
                             'or a hub id.')
_STEP = flags.DEFINE_integer('step', None, 'The checkpoint step of a training workdir '
                             '(default: its latest).')
_JSON = flags.DEFINE_string('json', None, 'Also write the figures to this JSON file.')
_METRIC = flags.DEFINE_enum('metric', 'guide', ['guide', 'pll'], 'guide: the guide\'s '
                            'perplexity and accuracy under the fixed eval masks; pll: also the '
                            'same blocks\' pseudo-perplexity, every non-special token masked in '
                            'turn (docs/scoring.md; one forward pass per token, so slower).')


def main(argv) -> None:
  del argv
  if _CONFIG.value is None:
    cli.fail('pass --config=configs/NAME.py (the config whose held-out split to evaluate on)')
  if not _MODEL.value:
    cli.fail('pass --model=WORKDIR, an HF-format model directory or a hub id')
  config = _CONFIG.value
  cli.run_user_facing(lambda: validation.validate_config(config))
  # Imported once the config is known good: transformers and friends take seconds.
  from mlm_jax import evaluation  # pylint: disable=import-outside-toplevel
  cli.quiet_libraries()
  figures = cli.run_user_facing(
      lambda: evaluation.evaluate_model(config, _MODEL.value, _STEP.value, log=_print,
                                        pll=_METRIC.value == 'pll'),
      out_of_memory=memory.EVAL_ADVICE)
  _print(f'{_MODEL.value}: {evaluation.describe(figures, config.block_size)}')
  if _JSON.value:
    cli.run_user_facing(
        lambda: evaluation.write_json(_JSON.value, _MODEL.value, _STEP.value, figures))


def _print(message: str) -> None:
  print(message, flush=True)


if __name__ == '__main__':
  sys.path.insert(0, '.')  # So config files can import each other as `configs.*`.
  cli.check_config_file(sys.argv)
  cli.check_config_overrides(sys.argv, _DEFAULT_CONFIG)
  app.run(main)
