"""Hugging Face checkpoints in and out (`mlm_jax.models.hf_checkpoint`, `auto`), without torch.

Guards the reading of every layout the hub holds (one file, shards, the bare encoder without
its head, legacy LayerNorm names, a hub id through huggingface_hub's cache, an export of an
earlier release), and that every broken checkpoint is one line naming the tensor or file.
Numbers against PyTorch are in test_goldens.py.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import serialization
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from mlm_jax.data import tokenizer as tokenizer_lib
from mlm_jax.errors import UserError
from mlm_jax.models import FlaxAutoModelForMaskedLM
from tests.conftest import ROOT

CONFIG = transformers.RobertaConfig(
    vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    intermediate_size=24, max_position_embeddings=40, pad_token_id=1, type_vocab_size=1)


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """(model, directory) of a tiny RoBERTa saved by `save_pretrained`."""
  model = FlaxAutoModelForMaskedLM.from_config(CONFIG, seed=3)
  directory = str(tmp_path_factory.mktemp('saved'))
  model.save_pretrained(directory)
  return model, directory


def _copy_with(directory: str, target, edit) -> str:
  """A copy of the checkpoint whose tensors went through `edit(tensors) -> tensors`."""
  target = str(target)
  shutil.copytree(directory, target)
  tensors = edit(load_file(os.path.join(directory, 'model.safetensors')))
  save_file(tensors, os.path.join(target, 'model.safetensors'), metadata={'format': 'pt'})
  return target


def _assert_same(a, b):
  flat_a, flat_b = (traverse_util.flatten_dict(x, sep='/') for x in (a, b))
  assert sorted(flat_a) == sorted(flat_b)
  for path in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[path]), np.asarray(flat_b[path]), path)


def test_saved_model_loads_with_the_same_parameters(saved):
  model, directory = saved
  assert sorted(os.listdir(directory)) == ['config.json', 'model.safetensors']
  _assert_same(FlaxAutoModelForMaskedLM.from_pretrained(directory).params, model.params)


def test_export_config_names_the_pytorch_class_and_float32(saved):
  _, directory = saved
  with open(os.path.join(directory, 'config.json'), encoding='utf-8') as f:
    config = json.load(f)
  assert (config['architectures'], config['model_type'], config['dtype']) == (
      ['RobertaForMaskedLM'], 'roberta', 'float32')


def test_tied_decoder_is_not_written_and_need_not_be_read(saved):
  _, directory = saved
  names = set(load_file(os.path.join(directory, 'model.safetensors')))
  assert 'lm_head.bias' in names and 'lm_head.decoder.weight' not in names


def test_a_tied_decoder_present_in_the_file_is_accepted(saved, tmp_path):
  model, directory = saved
  def add_decoder(tensors):
    word = tensors['roberta.embeddings.word_embeddings.weight']
    return tensors | {'lm_head.decoder.weight': word, 'lm_head.decoder.bias': tensors['lm_head.bias']}
  loaded = FlaxAutoModelForMaskedLM.from_pretrained(_copy_with(directory, tmp_path / 'c', add_decoder))
  _assert_same(loaded.params, model.params)


def test_bare_encoder_gets_a_fresh_head_and_says_so_in_one_line(saved, tmp_path):
  model, directory = saved
  bare = _copy_with(directory, tmp_path / 'bare', lambda tensors: {
      name.removeprefix('roberta.'): value for name, value in tensors.items()
      if not name.startswith('lm_head.')})
  lines = []
  loaded = FlaxAutoModelForMaskedLM.from_pretrained(bare, log=lines.append)
  assert len(lines) == 1 and 'has no masked-LM head; a fresh one is initialised' in lines[0]
  _assert_same(loaded.params['roberta'], model.params['roberta'])
  assert set(loaded.params['lm_head']) == set(model.params['lm_head'])
  kernel = loaded.params['lm_head']['dense']['kernel']
  assert 0.005 < float(np.std(kernel)) < 0.05  # normal(initializer_range=0.02), not zeros.


def test_legacy_layer_norm_names_and_a_pooler_are_read(saved, tmp_path):
  model, directory = saved
  def legacy(tensors):
    renamed = {}
    for name, value in tensors.items():
      if 'LayerNorm' in name:
        name = name.replace('.weight', '.gamma').replace('.bias', '.beta')
      renamed[name] = value
    return renamed | {'roberta.pooler.dense.weight': np.zeros((16, 16), np.float32),
                      'roberta.embeddings.position_ids': np.arange(40)[None]}
  loaded = FlaxAutoModelForMaskedLM.from_pretrained(_copy_with(directory, tmp_path / 'l', legacy))
  _assert_same(loaded.params, model.params)


@pytest.mark.parametrize('edit, says', [
    (lambda t: {k: v for k, v in t.items() if k != 'roberta.encoder.layer.0.output.dense.bias'},
     "lacks the tensor 'roberta.encoder.layer.0.output.dense.bias'"),
    (lambda t: t | {'roberta.encoder.layer.7.output.dense.bias': np.zeros(16, np.float32)},
     "holds the tensor 'roberta.encoder.layer.7.output.dense.bias', which this roberta model"),
    (lambda t: t | {'lm_head.dense.weight': np.zeros((16, 8), np.float32)},
     r"the tensor 'lm_head.dense.weight' has shape \(16, 8\), but config.json asks for \(16, 16\)"),
], ids=['missing', 'unexpected', 'wrong-shape'])
def test_a_mismatched_tensor_is_one_line_naming_it(saved, tmp_path, edit, says):
  _, directory = saved
  broken = _copy_with(directory, tmp_path / 'broken', edit)
  with pytest.raises(UserError, match=says) as raised:
    FlaxAutoModelForMaskedLM.from_pretrained(broken)
  assert '\n' not in str(raised.value)


def test_a_truncated_safetensors_file_is_one_line_naming_it(saved, tmp_path):
  _, directory = saved
  broken = str(tmp_path / 'truncated')
  shutil.copytree(directory, broken)
  path = os.path.join(broken, 'model.safetensors')
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(UserError, match=r'model.safetensors is not a readable safetensors file'):
    FlaxAutoModelForMaskedLM.from_pretrained(broken)


def _shard(directory: str, target) -> str:
  """The checkpoint split in two shards with an index, as large hub checkpoints are."""
  target = str(target)
  os.makedirs(target)
  shutil.copy(os.path.join(directory, 'config.json'), target)
  tensors = load_file(os.path.join(directory, 'model.safetensors'))
  names = sorted(tensors)
  shards = {'model-00001-of-00002.safetensors': names[:len(names) // 2],
            'model-00002-of-00002.safetensors': names[len(names) // 2:]}
  for shard, members in shards.items():
    save_file({n: tensors[n] for n in members}, os.path.join(target, shard), metadata={'format': 'pt'})
  with open(os.path.join(target, 'model.safetensors.index.json'), 'w', encoding='utf-8') as f:
    json.dump({'metadata': {}, 'weight_map': {n: s for s, ms in shards.items() for n in ms}}, f)
  return target


def test_a_sharded_checkpoint_loads(saved, tmp_path):
  model, directory = saved
  _assert_same(FlaxAutoModelForMaskedLM.from_pretrained(_shard(directory, tmp_path / 's')).params,
               model.params)


def test_a_shard_the_index_names_but_the_folder_lacks_is_one_line(saved, tmp_path):
  _, directory = saved
  sharded = _shard(directory, tmp_path / 's')
  os.remove(os.path.join(sharded, 'model-00002-of-00002.safetensors'))
  with pytest.raises(UserError, match='names the shard model-00002-of-00002.safetensors, which'):
    FlaxAutoModelForMaskedLM.from_pretrained(sharded)


def test_pytorch_weights_without_torch_is_one_line_naming_the_fix(saved, tmp_path):
  """Through run_infer.py in a process where torch cannot be imported, as on a machine
  without it (a None entry in sys.modules makes `import torch` fail and transformers' own
  check find no torch)."""
  _, directory = saved
  torch_only = tmp_path / 'torch_only'
  torch_only.mkdir()
  shutil.copy(os.path.join(directory, 'config.json'), torch_only)
  (torch_only / 'pytorch_model.bin').write_bytes(b'not read')
  result = subprocess.run(
      [sys.executable, '-c', "import runpy, sys; sys.modules['torch'] = None; "
       f"sys.argv = ['run_infer.py', '--model={torch_only}', '--text=a <mask>']; "
       f"runpy.run_path({str(ROOT / 'run_infer.py')!r}, run_name='__main__')"],
      capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines() == [
      f'error: {torch_only} has only PyTorch weights (pytorch_model.bin); install torch (pip '
      'install torch) to read them, or convert them to model.safetensors']


def test_an_unknown_model_type_names_the_supported_ones(saved, tmp_path):
  _, directory = saved
  other = tmp_path / 'gpt2'
  shutil.copytree(directory, other)
  (other / 'config.json').write_text(json.dumps({'model_type': 'gpt2'}))
  with pytest.raises(UserError, match=r"model_type 'gpt2' is not supported; use a model whose "
                     r'config.json has one of .*bert.*roberta'):
    FlaxAutoModelForMaskedLM.from_pretrained(str(other))


def test_a_hub_id_is_read_through_the_hub_cache(saved):
  """huggingface_hub's own cache layout, offline (the tests' HF_HUB_OFFLINE=1): the same
  `snapshot_download` call that fetches from the hub finds the files there."""
  model, directory = saved
  repo = os.path.join(os.environ['HF_HOME'], 'hub', 'models--someone--tiny-roberta')
  snapshot = os.path.join(repo, 'snapshots', 'a' * 40)
  shutil.copytree(directory, snapshot, dirs_exist_ok=True)
  os.makedirs(os.path.join(repo, 'refs'), exist_ok=True)
  with open(os.path.join(repo, 'refs', 'main'), 'w', encoding='utf-8') as f:
    f.write('a' * 40)
  _assert_same(FlaxAutoModelForMaskedLM.from_pretrained('someone/tiny-roberta').params,
               model.params)


def test_a_hub_id_that_cannot_be_fetched_is_one_line():
  with pytest.raises(UserError, match=r"could not fetch 'someone/absent' from the hub \("):
    FlaxAutoModelForMaskedLM.from_pretrained('someone/absent')


def test_an_earlier_releases_flax_export_loads(saved, tmp_path):
  model, directory = saved
  earlier = tmp_path / 'earlier'
  earlier.mkdir()
  shutil.copy(os.path.join(directory, 'config.json'), earlier)
  (earlier / 'flax_model.msgpack').write_bytes(
      serialization.to_bytes(jax.device_get(model.params)))
  _assert_same(FlaxAutoModelForMaskedLM.from_pretrained(str(earlier)).params, model.params)


def test_a_flax_export_of_another_tree_is_one_line(saved, tmp_path):
  model, directory = saved
  earlier = tmp_path / 'earlier'
  earlier.mkdir()
  shutil.copy(os.path.join(directory, 'config.json'), earlier)
  params = jax.device_get(model.params)
  params = {'roberta': params['roberta'], 'cls': params['lm_head']}
  (earlier / 'flax_model.msgpack').write_bytes(serialization.msgpack_serialize(params))
  with pytest.raises(UserError, match=r"the Flax checkpoint holds the unexpected parameter 'cls/"):
    FlaxAutoModelForMaskedLM.from_pretrained(str(earlier))


def test_parameters_are_float32_when_computing_in_bfloat16(saved):
  _, directory = saved
  model = FlaxAutoModelForMaskedLM.from_pretrained(directory, dtype=jnp.bfloat16)
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(model.params)} == {np.dtype('float32')}
  ids = np.arange(3, 13)[None]
  assert model(ids).logits.dtype == jnp.bfloat16


def test_a_model_directory_without_tokenizer_files_is_one_line(saved):
  """A model saved alone (as `save_pretrained` does): transformers 5's AutoTokenizer fails
  on it deep inside; the run says what is missing and what to pass."""
  _, directory = saved
  with pytest.raises(UserError, match=r"has no tokenizer files \(tokenizer.json, "
                     r"tokenizer_config.json, ...\); save the tokenizer there, or pass "
                     r"--config.tokenizer_name$"):
    tokenizer_lib.load_pretrained_tokenizer(directory)
