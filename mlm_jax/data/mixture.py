"""A training mixture: several named sources of text, each with a weight.

`--config.mixture='domain=notes/*.jsonl:0.7,general=wiki/*.txt:0.3'` trains on batches in
which 70% of the rows come from the first source and 30% from the second. Each entry is
`[NAME=]FILES:WEIGHT`: FILES one path or glob, local or `gs://`, as `data_files` takes them;
WEIGHT a positive number (the weights are relative: they are divided by their sum); NAME
what the source's eval metrics are called (`eval/NAME/loss`), by default the file's name
without its extension, or the last folder before a glob (`wiki/*.txt` is `wiki`).

Each source is prepared on its own (`preparation.prepare_sources`), with its own held-out
split and cached blocks, and mixed at read time (`input_pipeline.train_dataset`, with Grain's
`MapDataset.mix`). Light at import: `validation.py` parses the mixture before anything heavy.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import TYPE_CHECKING

from mlm_jax.errors import UserError

if TYPE_CHECKING:
  from mlm_jax.data import block_store

_NAME = re.compile(r'[A-Za-z0-9_.-]+')
_GLOB = re.compile(r'[*?\[]')
_FORMAT = ('entries [NAME=]FILES:WEIGHT, comma-separated, e.g. '
           "--config.mixture='domain=notes/*.jsonl:0.7,general=wiki/*.txt:0.3'")


@dataclasses.dataclass(frozen=True)
class Source:
  """One entry of the mixture: its name, files (a path or glob) and relative weight."""
  name: str
  files: str
  weight: float


@dataclasses.dataclass(frozen=True)
class SourceBlocks:
  """A source's prepared blocks with its name and weight ('' and 1 for a run of one source)."""
  name: str
  weight: float
  blocks: block_store.Prepared


def _default_name(files: str) -> str:
  """The file's name without extension, or the last folder before the first glob character."""
  parts = [p for p in files.split('://', 1)[-1].split('/') if p]
  plain = parts[:next((i for i, p in enumerate(parts) if _GLOB.search(p)), len(parts))]
  if not plain:
    return ''
  return plain[-1].split('.')[0] if len(plain) == len(parts) else plain[-1]


def _entry(text: str, spec: str) -> Source:
  if ':' not in text:
    raise UserError(f'mixture entry {text!r} has no weight; write it FILES:WEIGHT '
                    f'(in --config.mixture={spec!r}), {_FORMAT}')
  head, weight_text = text.rsplit(':', 1)
  try:
    weight = float(weight_text)
  except ValueError:
    weight = float('nan')
  if not (math.isfinite(weight) and weight > 0):
    raise UserError(f'mixture entry {text!r}: the weight {weight_text!r} must be a positive '
                    'number; fix it in --config.mixture')
  name, files = head.split('=', 1) if '=' in head.split('://', 1)[0] else ('', head)
  name, files = name.strip(), files.strip()
  if not files:
    raise UserError(f'mixture entry {text!r} names no files; write it [NAME=]FILES:WEIGHT in '
                    '--config.mixture')
  name = name or _default_name(files)
  if not _NAME.fullmatch(name):
    raise UserError(f'mixture entry {text!r}: the source name {name!r} must be letters, '
                    'digits, _ . or -; name it with NAME=FILES:WEIGHT in --config.mixture')
  return Source(name, files, weight)


def parse(spec: str) -> tuple[Source, ...]:
  """The mixture's sources, in order; () for an empty spec (a run of one source)."""
  if not spec.strip():
    return ()
  sources = []
  for text in spec.split(','):
    if not text.strip():
      raise UserError(f'--config.mixture={spec!r} has an empty entry (two commas, or one at '
                      f'an end); remove it: {_FORMAT}')
    sources.append(_entry(text.strip(), spec))
  names = [s.name for s in sources]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise UserError(f'--config.mixture names the source {repeated[0]!r} twice; give each '
                    'source its own name with NAME=FILES:WEIGHT')
  return tuple(sources)


def proportions(sources) -> tuple[float, ...]:
  """The weights divided by their sum: each source's share of the rows."""
  total = sum(s.weight for s in sources)
  return tuple(s.weight / total for s in sources)
