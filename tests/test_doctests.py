"""The examples in the public API's docstrings run, and print what they say they print.

FlaxAutoModelForMaskedLM (mlm_jax/models/auto.py), fill_mask (mlm_jax/infer.py) and
evaluate_model (mlm_jax/evaluation.py), each on a tiny model built in the example: no hub.
"""

import doctest

import pytest

from mlm_jax import evaluation
from mlm_jax import infer
from mlm_jax.models import auto


@pytest.mark.parametrize('module', [auto, infer, evaluation], ids=lambda m: m.__name__)
def test_the_docstring_examples_run_as_written(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0, f'{module.__name__} has no example'
  assert result.failed == 0, f'{result.failed} example lines failed (the output above)'
