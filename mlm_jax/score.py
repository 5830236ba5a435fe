"""Scores texts by their pseudo-log-likelihood under a masked LM (see `mlm_jax/scoring.py`
and docs/scoring.md).

    python -m mlm_jax.score --model=WORKDIR|EXPORT_DIR|HUB_ID (--text=... | --input_file=F) \
        [--json] [--variant=original|within_word_l2r] [--step=N] [--batch_size=N]

Per text: `pll` (the summed log-probability of each non-special token, masked in turn),
`tokens` (how many were scored) and `pseudo_perplexity` = exp(-pll / tokens); with --json
one JSON object per line, else a table. Results print as each window of texts is done.
"""

import json

from absl import app, flags

from mlm_jax import cli
from mlm_jax import host_memory

_MODEL = flags.DEFINE_string('model', None, 'A training workdir (its latest checkpoint, or '
                             '--step), an HF-format model directory (such as WORKDIR/export) '
                             'or a hub id.', required=True)
_TEXT = flags.DEFINE_multi_string('text', [], 'A text to score; repeat for several.')
_INPUT_FILE = flags.DEFINE_string('input_file', None, 'A UTF-8 file with one text per line.')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object per text (text, pll, tokens, '
                          'pseudo_perplexity) instead of a table.')
_VARIANT = flags.DEFINE_string('variant', 'original', 'original: each token masked alone '
                               '(Salazar et al. 2020); within_word_l2r: also the later pieces '
                               'of its word (Kauf & Ivanova 2023).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step of a workdir (default: the latest).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 128, 'Masked copies per forward pass (a text '
                                   'of n tokens makes n copies).')


def main(argv) -> None:
  del argv
  host_memory.keep_freed_memory_if_on_cpu()  # Before JAX's threads start (see host_memory).
  cli.use_compilation_cache()
  cli.quiet_libraries()
  def score_and_print():
    texts, scores = cli.score(_MODEL.value, _TEXT.value, _INPUT_FILE.value, _VARIANT.value,
                              _STEP.value, _BATCH_SIZE.value)
    if not _JSON.value:
      print(f'{"pll":>12} {"tokens":>6} {"pseudo-ppl":>12}  text')
    for text, score in zip(texts, scores):
      if _JSON.value:
        print(json.dumps({'text': text, 'pll': score.pll, 'tokens': score.tokens,
                          'pseudo_perplexity': score.pseudo_perplexity}), flush=True)
      else:
        print(f'{score.pll:12.4f} {score.tokens:6d} {score.pseudo_perplexity:12.4f}  {text}',
              flush=True)
  cli.run_user_facing(score_and_print)


if __name__ == '__main__':
  app.run(main)
