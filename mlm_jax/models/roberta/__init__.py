"""The RoBERTa family (`roberta`, `xlm-roberta`, `camembert`): BERT's encoder with positions
numbered after the padding id, and RoBERTa's `lm_head`.

The parameter tree is transformers' former `FlaxRobertaForMaskedLM`'s, so checkpoints of
earlier releases restore.
"""

from mlm_jax.models.roberta.masked_lm import RobertaForMaskedLM, max_positions
from mlm_jax.models.roberta.params import ARCHITECTURES, checkpoint_names

__all__ = ['ARCHITECTURES', 'RobertaForMaskedLM', 'checkpoint_names', 'max_positions']
