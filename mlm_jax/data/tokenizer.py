"""The run's tokenizer: the model's own, or a byte-level BPE trained from scratch.

Whatever its origin, the tokenizer is saved in `WORKDIR/tokenizer` and reloaded
from there, so a resumed run, its export and inference all see the same ids. A
tokenizer trained from scratch sees a bounded, streamed sample of the train texts
(`tokenizer_train_max_texts`) and is cached with the prepared blocks (`preparation.py`).
"""

from typing import Iterable

import numpy as np
import tokenizers
import transformers
from etils import epath
from tokenizers import processors

from mlm_jax import storage
from mlm_jax.errors import UserError, first_line

SPECIAL_TOKENS = ('<s>', '<pad>', '</s>', '<unk>', '<mask>')  # RoBERTa's, in its id order.


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int,
                        model_max_length: int) -> transformers.PreTrainedTokenizerFast:
  """Trains a RoBERTa-style byte-level BPE tokenizer on `texts`."""
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                          special_tokens=list(SPECIAL_TOKENS), show_progress=False)
  backend = bpe._tokenizer  # pylint: disable=protected-access
  # Wrap every sequence in <s> ... </s> as RoBERTa does.
  # (sep, cls) by position: tokenizers 0.23 renamed the `cls` keyword.
  backend.post_processor = processors.RobertaProcessing(
      ('</s>', backend.token_to_id('</s>')), ('<s>', backend.token_to_id('<s>')),
      trim_offsets=True, add_prefix_space=False)
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend,
      bos_token='<s>', eos_token='</s>', sep_token='</s>', cls_token='<s>',
      unk_token='<unk>', pad_token='<pad>',
      mask_token=tokenizers.AddedToken('<mask>', lstrip=True, rstrip=False),
      model_max_length=model_max_length)


# Files of which a saved tokenizer has at least one (tokenizers' JSON, or a vocabulary).
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'vocab.json', 'vocab.txt',
                   'spiece.model', 'sentencepiece.bpe.model')


def load_pretrained_tokenizer(name_or_path: str) -> transformers.PreTrainedTokenizerBase:
  """`AutoTokenizer.from_pretrained` with a one-line error for a bad name or path, or a
  model directory without tokenizer files (transformers fails there deep inside)."""
  directory = epath.Path(name_or_path)
  if directory.is_dir() and not any((directory / f).exists() for f in TOKENIZER_FILES):
    raise UserError(f'{name_or_path!r} has no tokenizer files ({", ".join(TOKENIZER_FILES[:2])}'
                    ', ...); save the tokenizer there, or pass --config.tokenizer_name')
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
  except (OSError, ValueError, AttributeError, TypeError, KeyError) as e:
    raise UserError(
        f'could not load a tokenizer from {name_or_path!r} ({first_line(e)}); '
        'pass a hub id or a directory with tokenizer files') from None
  if tokenizer.mask_token is None:
    raise UserError(f'tokenizer {name_or_path!r} has no mask token; '
                    'masked language modelling needs one')
  return tokenizer


def tokenizer_dir(workdir: str) -> epath.Path:
  return storage.path(workdir) / 'tokenizer'


def _is_saved(workdir: str) -> bool:
  return (tokenizer_dir(workdir) / 'tokenizer_config.json').exists()


def save_tokenizer(tokenizer: transformers.PreTrainedTokenizerBase, workdir: str) -> None:
  """Saves the run's tokenizer in `workdir` unless it is already there."""
  if not _is_saved(workdir):
    storage.save_with(tokenizer.save_pretrained, tokenizer_dir(workdir))


def load_saved_tokenizer(workdir: str) -> transformers.PreTrainedTokenizerBase:
  """The tokenizer a run saved in `workdir` (local or in a bucket)."""
  with storage.local_copy(tokenizer_dir(workdir)) as local:
    return transformers.AutoTokenizer.from_pretrained(local)


def saved_tokenizer(workdir: str) -> transformers.PreTrainedTokenizerBase | None:
  """The tokenizer a run saved in `workdir` (what a resumed run must use), if any."""
  if _is_saved(workdir):
    return load_saved_tokenizer(workdir)
  return None


def pretrained_tokenizer(config) -> transformers.PreTrainedTokenizerBase | None:
  """The tokenizer `config` names (tokenizer_name or the model's), or None: train one."""
  name = config.tokenizer_name or config.model_name_or_path
  return load_pretrained_tokenizer(name) if name else None


