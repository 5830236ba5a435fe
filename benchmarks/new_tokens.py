"""The new tokens' loss at the first step under each `new_token_init`.

A golden PyTorch-saved checkpoint (tests/goldens/, its WordPiece tokenizer) gets two words
its tokenizer splits (`unhappy`: un ##happ ##y, `quickest`: quick ##est); texts holding them
have each new word masked in turn, and the mean cross-entropy of the true (new) token is what
the first training step sees for them. Run from the repository root:

    python benchmarks/new_tokens.py [--fixture=roberta_untied]
"""

import argparse
import json
import pathlib
import shutil
import tempfile

import jax
import numpy as np

from mlm_jax import validation
from mlm_jax import vocabulary
from mlm_jax.data import tokenizer as tokenizer_lib
from mlm_jax.models import FlaxAutoModelForMaskedLM

GOLDENS = pathlib.Path(__file__).resolve().parent.parent / 'tests' / 'goldens'
WORDS = ['unhappy', 'quickest']
TEXTS = ['the unhappy cat sat on the mat .', 'a quickest fox is unhappy .',
         'the quickest dog was big and unhappy .', 'it is the quickest star in the sky .']


def new_token_loss(directory: str, init: str) -> float:
  model = FlaxAutoModelForMaskedLM.from_pretrained(directory)
  old = tokenizer_lib.load_pretrained_tokenizer(directory)
  tokenizer = tokenizer_lib.add_words(tokenizer_lib.load_pretrained_tokenizer(directory), WORDS)
  plan = vocabulary.make_plan(old, tokenizer, model.config.vocab_size, 1)
  params = vocabulary.grow(model.params, model.family.vocab_params, plan, init, seed=0)
  model = model.with_vocab_size(plan.rows, params)
  losses = []
  for text in TEXTS:
    ids = tokenizer(text)['input_ids']
    for at in [i for i, t in enumerate(ids) if t in plan.new_ids]:
      masked = np.array([ids])
      masked[0, at] = tokenizer.mask_token_id
      log_probs = jax.nn.log_softmax(model(masked, params=params).logits[0, at])
      losses.append(-float(log_probs[ids[at]]))
  return float(np.mean(losses))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--fixture', default='roberta_untied')
  args = parser.parse_args()
  styles = json.loads((GOLDENS / 'pll' / 'plls.json').read_text())['styles']
  with tempfile.TemporaryDirectory() as tmp:
    directory = shutil.copytree(GOLDENS / args.fixture, pathlib.Path(tmp) / 'model')
    shutil.copytree(GOLDENS / 'pll' / f'tokenizer_{styles[args.fixture]}', directory,
                    dirs_exist_ok=True)
    model = FlaxAutoModelForMaskedLM.from_pretrained(str(directory))
    print(f'{args.fixture}: uniform over {model.config.vocab_size + len(WORDS)} tokens = '
          f'{np.log(model.config.vocab_size + len(WORDS)):.3f}')
    for init in validation.NEW_TOKEN_INITS:
      print(f'{init:9s} first-step loss of the new tokens: '
            f'{new_token_loss(str(directory), init):.3f}')


if __name__ == '__main__':
  main()
