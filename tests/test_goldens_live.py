"""The golden fixtures against PyTorch itself, where torch is installed (CI has none).

Guards the fixtures and the export from the other side: the committed files are what
tests/goldens/make_goldens.py makes with the installed torch and transformers (stale or
hand-edited goldens show here), and PyTorch transformers loads our export of every
fixture with no missing, unexpected or misshapen tensor and gives the golden's logits.
"""

import numpy as np
import pytest

torch = pytest.importorskip('torch')

# pylint: disable=wrong-import-position
import transformers
from safetensors.numpy import load_file

from mlm_jax.models import FlaxAutoModelForMaskedLM
from tests.goldens import make_goldens
from tests.test_goldens import GOLDENS, golden_params
from tests.test_optimizer_golden import NOISE_ONLY, PARAMS_ATOL
# pylint: enable=wrong-import-position

# Another thread count sums in another order; the numbers are float32.
ATOL = 1e-6


def assert_same_arrays(ours: dict, committed: dict, atol: float = ATOL) -> None:
  assert sorted(ours) == sorted(committed)
  for key, value in committed.items():
    if np.issubdtype(value.dtype, np.floating):
      np.testing.assert_allclose(ours[key], value, rtol=0, atol=atol, err_msg=key)
    else:
      np.testing.assert_array_equal(ours[key], value, err_msg=key)


def load_npz(path) -> dict:
  with np.load(path) as f:
    return dict(f)


@pytest.mark.parametrize('name', sorted(make_goldens.FIXTURES))
def test_committed_fixture_is_what_the_script_makes(name, tmp_path):
  make_goldens.make_fixture(name, tmp_path)
  assert_same_arrays(load_file(tmp_path / 'model.safetensors'),
                     load_file(GOLDENS / name / 'model.safetensors'))
  assert_same_arrays(load_npz(tmp_path / 'outputs.npz'), load_npz(GOLDENS / name / 'outputs.npz'))


def test_committed_optimizer_golden_is_what_the_script_makes(tmp_path):
  """After Adam steps, within the optimizer test's tolerance; not the parameters that only
  rounding noise moves (see `test_optimizer_golden.NOISE_ONLY`)."""
  make_goldens.make_optimizer_golden(tmp_path / 'optimizer.npz',
                                     GOLDENS / make_goldens.OPTIMIZER['fixture'])
  compared = lambda arrays: {k: v for k, v in arrays.items() if not k.endswith(NOISE_ONLY)}
  assert_same_arrays(compared(load_npz(tmp_path / 'optimizer.npz')),
                     compared(load_npz(GOLDENS / 'optimizer.npz')), atol=PARAMS_ATOL)


@pytest.mark.parametrize('directory', golden_params())
def test_pytorch_loads_our_export_whole_and_gives_the_golden_logits(directory, tmp_path):
  FlaxAutoModelForMaskedLM.from_pretrained(str(directory)).save_pretrained(str(tmp_path))
  model, info = transformers.AutoModelForMaskedLM.from_pretrained(
      tmp_path, output_loading_info=True, attn_implementation='eager')
  assert {k: v for k, v in info.items() if v} == {}
  expected = load_npz(directory / 'outputs.npz')
  with torch.no_grad():
    logits = model.eval()(input_ids=torch.from_numpy(expected['input_ids']).long()).logits
  np.testing.assert_allclose(logits.numpy(), expected['logits'], rtol=0, atol=ATOL)
