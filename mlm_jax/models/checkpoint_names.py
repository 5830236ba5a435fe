"""How a family names its tensors: an explicit table from PyTorch names to parameter paths.

Each family module builds its `Table` from the helpers here, one line per PyTorch module
(as bonsai's `params.py` does): `linear('x.query', 'x/query')` says that `x.query.weight`
is the kernel `x/query/kernel` (transposed: PyTorch keeps [out, in]) and `x.query.bias`
its bias. Both directions use the one table: loading reads it forwards, the export backwards.
"""

import dataclasses


def linear(torch: str, flax: str, bias: bool = True) -> dict[str, str]:
  """An `nn.Linear`: weight -> kernel (transposed), bias -> bias."""
  table = {f'{torch}.weight': f'{flax}/kernel'}
  if bias:
    table[f'{torch}.bias'] = f'{flax}/bias'
  return table


def norm(torch: str, flax: str, bias: bool = True) -> dict[str, str]:
  """An `nn.LayerNorm`: weight -> scale, bias -> bias."""
  table = {f'{torch}.weight': f'{flax}/scale'}
  if bias:
    table[f'{torch}.bias'] = f'{flax}/bias'
  return table


def embedding(torch: str, flax: str) -> dict[str, str]:
  """An `nn.Embedding`: weight -> embedding."""
  return {f'{torch}.weight': f'{flax}/embedding'}


def parameter(torch: str, flax: str) -> dict[str, str]:
  """A bare `nn.Parameter`, kept as it is."""
  return {torch: flax}


def mlm_decoder(torch: str, flax: str, tied: bool) -> tuple[dict[str, str], dict[str, str]]:
  """A BERT-style masked-LM decoder: (table, copies).

  PyTorch keeps the bias twice, as `<head>.bias` and `<head>.decoder.bias`. Tied to the word
  embeddings, the file holds only `<head>.bias`. Untied, it holds both and the decoder's is
  the one the forward adds, so that is read, and the export writes it under both names.
  """
  if tied:
    return {f'{torch}.bias': f'{flax}/bias'}, {}
  table = {f'{torch}.decoder.weight': f'{flax}/decoder/kernel',
           f'{torch}.decoder.bias': f'{flax}/bias'}
  return table, {f'{torch}.bias': f'{torch}.decoder.bias'}


def is_kernel(flax_path: str) -> bool:
  """Kernels are stored transposed relative to PyTorch's [out, in] weights."""
  return flax_path.endswith('/kernel')


@dataclasses.dataclass(frozen=True)
class Table:
  """A family's tensors, PyTorch name -> parameter path ('/'-joined)."""
  backbone: dict[str, str]
  head: dict[str, str]  # The masked-LM head: a checkpoint without all of it gets a fresh one.
  base_prefix: str  # 'roberta' in 'roberta.embeddings...'; checkpoints of the bare encoder lack it.
  # Names a file may hold that repeat another tensor (a tied decoder), read by nothing.
  duplicates: frozenset[str] = frozenset()
  # Names the export also writes, with the value of another name (see `mlm_decoder`).
  copies: dict[str, str] = dataclasses.field(default_factory=dict)
  # Tensors a hub checkpoint may carry that a masked LM does not use (a pooler, a next-sentence
  # head, buffers): prefixes or suffixes, matched after the base prefix is restored.
  unused: tuple[str, ...] = ()

  @property
  def all(self) -> dict[str, str]:
    return self.backbone | self.head
