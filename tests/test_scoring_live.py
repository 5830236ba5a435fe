"""The PLL goldens against PyTorch itself, where torch is installed (CI has none).

Guards tests/goldens/pll/ from the other side: its tokenizers and PLLs are what
tests/goldens/make_pll_goldens.py makes with the installed torch and transformers (stale or
hand-edited goldens show here), and our scorer gives PyTorch's loop's PLLs on texts the
goldens do not hold.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip('torch')

# pylint: disable=wrong-import-position
import transformers

from mlm_jax import infer
from tests.goldens import make_goldens
from tests.goldens import make_pll_goldens
from tests.test_scoring import ATOL, GOLDEN, PLL_DIR, predictor_of
# pylint: enable=wrong-import-position

# Another thread count sums in another order: float32 rounding of sums of about 40.
REGENERATED_ATOL = 1e-5
MORE_TEXTS = ('the lazy sun was slowly light', 'stars, dogs and cats!')


def pytorch_model(fixture: str):
  return transformers.AutoModelForMaskedLM.from_pretrained(
      make_goldens.GOLDENS / fixture, attn_implementation='eager').eval()


@pytest.mark.parametrize('style', sorted(make_pll_goldens.STYLES))
def test_committed_tokenizer_is_what_the_script_makes(style, tmp_path):
  make_pll_goldens.make_tokenizer(style).save_pretrained(tmp_path)
  for name in ('tokenizer.json', 'tokenizer_config.json'):
    assert (json.loads((tmp_path / name).read_text()) ==
            json.loads((PLL_DIR / f'tokenizer_{style}' / name).read_text())), name


@pytest.mark.parametrize('fixture', sorted(make_goldens.FIXTURES))
def test_committed_plls_are_what_pytorch_gives_and_ours_match_it_on_more_texts(fixture):
  tokenizer = transformers.AutoTokenizer.from_pretrained(
      PLL_DIR / f'tokenizer_{GOLDEN["styles"][fixture]}')
  model = pytorch_model(fixture)
  predictor = predictor_of(fixture)
  for variant in make_pll_goldens.VARIANTS:
    pytorch = lambda texts: [make_pll_goldens.pytorch_pll(model, tokenizer, text, variant)
                             for text in texts]
    np.testing.assert_allclose(pytorch(GOLDEN['texts']), GOLDEN['plls'][fixture][variant],
                               rtol=0, atol=REGENERATED_ATOL, err_msg=variant)
    ours = [s.pll for s in infer.score_texts(predictor, MORE_TEXTS, variant)]
    np.testing.assert_allclose(ours, pytorch(MORE_TEXTS), rtol=0, atol=ATOL, err_msg=variant)
