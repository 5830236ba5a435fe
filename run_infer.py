"""Fills in <mask> with a model's top-k predictions.

  python run_infer.py --model=WORKDIR_OR_DIR_OR_HUB_ID --text="The Milky Way is a <mask> galaxy." --top_k=3
"""

import json
import sys

from absl import app, flags

from mlm_jax import cli

flags.DEFINE_string('model', None, 'A training workdir, an HF-format directory or a hub id.',
                    required=True)
flags.DEFINE_multi_string('text', [], 'A text with <mask> in it; repeat for several.')
flags.DEFINE_string('input_file', None, 'A UTF-8 file with one text per line.')
flags.DEFINE_integer('top_k', 5, 'How many fills to give per mask.')
flags.DEFINE_list('targets', None, 'Score only these words (comma-separated).')
flags.DEFINE_integer('step', None, 'Checkpoint step of a workdir (default: the latest).')
flags.DEFINE_bool('json', False, 'Print JSON instead of a table.')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.quiet_libraries()
  results = cli.run_user_facing(lambda: cli.fill_mask(
      FLAGS.model, FLAGS.text, FLAGS.input_file, FLAGS.top_k, FLAGS.targets, FLAGS.step))
  texts, fills = results
  if FLAGS.json:
    print(json.dumps([{'text': t, 'masks': f} for t, f in zip(texts, fills)], indent=2))
  else:
    from mlm_jax import infer  # pylint: disable=import-outside-toplevel
    sys.stdout.write(infer.format_table(texts, fills))


if __name__ == '__main__':
  app.run(main)
