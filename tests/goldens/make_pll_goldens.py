"""Pseudo-log-likelihood goldens made by PyTorch transformers alone, for the torch-free tests.

Run where torch and transformers 5 are installed, after `make_goldens.py` (from the
repository root):

    python tests/goldens/make_pll_goldens.py

The golden models (`tests/goldens/<name>/`) have a vocabulary of 48 tokens and no tokenizer,
so this script writes small WordPiece tokenizers whose ids fit them, one per style of
special tokens (`STYLES`: RoBERTa's <s> <pad> </s> <unk> <mask>, BERT's, ModernBERT's, at
the ids the models' configs name), into `tests/goldens/pll/tokenizer_<style>/`, and into
`tests/goldens/pll/plls.json` each fixture's PLL of each of `TEXTS` under each variant,
computed the plain way (Salazar et al. 2020): one masked copy of the text at a time through
the PyTorch masked LM, the log-softmax of its logits at the masked token, summed over the
text's non-special tokens. `within_word_l2r` (Kauf & Ivanova 2023) also masks the pieces of
the same word to the right of the scored one.

Nothing here imports mlm_jax. Running it twice writes the same bytes.
"""

import json
import os

import tokenizers
import torch
import transformers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

try:
  from tests.goldens import make_goldens  # Imported by the live test.
except ImportError:
  import make_goldens  # Run as a script.

PLL_DIR = make_goldens.GOLDENS / 'pll'
VARIANTS = ('original', 'within_word_l2r')
# Special tokens in id order (ids 0-4, the mask at make_goldens.MASK_ID), and (cls, sep).
STYLES = {
    'roberta': (('<s>', '<pad>', '</s>', '<unk>', '<mask>'), ('<s>', '</s>')),
    'bert': (('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'), ('[CLS]', '[SEP]')),
    'modernbert': (('[PAD]', '[CLS]', '[SEP]', '[UNK]', '[MASK]'), ('[CLS]', '[SEP]')),
}
FIXTURE_STYLES = {'roberta': 'roberta', 'roberta_untied': 'roberta', 'xlm_roberta': 'roberta',
                  'camembert': 'roberta', 'bert': 'bert', 'distilbert': 'bert',
                  'albert': 'bert', 'modernbert': 'modernbert', 'modernbert_untied': 'modernbert'}
# 43 words and pieces after the 5 special tokens: 48, the golden models' vocabulary.
WORDS = ('the', 'a', 'cat', 'dog', 'fox', 'sat', 'on', 'over', 'mat', 'run', 'jump', 'quick',
         'slow', 'lazy', 'big', 'red', 'star', 'light', 'sky', 'sun', 'moon', 'is', 'was',
         'and', 'to', 'of', 'it', 'in', 'at', '.', ',', '!', '##s', '##ing', '##ed', '##er',
         '##est', '##ly', '##y', 'house', 'un', '##happ', 'tree')
# At most 12 pieces each: RoBERTa's 16 positions hold 14 tokens. Several words of two and
# three pieces, so that within_word_l2r differs from the original.
TEXTS = ('the cat sat on the mat.',
         'the quickest fox jumped over the lazy dogs',
         'jumpers jumped, stars lighting sky!',
         'a big red house',
         'slowly',
         'unhappy cats')


def make_tokenizer(style: str) -> transformers.PreTrainedTokenizerFast:
  """A lower-casing WordPiece tokenizer of `WORDS`, with `style`'s special tokens and its
  `cls ... sep` template."""
  specials, (cls, sep) = STYLES[style]
  vocab = {token: index for index, token in enumerate(specials + WORDS)}
  named = lambda word: next(t for t in specials if word in t.lower())
  unk = named('unk')
  backend = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token=unk))
  backend.normalizer = normalizers.BertNormalizer(lowercase=True)
  backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  backend.decoder = decoders.WordPiece()
  backend.post_processor = processors.TemplateProcessing(
      single=f'{cls} $A {sep}', pair=f'{cls} $A {sep} $B {sep}',
      special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, mask_token=specials[make_goldens.MASK_ID], pad_token=named('pad'),
      unk_token=unk, cls_token=cls, sep_token=sep, model_max_length=14)


def masked_copy(ids: list[int], words: list[int | None], position: int, mask_id: int,
                variant: str) -> list[int]:
  """`ids` with `position` masked, and with within_word_l2r the same word's later pieces."""
  copy = list(ids)
  for index in range(position, len(ids)):
    later_piece = (variant == 'within_word_l2r' and words[index] is not None
                   and words[index] == words[position])
    if index == position or later_piece:
      copy[index] = mask_id
  return copy


def pytorch_pll(model: torch.nn.Module, tokenizer, text: str, variant: str) -> float:
  """The text's PLL, one masked copy at a time."""
  encoding = tokenizer(text, return_special_tokens_mask=True)
  ids, words = encoding['input_ids'], encoding.word_ids()
  total = 0.0
  for position, special in enumerate(encoding['special_tokens_mask']):
    if special:
      continue
    copy = masked_copy(ids, words, position, tokenizer.mask_token_id, variant)
    with torch.no_grad():
      logits = model(input_ids=torch.tensor([copy])).logits[0, position]
    total += torch.log_softmax(logits, -1)[ids[position]].item()
  return total


def main() -> None:
  torch.use_deterministic_algorithms(True)
  torch.set_num_threads(1)
  transformers.utils.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()
  for style in STYLES:
    make_tokenizer(style).save_pretrained(PLL_DIR / f'tokenizer_{style}')
  plls = {}
  for name in sorted(make_goldens.FIXTURES):
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        PLL_DIR / f'tokenizer_{FIXTURE_STYLES[name]}')
    model = transformers.AutoModelForMaskedLM.from_pretrained(
        make_goldens.GOLDENS / name, attn_implementation='eager').eval()
    plls[name] = {variant: [pytorch_pll(model, tokenizer, text, variant) for text in TEXTS]
                  for variant in VARIANTS}
  record = {'texts': list(TEXTS), 'styles': FIXTURE_STYLES, 'plls': plls}
  (PLL_DIR / 'plls.json').write_text(json.dumps(record, indent=1) + '\n', encoding='utf-8')
  print(f'wrote {PLL_DIR}')


if __name__ == '__main__':
  os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
  main()
