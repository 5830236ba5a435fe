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
import numpy as np
import optax

from mlm_jax import infer
from mlm_jax import metrics
from mlm_jax import model as model_lib
from mlm_jax import run as run_lib
from mlm_jax import scoring
from mlm_jax import sharding
from mlm_jax import steps as steps_lib
from mlm_jax import storage
from mlm_jax import validation
from mlm_jax.data import input_pipeline
from mlm_jax.data import preparation


def evaluate_model(config: ml_collections.ConfigDict, model: str, step: int | None = None,
                   log: Callable[[str], None] = print, pll: bool = False) -> dict:
  """The eval figures (`metrics.summarize_eval`'s, and `eval_blocks`) of `model` (a
  training workdir, at `step` or its latest checkpoint; an HF-format directory; a hub
  id) on `config`'s test split, computed in `config.dtype`; with a mixture, over every
  source's test split, and each source's as `eval/NAME/...` (`steps.evaluate_sources`);
  with `pll`, also the same blocks' pseudo-perplexity (`pseudo_perplexity`).

  A tiny untrained RoBERTa saved in HF format (no hub), evaluated on the held-out part of
  the sample that ships with the package, as `configs/default.py` has it (run from the
  repository's root, where `configs` is):

  >>> import tempfile
  >>> import transformers
  >>> from configs import default
  >>> from mlm_jax import evaluation
  >>> from mlm_jax.data import tokenizer as tokenizer_lib
  >>> from mlm_jax.models import FlaxAutoModelForMaskedLM
  >>> directory = tempfile.mkdtemp()
  >>> tokenizer = tokenizer_lib.train_bpe_tokenizer(
  ...     ['the sky is blue', 'the sea is blue', 'grass is green'] * 20, vocab_size=300,
  ...     model_max_length=64)
  >>> _ = tokenizer.save_pretrained(directory)
  >>> config = transformers.RobertaConfig(
  ...     vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
  ...     intermediate_size=32, max_position_embeddings=66, pad_token_id=tokenizer.pad_token_id)
  >>> FlaxAutoModelForMaskedLM.from_config(config, seed=0).save_pretrained(directory)
  >>> run_config = default.get_config()
  >>> run_config.block_size, run_config.split = 32, 'train[:40]'
  >>> run_config.cache_dir = tempfile.mkdtemp()
  >>> figures = evaluation.evaluate_model(run_config, directory, log=lambda message: None)
  >>> sorted(figures)
  ['eval_accuracy', 'eval_blocks', 'eval_loss', 'eval_masked_tokens', 'eval_perplexity']
  >>> bool(figures['eval_perplexity'] > 1)
  True
  """
  validation.validate_config(config)
  predictor = infer.load_predictor(model, step, dtype=model_lib.compute_dtype(config.dtype),
                                   attention_impl=config.attention_impl)
  # Refused before any data is read or tokenized.
  model_lib.check_block_size(config.block_size, predictor.model.config)
  model_lib.check_vocabulary(predictor.tokenizer, predictor.model.config)
  prepared = preparation.prepare_sources(config, predictor.tokenizer, log,
                                         check_tokenizer=run_lib.tokenizer_check(config))
  # The training steps, for their eval step; the train step is never called, so never
  # compiled, and needs no real optimizer.
  steps = steps_lib.compile_steps(
      predictor.model, optax.identity(), optax.constant_schedule(0.0),
      run_lib.masking_spec(config, predictor.tokenizer), config.seed, sharding.make_mesh(),
      sep_id=run_lib.document_separator(config, predictor.tokenizer))
  evaluated = [input_pipeline.evaluated_blocks(len(s.blocks.test), config.max_eval_blocks)
               for s in prepared.sources]
  rows = steps_lib.eval_rows_that_fit(steps, predictor.params, run_lib.eval_batch_size(config),
                                      config.block_size, log, blocks=max(evaluated))
  figures = steps_lib.evaluate_sources(steps, predictor.params, prepared.sources, rows,
                                       config.max_eval_blocks, config.seed)
  figures = {**figures, 'eval_blocks': sum(evaluated)}
  if pll:
    figures.update(pseudo_perplexity(predictor, np.concatenate(
        [evaluated_block_ids(s.blocks.test, config) for s in prepared.sources])))
  return figures


def evaluated_block_ids(test, config: ml_collections.ConfigDict) -> np.ndarray:
  """[n, block_size]: the test blocks the eval figures are of (all, or the seeded
  `max_eval_blocks`), as `input_pipeline.eval_batches` reads them."""
  batches = input_pipeline.eval_batches(test, run_lib.eval_batch_size(config),
                                        config.max_eval_blocks, config.seed)
  return np.concatenate([ids.reshape(-1, ids.shape[-1])[weights.ravel() > 0]
                         for ids, weights in batches])


def pseudo_perplexity(predictor: infer.Predictor, blocks: np.ndarray) -> dict:
  """The blocks' pseudo-perplexity (every token but the special ones masked in turn:
  `scoring`), exp(-summed PLL / scored tokens), and the number of scored tokens."""
  encoded = scoring.encode_blocks(blocks, predictor.tokenizer.all_special_ids)
  scores = list(infer.iter_scores(predictor, encoded))
  return {'eval_pseudo_perplexity': scoring.corpus_pseudo_perplexity(scores),
          'eval_pll_tokens': sum(s.tokens for s in scores)}


def describe(figures: dict, block_size: int) -> str:
  """The figures in one line, for the console (a mixture's sources' perplexities after)."""
  sources = ''.join(f'; {name}: perplexity {own["perplexity"]:.4f}'
                    for name, own in metrics.by_source(figures).items())
  return (f'perplexity {figures["eval_perplexity"]:.4f}, masked-token accuracy '
          f'{figures["eval_accuracy"]:.4f}, loss {figures["eval_loss"]:.4f} over '
          f'{figures["eval_masked_tokens"]:,.0f} masked tokens in {figures["eval_blocks"]:,} '
          f'test blocks of {block_size} tokens{sources}' + (
              f'; pseudo-perplexity {figures["eval_pseudo_perplexity"]:.4f} over '
              f'{figures["eval_pll_tokens"]:,} tokens, each masked in turn'
              if 'eval_pseudo_perplexity' in figures else ''))


def write_json(path: str, model: str, step: int | None, figures: dict) -> None:
  """The figures with what they are of, as JSON at `path` (local or `gs://`)."""
  record = {'model': model, 'step': step, **figures}
  target = storage.path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_text(json.dumps(record, indent=2) + '\n')
