"""The run's config and workdir, checked in one place before any data or model is touched.

Light at import (no jax, no transformers): the entry point checks a config before the
heavy imports of training; the masking checks import `masking` when they run.
"""

import ml_collections

from mlm_jax.data import mixture
from mlm_jax.errors import UserError

DTYPE_NAMES = ('float32', 'bfloat16')  # Computation dtypes (see model.DTYPES).
# models/attention.py's: 'auto' picks per length; 'cudnn' runs on GPU only, 'splash' on TPU.
ATTENTION_IMPLS = ('auto', 'xla', 'blocked', 'cudnn', 'splash')
REMAT_POLICIES = ('none', 'full', 'minimal', 'dots')  # See models/layers.py.
LR_SCHEDULES = ('linear', 'cosine', 'wsd')  # See optim.make_schedule.
WSD_DECAYS = ('1-sqrt', 'linear')  # The decay of lr_schedule='wsd' (optim.WSD_DECAYS).
ATTENTION_SCOPES = ('block', 'document')  # See steps.document_ids.
# Tokens per text of a model trained from scratch, as RoBERTa's: its tokenizer's
# model_max_length (data/preparation.py) and its positions (model.py) agree on it.
SCRATCH_MAX_LENGTH = 512
_AT_LEAST_ONE = ('block_size', 'per_device_batch_size', 'grad_accum_steps', 'eval_batch_size',
                 'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
                 'keep_checkpoints', 'num_proc', 'max_nonfinite_steps', 'fsdp',
                 'tokenizer_vocab_size', 'tokenizer_train_max_texts', 'stop_check_every_steps',
                 'pad_vocab_to_multiple_of')
_AT_LEAST_ZERO = ('warmup_steps', 'weight_decay', 'seed', 'max_eval_blocks',
                  'early_stopping_patience')
PLL_VARIANTS = ('original', 'within_word_l2r')  # See scoring.py.
NEW_TOKEN_INITS = ('subwords', 'mean_cov', 'mean')  # See vocabulary.py.
# The eval losses a best checkpoint can be chosen by ('': none); with a mixture, also each
# source's own, `eval/NAME/loss`.
KEEP_BEST_BY = ('eval_loss', '')


def check_choice(key: str, value, choices: tuple) -> None:
  if value not in choices:
    raise UserError(f'{key}={value!r} is not supported; set --config.{key} to one of '
                    f'{", ".join(choices)}')


def check_scoring(variant: str, batch_size: int) -> None:
  """The flags of PLL scoring (`mlm_jax.score`, `infer.iter_scores`)."""
  if variant not in PLL_VARIANTS:
    raise UserError(f'variant {variant!r} is not supported; pass --variant= one of '
                    f'{", ".join(PLL_VARIANTS)}')
  if batch_size < 1:
    raise UserError(f'batch_size={batch_size} must be at least 1; pass --batch_size=N')


def check_attention_backend(implementation: str, backend: str | None = None) -> None:
  """An `attention_impl` the backend cannot run, in one line. Without `backend`, the one JAX
  will pick (`default_platform`), told without starting it: validation runs before a
  multi-host run joins its cluster, which must come before JAX's backend starts."""
  from mlm_jax.models import attention  # pylint: disable=import-outside-toplevel
  if attention.IMPLS[implementation] is None:
    return  # Runs anywhere.
  backend = backend or default_platform()
  if not attention.runs_on(implementation, backend):
    usable = [name for name in ATTENTION_IMPLS if attention.runs_on(name, backend)]
    needs = '/'.join(attention.IMPLS[implementation]).upper()
    raise UserError(f'attention_impl={implementation!r} needs a {needs} (this backend: '
                    f'{backend}); set --config.attention_impl to one of {", ".join(usable)}')


# The packages that give JAX each accelerator platform, as `jax[cuda12]`, `jax[tpu]` install.
_PLATFORM_PLUGINS = (('tpu', ('libtpu',)),
                     ('gpu', ('jax_cuda13_plugin', 'jax_cuda12_plugin', 'jax_rocm7_plugin')))


