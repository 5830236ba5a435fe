"""The encoder families, chosen by `config.json`'s `model_type`."""

import dataclasses
from typing import Callable

from mlm_jax.errors import UserError
from mlm_jax.models import albert
from mlm_jax.models import bert
from mlm_jax.models import checkpoint_names
from mlm_jax.models import distilbert
from mlm_jax.models import modernbert
from mlm_jax.models import roberta


@dataclasses.dataclass(frozen=True)
class VocabParams:
  """The parameters with a row (or column) per token, by '/'-joined path: the word
  embeddings [vocab, width], an untied decoder's kernel [width, vocab] (absent when tied) and
  the decoder bias [vocab] (absent in a ModernBERT without `decoder_bias`)."""
  embedding: str
  decoder: str
  bias: str


@dataclasses.dataclass(frozen=True)
class Family:
  """What the package needs of a family: its Flax masked LM, its checkpoint names, the
  PyTorch class an export names, and how many tokens a row may hold."""
  # module(config, dtype, attention_impl, remat_policy); see `auto.FlaxAutoModelForMaskedLM`.
  module: type
  checkpoint_names: Callable[..., checkpoint_names.Table]
  architecture: str
  vocab_params: VocabParams
  max_positions: Callable[..., int] = lambda config: config.max_position_embeddings


FAMILIES: dict[str, Family] = {
    **{model_type: Family(roberta.RobertaForMaskedLM, roberta.checkpoint_names, architecture,
                          VocabParams('roberta/embeddings/word_embeddings/embedding',
                                      'lm_head/decoder/kernel', 'lm_head/bias'),
                          roberta.max_positions)
       for model_type, architecture in roberta.ARCHITECTURES.items()},
    'bert': Family(bert.BertForMaskedLM, bert.checkpoint_names, bert.ARCHITECTURE,
                   VocabParams('bert/embeddings/word_embeddings/embedding',
                               'cls/predictions/decoder/kernel', 'cls/predictions/bias')),
    'distilbert': Family(distilbert.DistilBertForMaskedLM, distilbert.checkpoint_names,
                         distilbert.ARCHITECTURE,
                         VocabParams('distilbert/embeddings/word_embeddings/embedding',
                                     'vocab_projector/kernel', 'vocab_projector/bias')),
    'albert': Family(albert.AlbertForMaskedLM, albert.checkpoint_names, albert.ARCHITECTURE,
                     VocabParams('albert/embeddings/word_embeddings/embedding',
                                 'predictions/decoder/kernel', 'predictions/bias')),
    'modernbert': Family(modernbert.ModernBertForMaskedLM, modernbert.checkpoint_names,
                         modernbert.ARCHITECTURE,
                         VocabParams('model/embeddings/tok_embeddings/embedding',
                                     'decoder/kernel', 'decoder/bias')),
}


def family(model_type: str) -> Family:
  if model_type not in FAMILIES:
    raise UserError(f'model_type {model_type!r} is not supported; use a model whose config.json '
                    f'has one of {", ".join(sorted(FAMILIES))}')
  return FAMILIES[model_type]