# The subword conventions whose word boundaries the vocabulary shows: (the marker that
# identifies the convention, the prefixes of the tokens it marks, whether those tokens start
# a word or continue one). Byte-level BPE spells whitespace bytes as Ġ (space), Ċ (newline),
# ĉ (tab), č (carriage return), ċ and Č: a token that begins with any of them starts a word.
_CONVENTIONS = (('Ġ', ('Ġ', 'Ċ', 'ĉ', 'č', 'ċ', 'Č'), True), ('▁', ('▁',), True),
                ('##', ('##',), False))


def word_start_table(tokenizer: transformers.PreTrainedTokenizerBase) -> np.ndarray:
  """bool [len(tokenizer)]: True for the ids that begin a word (special and added tokens too).

  What whole-word masking gathers from (`masking.masking_spec`). The convention (`Ġ`, `▁`
  or `##`) is the one most of the vocabulary follows; a tokenizer that follows none is a
  `UserError`.
  """
  tokens = [t or '' for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))]
  counts = [sum(t.startswith(marker) and len(t) > len(marker) for t in tokens)
            for marker, _, _ in _CONVENTIONS]
  if max(counts) == 0:
    name = tokenizer.name_or_path or type(tokenizer).__name__
    raise UserError(
        f'tokenizer {name!r} shows no word boundaries in its vocabulary '
        '(no Ġ or ▁ word starts, no ## continuations), so masking=whole_word cannot find '
        'words; use --config.masking=token')
  _, prefixes, marks_start = _CONVENTIONS[int(np.argmax(counts))]
  table = np.array([t.startswith(prefixes) == marks_start for t in tokens], bool)
  table[list(tokenizer.all_special_ids) + list(tokenizer.get_added_vocab().values())] = True
  return table


def word_pieces(tokenizer: transformers.PreTrainedTokenizerBase, word: str) -> list[int]:
  """The ids `tokenizer` splits `word` into where it follows a space (the form most words of
  a text take: RoBERTa's `Ġword`), less a lone whitespace marker (`Ġ`, `▁`) before them."""
  ids = tokenizer(' ' + word, add_special_tokens=False)['input_ids']
  pieces = [i for i in ids if tokenizer.convert_ids_to_tokens(i).strip('Ġ▁ ')]
  return pieces or ids


def is_one_token(tokenizer: transformers.PreTrainedTokenizerBase, word: str) -> bool:
  """Whether `tokenizer` already encodes `word` as one known token (not the unknown one)."""
  pieces = word_pieces(tokenizer, word)
  return len(pieces) == 1 and pieces[0] != tokenizer.unk_token_id


def normal_form(tokenizer: transformers.PreTrainedTokenizerBase, word: str) -> str:
  """`word` as `tokenizer` reads it in a text: after its normalizer (BERT uncased's lowercases
  and strips accents), which tokenizers also applies to an added word before matching it."""
  normalizer = tokenizer.backend_tokenizer.normalizer
  return normalizer.normalize_str(word) if normalizer else word


def add_words(tokenizer: transformers.PreTrainedTokenizerBase, words: list[str],
              log=lambda message: None) -> transformers.PreTrainedTokenizerBase:
  """`tokenizer` with `words` added as regular (not special) tokens that match whole words
  only (`single_word`) and take the space before them (`lstrip`), so that `the mitochondria`
  is `the`, `mitochondria`. Words it already encodes as one token stay as they are, and so do
  words that a lowercasing tokenizer reads as an earlier one (`Mitochondria` after
  `mitochondria`: one token, which matches both); `log` names each kind in one line."""
  known = [w for w in words if is_one_token(tokenizer, w)]
  if known:
    log(f'note: {", ".join(map(repr, known))} {"is" if len(known) == 1 else "are"} already '
        'one token of the vocabulary; not added again')
  firsts, same = {}, []
  for word in words:
    if word not in known:
      first = firsts.setdefault(normal_form(tokenizer, word), word)
      if first != word:
        same.append(f'{word!r} as {first!r}')
  if same:
    log(f'note: the tokenizer normalizes (lowercases) the text, so it reads {", ".join(same)}; '
        'added once')
  tokenizer.add_tokens([tokenizers.AddedToken(w, single_word=True, lstrip=True, rstrip=False,
                                              normalized=True, special=False)
                        for w in firsts.values()])
  return tokenizer


def added_words(tokenizer: transformers.PreTrainedTokenizerBase) -> list[str]:
  """The regular (not special) tokens added to `tokenizer`'s vocabulary, by id."""
  special = set(tokenizer.all_special_tokens)
  added = tokenizer.get_added_vocab()
  return sorted((w for w in added if w not in special), key=added.get)
