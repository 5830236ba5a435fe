"""A model's perplexity and masked-token accuracy on a config's held-out split, without
training: what the Hugging Face guide's `trainer.evaluate()` gives (the entry point is
`python -m mlm_jax.evaluate`).

The figures are the ones a training run records, computed the same way: the test
blocks as training prepares them (with the model's own tokenizer; a workdir's saved
one), the same fixed seeded subset of them (`max_eval_blocks`), the same fixed eval
masks (`steps.EVAL_STREAM` of the config's seed) and the same compiled eval step. So
`evaluate` on a training workdir, or on its export, gives exactly the last perplexity
that training logged, and models evaluated under one config compare.
"""

import json
from typing import Callable

import ml_collections
import optax

from mlm_jax import infer
from mlm_jax import masking
from mlm_jax import model as model_lib
from mlm_jax import run as run_lib
from mlm_jax import sharding
from mlm_jax import steps as steps_lib
from mlm_jax import storage
from mlm_jax import validation
from mlm_jax.data import input_pipeline
from mlm_jax.data import preparation


def evaluate_model(config: ml_collections.ConfigDict, model: str, step: int | None = None,
                   log: Callable[[str], None] = print) -> dict:
  """The eval figures (`metrics.summarize_eval`'s, and `eval_blocks`) of `model` (a
  training workdir, at `step` or its latest checkpoint; an HF-format directory; a hub
  id) on `config`'s test split, computed in `config.dtype`."""
  validation.validate_config(config)
  predictor = infer.load_predictor(model, step, dtype=model_lib.compute_dtype(config.dtype),
                                   attention_impl=config.attention_impl)
  # Refused before any data is read or tokenized.
  model_lib.check_block_size(config.block_size, predictor.model.config)
  model_lib.check_vocabulary(predictor.tokenizer, predictor.model.config)
  prepared = preparation.prepare(config, predictor.tokenizer, log,
                                 check_tokenizer=run_lib.tokenizer_check(config))
  # The training steps, for their eval step; the train step is never called, so never
  # compiled, and needs no real optimizer.
  steps = steps_lib.compile_steps(
      predictor.model, optax.identity(), optax.constant_schedule(0.0),
      masking.spec_from_config(predictor.tokenizer, config), config.seed, sharding.make_mesh(),
      sep_id=run_lib.document_separator(config, predictor.tokenizer))
  test = prepared.blocks.test
  evaluated = input_pipeline.evaluated_blocks(len(test), config.max_eval_blocks)
  rows = steps_lib.eval_rows_that_fit(steps, predictor.params, run_lib.eval_batch_size(config),
                                      config.block_size, log, blocks=evaluated)
  figures = steps_lib.evaluate(steps, predictor.params, test, rows, config.max_eval_blocks,
                               config.seed)
  return {**figures, 'eval_blocks': evaluated}


def describe(figures: dict, block_size: int) -> str:
  """The figures in one line, for the console."""
  return (f'perplexity {figures["eval_perplexity"]:.4f}, masked-token accuracy '
          f'{figures["eval_accuracy"]:.4f}, loss {figures["eval_loss"]:.4f} over '
          f'{figures["eval_masked_tokens"]:,.0f} masked tokens in {figures["eval_blocks"]:,} '
          f'test blocks of {block_size} tokens')


def write_json(path: str, model: str, step: int | None, figures: dict) -> None:
  """The figures with what they are of, as JSON at `path` (local or `gs://`)."""
  record = {'model': model, 'step': step, **figures}
  target = storage.path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_text(json.dumps(record, indent=2) + '\n')
