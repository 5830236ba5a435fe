"""The project's own Flax encoders and their Hugging Face checkpoints.

`FlaxAutoModelForMaskedLM` is the front door, with the name and calls of the class
transformers 5 removed: `from_pretrained`, `from_config`, `.params`, `.config`,
`save_pretrained`, and `model(input_ids, attention_mask=..., params=..., train=...,
dropout_rng=...).logits`.
"""

from mlm_jax.models.auto import FlaxAutoModelForMaskedLM, MaskedLMOutput
from mlm_jax.models.registry import FAMILIES, family

__all__ = ['FlaxAutoModelForMaskedLM', 'MaskedLMOutput', 'FAMILIES', 'family']