def default_platform() -> str:
  """The platform JAX's default backend will be ('tpu', 'gpu' or 'cpu'), from `jax_platforms`
  or else the plugins installed, without starting a backend (`jax.default_backend()` would)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  named = jax.config.jax_platforms
  if named:
    first = named.split(',')[0].strip()
    return {'cuda': 'gpu', 'rocm': 'gpu'}.get(first, first)
  for platform, plugins in _PLATFORM_PLUGINS:
    if any(importlib.util.find_spec(name) for name in plugins):
      return platform
  return 'cpu'


def new_tokens(config: ml_collections.ConfigDict) -> list[str]:
  """The words `add_tokens` (comma-separated) and `add_tokens_file` (one per line) add, in
  order, each once. A file that cannot be read or holds no word, and a word with whitespace
  inside, are `UserError`s."""
  words = [w.strip() for w in config.add_tokens.split(',')]
  if config.add_tokens_file:
    path = config.add_tokens_file
    try:
      from etils import epath  # pylint: disable=import-outside-toplevel  (gs:// too)
      lines = epath.Path(path).read_text(encoding='utf-8').splitlines()
    except (OSError, UnicodeDecodeError, ValueError) as e:
      reason = getattr(e, 'strerror', None) or type(e).__name__
      raise UserError(f'add_tokens_file={path!r} cannot be read ({reason}); pass a UTF-8 text '
                      'file with one token per line') from None
    if not any(line.strip() for line in lines):
      raise UserError(f'add_tokens_file={path!r} is empty; put one token per line in it, or '
                      "set --config.add_tokens_file=''")
    words += [line.strip() for line in lines]
  for word in words:
    if len(word.split()) > 1:
      raise UserError(f'the new token {word!r} holds whitespace; add whole words (one per '
                      'line of add_tokens_file, or comma-separated in add_tokens)')
  return list(dict.fromkeys(w for w in words if w))


def check_new_vocabulary(config: ml_collections.ConfigDict) -> None:
  """`add_tokens`, `add_tokens_file`, `new_token_init` and `pad_vocab_to_multiple_of`."""
  check_choice('new_token_init', config.new_token_init, NEW_TOKEN_INITS)
  changes_vocabulary = new_tokens(config) or config.pad_vocab_to_multiple_of > 1
  if changes_vocabulary and not config.model_name_or_path:
    raise UserError('add_tokens, add_tokens_file and pad_vocab_to_multiple_of extend a '
                    'pretrained model; set --config.model_name_or_path (a tokenizer trained '
                    'from scratch learns the corpus\'s words itself)')


def _check_range(config: ml_collections.ConfigDict) -> None:
  for key in _AT_LEAST_ONE:
    if config[key] < 1:
      raise UserError(f'{key}={config[key]} must be at least 1; set --config.{key}')
  for key in _AT_LEAST_ZERO:
    if config[key] < 0:
      raise UserError(f'{key}={config[key]} must not be negative; set --config.{key}')
  for key in ('learning_rate', 'max_grad_norm'):
    if not config[key] > 0:
      raise UserError(f'{key}={config[key]} must be positive; set --config.{key}')
  test_size = config.test_size
  if not (0 < test_size < 1 or (test_size >= 1 and test_size == int(test_size))):
    raise UserError(f'test_size={test_size} must be a fraction in (0, 1) or a whole count of '
                    'held-out examples; set --config.test_size, e.g. 0.2 or 1000')


def _check_mixture(config: ml_collections.ConfigDict) -> None:
  """A mixture's entries parse (`mixture.parse` names a bad one). It wins over `dataset` (a
  config file's default source), as `data_files` does; beside `data_files` it is ambiguous."""
  if mixture.parse(config.mixture) and config.data_files:
    raise UserError('--config.mixture and --config.data_files both name data files; a mixture '
                    'lists every source itself: drop --config.data_files')


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Rejects every value that would fail later, with the key and the fix."""
  _check_range(config)
  _check_mixture(config)
  from mlm_jax import masking  # pylint: disable=import-outside-toplevel
  masking.check_config(config)  # mlm_probability, the scheme and the 80/10/10 split.
  check_choice('lr_schedule', config.lr_schedule, LR_SCHEDULES)
  check_choice('wsd_decay', config.wsd_decay, WSD_DECAYS)
  if not 0 < config.wsd_decay_fraction <= 1:
    raise UserError(f'wsd_decay_fraction={config.wsd_decay_fraction} must be in (0, 1]: the '
                    'fraction of the steps the rate decays over; set --config.wsd_decay_fraction')
  check_choice('attention_scope', config.attention_scope, ATTENTION_SCOPES)
  check_choice('dtype', config.dtype, DTYPE_NAMES)
  check_choice('attention_impl', config.attention_impl, ATTENTION_IMPLS)
  check_choice('remat_policy', config.remat_policy, REMAT_POLICIES)
  check_attention_backend(config.attention_impl)
  check_new_vocabulary(config)
  if config.num_train_steps == 0 or config.num_train_steps < -1:
    raise UserError(f'num_train_steps={config.num_train_steps} must be positive, or -1 to '
                    'train for num_epochs')
  if config.num_train_steps == -1 and config.num_epochs < 1:
    raise UserError(f'num_epochs={config.num_epochs} must be at least 1')
  losses = KEEP_BEST_BY + tuple(f'eval/{source.name}/loss'
                                for source in mixture.parse(config.mixture) if source.name)
  if config.keep_best_by not in losses:
    raise UserError(f'keep_best_by={config.keep_best_by!r} is not an eval loss; set '
                    f'--config.keep_best_by= one of {", ".join(map(repr, losses))} (\'\': keep '
                    'no best checkpoint)')
  if config.early_stopping_patience and not config.keep_best_by:
    raise UserError(f'early_stopping_patience={config.early_stopping_patience} needs a loss to '
                    'watch; set --config.keep_best_by=eval_loss')
  if config.push_to_hub and not config.hub_model_id:
    raise UserError('push_to_hub=True needs --config.hub_model_id=USER/NAME')
