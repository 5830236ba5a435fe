"""The package's layering, read from the import statements (ast, nothing imported).

Data knows nothing of models, masking knows nothing of files (nor of tokenizers), and the
models know nothing of the training loop. Imports inside functions count as imports: a lazy
import is still a dependency.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'mlm_jax'

# The loop: what runs, logs, checkpoints and reports a training run, and the entry points.
LOOP = ('mlm_jax.report', 'mlm_jax.train', 'mlm_jax.bookkeeping', 'mlm_jax.steps',
        'mlm_jax.run', 'mlm_jax.checkpoint', 'mlm_jax.metric_writers', 'mlm_jax.preemption',
        'mlm_jax.evaluation', 'mlm_jax.evaluate', 'mlm_jax.infer', 'mlm_jax.cli',
        'mlm_jax.plot', 'mlm_jax.prepare', 'mlm_jax.export')
MODELS = ('mlm_jax.model', 'mlm_jax.models')
# What reads or writes files, or knows a tokenizer's vocabulary.
FILES = ('mlm_jax.data', 'mlm_jax.storage', 'transformers', 'tokenizers', 'etils',
         'datasets', 'safetensors', 'orbax', 'grain')


def imported_modules(path: pathlib.Path) -> set[str]:
  """Every module `path` imports, at any depth, by its full dotted name; for
  `from a import b` both `a` and `a.b` (b may be a module)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module)
      names.update(f'{node.module}.{alias.name}' for alias in node.names)
  return names


def offending(path: pathlib.Path, forbidden: tuple[str, ...]) -> list[str]:
  return sorted(name for name in imported_modules(path)
                if any(name == f or name.startswith(f + '.') for f in forbidden))


def files(*patterns: str) -> list[pathlib.Path]:
  found = sorted(p for pattern in patterns for p in PACKAGE.glob(pattern))
  assert found, patterns
  return found


def rel(path: pathlib.Path) -> str:
  return str(path.relative_to(PACKAGE.parent))


@pytest.mark.parametrize('path', files('data/*.py'), ids=rel)
def test_data_knows_nothing_of_models(path):
  assert offending(path, MODELS + LOOP + ('mlm_jax.masking',)) == []


def test_masking_knows_nothing_of_files_nor_tokenizers():
  assert offending(PACKAGE / 'masking.py', FILES) == []


@pytest.mark.parametrize('path', files('model.py', 'models/*.py', 'models/*/*.py'), ids=rel)
def test_models_know_nothing_of_the_loop(path):
  assert offending(path, LOOP + ('mlm_jax.data', 'mlm_jax.masking')) == []


def test_the_import_reader_sees_lazy_and_from_imports(tmp_path):
  """The checks above are only as good as this reader: an import inside a function, and a
  module named in `from package import module`, are both seen."""
  source = tmp_path / 'example.py'
  source.write_text('from mlm_jax import report\n'
                    'def f():\n  import mlm_jax.data.tokenizer\n')
  assert offending(source, LOOP) == ['mlm_jax.report']
  assert offending(source, FILES) == ['mlm_jax.data.tokenizer']
