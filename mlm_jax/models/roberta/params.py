"""RoBERTa's checkpoint names: PyTorch's (`RobertaForMaskedLM.state_dict()`) -> the
parameters of `masked_lm.RobertaForMaskedLM`."""

from mlm_jax.models import checkpoint_names as names
from mlm_jax.models.bert import params as bert

ARCHITECTURES = {'roberta': 'RobertaForMaskedLM', 'xlm-roberta': 'XLMRobertaForMaskedLM',
                 'camembert': 'CamembertForMaskedLM'}


def checkpoint_names(config) -> names.Table:
  head = {}
  head |= names.linear('lm_head.dense', 'lm_head/dense')
  head |= names.norm('lm_head.layer_norm', 'lm_head/layer_norm')
  decoder, copies = names.mlm_decoder('lm_head', 'lm_head', config.tie_word_embeddings)
  return names.Table(bert.encoder_names(config, 'roberta', 'roberta'), head | decoder,
                     base_prefix='roberta', duplicates=bert.mlm_duplicates('lm_head', copies),
                     copies=copies, unused=bert.UNUSED)
