"""BERT (`model_type: bert`): the encoder that RoBERTa shares, and BERT's masked-LM head.

Submodule names are PyTorch transformers' own (`bert.encoder.layer.0.attention.self.query`
is `bert/encoder/layer/0/attention/self/query` here), which is also the parameter tree of
transformers' former `FlaxBertForMaskedLM`, so checkpoints of earlier releases restore.
"""

from mlm_jax.models.bert.masked_lm import BertForMaskedLM
from mlm_jax.models.bert.params import ARCHITECTURE, checkpoint_names

__all__ = ['ARCHITECTURE', 'BertForMaskedLM', 'checkpoint_names']
