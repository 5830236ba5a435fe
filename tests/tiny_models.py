"""Tiny local checkpoints saved as the hub's are, for the tests that fine-tune one."""

import json

import ml_collections
import tokenizers
import transformers
from tokenizers import processors

from mlm_jax import model as model_lib
from mlm_jax import validation
from mlm_jax.data import sources
from mlm_jax.data import tokenizer as tokenizer_lib
from mlm_jax.models import FlaxAutoModelForMaskedLM

MODERNBERT_SPECIALS = ['[UNK]', '[CLS]', '[SEP]', '[PAD]', '[MASK]']  # After the BPE's ids.


def modernbert_style_tokenizer(texts: list[str],
                               max_length: int = 128) -> transformers.PreTrainedTokenizerFast:
  """A byte-level BPE with ModernBERT's special tokens at the end of the vocabulary and its
  [CLS] ... [SEP] template, as `answerdotai/ModernBERT-base`'s tokenizer.json has them."""
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(texts, vocab_size=400, min_frequency=2, show_progress=False)
  backend = bpe._tokenizer  # pylint: disable=protected-access
  backend.add_special_tokens([tokenizers.AddedToken(t, lstrip=t == '[MASK]')
                              for t in MODERNBERT_SPECIALS])
  backend.post_processor = processors.TemplateProcessing(
      single='[CLS]:0 $A:0 [SEP]:0', pair='[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1',
      special_tokens=[(t, backend.token_to_id(t)) for t in ('[CLS]', '[SEP]')])
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, unk_token='[UNK]', cls_token='[CLS]', sep_token='[SEP]',
      pad_token='[PAD]', mask_token='[MASK]', model_max_length=max_length)


def _sample_texts() -> list[str]:
  """The shipped sample's answers, one text per question."""
  with open(sources.sample_data_path(), encoding='utf-8') as f:
    return [' '.join(json.loads(line)['answers']['text']) for line in f]


def save_roberta(directory: str, model_config: dict) -> str:
  """The model a from-scratch run of `model_config` (a config's `model_config` keys) starts
  from, saved in `directory` as a pretrained one: a fresh RoBERTa sized to a 400-token
  byte-level BPE trained on the shipped sample, and that tokenizer."""
  tokenizer = tokenizer_lib.train_bpe_tokenizer(_sample_texts(), 400,
                                                validation.SCRATCH_MAX_LENGTH)
  tokenizer.save_pretrained(directory)
  run_config = ml_collections.ConfigDict({'model_config': model_config})
  FlaxAutoModelForMaskedLM.from_config(model_lib.scratch_model_config(run_config, tokenizer),
                                       seed=0).save_pretrained(directory)
  return directory


def save_modernbert(directory: str, dropout: float = 0.0, positions: int = 64,
                    **shape) -> str:
  """A fresh 3-layer ModernBERT (global every 3rd layer, window 8; `shape`: other
  `ModernBertConfig` sizes) of `positions` positions and its tokenizer, trained on the
  shipped sample, in `directory`."""
  tokenizer = modernbert_style_tokenizer(_sample_texts(), max(128, positions))
  tokenizer.save_pretrained(directory)
  sizes = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
               local_attention=8) | shape
  config = transformers.ModernBertConfig(
      vocab_size=len(tokenizer), **sizes, global_attn_every_n_layers=3,
      max_position_embeddings=positions, pad_token_id=tokenizer.pad_token_id,
      cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
      bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
      embedding_dropout=dropout, attention_dropout=dropout, mlp_dropout=dropout)
  FlaxAutoModelForMaskedLM.from_config(config, seed=0).save_pretrained(directory)
  return directory
