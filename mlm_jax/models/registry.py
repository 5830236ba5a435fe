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
class Family:
  """What the package needs of a family: its Flax masked LM, its checkpoint names, the
  PyTorch class an export names, and how many tokens a row may hold."""
  # module(config, dtype, attention_impl, remat_policy); see `auto.FlaxAutoModelForMaskedLM`.
  module: type
  checkpoint_names: Callable[..., checkpoint_names.Table]
  architecture: str
  max_positions: Callable[..., int] = lambda config: config.max_position_embeddings


FAMILIES: dict[str, Family] = {
    **{model_type: Family(roberta.RobertaForMaskedLM, roberta.checkpoint_names, architecture,
                          roberta.max_positions)
       for model_type, architecture in roberta.ARCHITECTURES.items()},
    'bert': Family(bert.BertForMaskedLM, bert.checkpoint_names, bert.ARCHITECTURE),
    'distilbert': Family(distilbert.DistilBertForMaskedLM, distilbert.checkpoint_names,
                         distilbert.ARCHITECTURE),
    'albert': Family(albert.AlbertForMaskedLM, albert.checkpoint_names, albert.ARCHITECTURE),
    'modernbert': Family(modernbert.ModernBertForMaskedLM, modernbert.checkpoint_names,
                         modernbert.ARCHITECTURE),
}


def family(model_type: str) -> Family:
  if model_type not in FAMILIES:
    raise UserError(f'model_type {model_type!r} is not supported; use a model whose config.json '
                    f'has one of {", ".join(sorted(FAMILIES))}')
  return FAMILIES[model_type]
