"""mlm_jax: masked-language-model fine-tuning with JAX, Flax and optax."""

import os

# transformers (used here for tokenizers and configs only) advises at import that PyTorch was
# not found, which is expected where torch is not installed; its real warnings still show.
os.environ.setdefault('TRANSFORMERS_NO_ADVISORY_WARNINGS', '1')

__version__ = "0.1.0"
