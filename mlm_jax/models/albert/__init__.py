"""ALBERT (`model_type: albert`): BERT's embeddings at the narrower `embedding_size`, mapped
up to `hidden_size`, then `num_hidden_groups` groups of `inner_group_num` layers whose
parameters are shared across the depth: layer i runs group
int(i / (num_hidden_layers / num_hidden_groups)), as the reference picks it.

The parameter tree is transformers' former `FlaxAlbertForMaskedLM`'s
(`albert/encoder/albert_layer_groups/<g>/albert_layers/<j>/...`, `predictions/...`), so
checkpoints of earlier releases restore.
"""

from mlm_jax.models.albert.masked_lm import AlbertForMaskedLM
from mlm_jax.models.albert.params import ARCHITECTURE, checkpoint_names

__all__ = ['ARCHITECTURE', 'AlbertForMaskedLM', 'checkpoint_names']
