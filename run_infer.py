"""Fills in <mask> with a model's top-k predictions.

  python run_infer.py --model=WORKDIR_OR_DIR_OR_HUB_ID --text="The Milky Way is a <mask> galaxy." --top_k=3
"""

import json
import sys
import textwrap

from absl import app, flags

from mlm_jax import cli
from mlm_jax import host_memory
from mlm_jax import memory

flags.DEFINE_string('model', None, 'A training workdir, an HF-format directory or a hub id.',
                    required=True)
flags.DEFINE_multi_string('text', [], 'A text with <mask> in it; repeat for several.')
flags.DEFINE_string('input_file', None, 'A UTF-8 file with one text per line.')
flags.DEFINE_integer('top_k', 5, 'How many fills to give per mask.')
flags.DEFINE_list('targets', None, 'Score only these words (comma-separated).')
flags.DEFINE_bool('targets_by_pll', False, 'Score each of --targets whole, all its pieces in '
                  'the mask\'s place (their pseudo-log-likelihood, within_word_l2r; see '
                  'docs/scoring.md), rather than by its first piece as the transformers '
                  'pipeline does. Texts with one <mask>.')
flags.DEFINE_integer('step', None, 'Checkpoint step of a workdir (default: the latest).')
flags.DEFINE_bool('json', False, 'Print JSON instead of a table.')
flags.DEFINE_integer('batch_size', 64, 'Texts per forward pass; results print as each batch '
                     'is done, so memory stays bounded for a long --input_file.')
FLAGS = flags.FLAGS


def _print_fills(texts, fills, as_json: bool) -> None:
  """Prints each text's fills as its batch is done (the first batch runs before any output,
  so a bad text fails with nothing printed)."""
  from mlm_jax import infer  # pylint: disable=import-outside-toplevel
  for number, (text, masks) in enumerate(zip(texts, fills)):
    if as_json:  # One JSON array, written item by item.
      item = textwrap.indent(json.dumps({'text': text, 'masks': masks}, indent=2), '  ')
      sys.stdout.write(('[\n' if number == 0 else ',\n') + item)
    else:
      sys.stdout.write(('' if number == 0 else '\n') + infer.format_table([text], [masks]))
    sys.stdout.flush()
  if as_json:
    sys.stdout.write('\n]\n')


def main(argv):
  del argv
  host_memory.keep_freed_memory_if_on_cpu()  # Before JAX's threads start (see host_memory).
  cli.use_compilation_cache()  # A model seen before runs without compiling again.
  cli.quiet_libraries()
  def fill_and_print():
    texts, fills = cli.fill_mask(FLAGS.model, FLAGS.text, FLAGS.input_file, FLAGS.top_k,
                                 FLAGS.targets, FLAGS.step, FLAGS.batch_size,
                                 FLAGS.targets_by_pll)
    _print_fills(texts, fills, FLAGS.json)
  cli.run_user_facing(fill_and_print, out_of_memory=memory.INFER_ADVICE)


if __name__ == '__main__':
  app.run(main)
