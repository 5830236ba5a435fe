"""DistilBERT (`model_type: distilbert`): word + position embeddings, post-LayerNorm blocks
with the reference's own names (`q_lin`, `sa_layer_norm`, `ffn.lin1`, ...), and the
`vocab_transform` head.

The parameter tree is transformers' former `FlaxDistilBertForMaskedLM`'s, so checkpoints
of earlier releases restore. One exception: with `sinusoidal_pos_embds` that class kept the
sinusoids as a constant, while PyTorch transformers 5 keeps them in a trainable
`position_embeddings` table that merely starts as sinusoids; this module follows PyTorch.
"""

from mlm_jax.models.distilbert.masked_lm import DistilBertForMaskedLM
from mlm_jax.models.distilbert.params import ARCHITECTURE, checkpoint_names

__all__ = ['ARCHITECTURE', 'DistilBertForMaskedLM', 'checkpoint_names']
