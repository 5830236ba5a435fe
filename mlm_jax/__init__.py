"""mlm_jax: masked-language-model fine-tuning with JAX, Flax and optax."""

__version__ = "0.1.0"
