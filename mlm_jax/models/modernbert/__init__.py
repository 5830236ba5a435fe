"""ModernBERT (`model_type: modernbert`) as PyTorch transformers 5's `ModernBertForMaskedLM`
computes it: pre-norm layers with rotary positions, GeGLU MLPs, and attention that is global
on some layers and a sliding window on the others.

Submodule names are PyTorch's (`model.layers.1.attn.Wqkv` is `model/layers/1/attn/Wqkv`).
Both config layouts work: transformers 5's `ModernBertConfig` turns a released checkpoint's
`global_attn_every_n_layers`, `global_rope_theta` and `local_rope_theta` into the
`layer_types` and `rope_parameters` read here.
"""

from mlm_jax.models.modernbert.masked_lm import ModernBertForMaskedLM
from mlm_jax.models.modernbert.params import ARCHITECTURE, checkpoint_names

__all__ = ['ARCHITECTURE', 'ModernBertForMaskedLM', 'checkpoint_names']
