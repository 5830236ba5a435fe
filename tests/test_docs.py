"""The docs cannot drift from the code: README.md and docs/*.md are read as text and checked.

- docs/configs.md's table lists every key of configs/default.py, nested ones too, with its
  default, and nothing else;
- every `--config.KEY` the docs mention is a key of the config;
- every relative link (and its #anchor) and every repo path the docs name in backticks
  exists, and every test they cite (`test_x.py::test_name`) is defined;
- every command of a ```sh block is run by tests/test_docs_commands.py or skipped there by
  name with its reason.
"""

import ast
import pathlib
import re

import pytest

from configs import default
from tests import test_docs_commands

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ([ROOT / 'README.md', ROOT / 'BENCHMARKS.md', ROOT / 'benchmarks' / 'README.md']
        + sorted((ROOT / 'docs').glob('*.md')))
# The pages the other pages must reach: one per topic.
TOPICS = ('configs', 'data', 'masking', 'models', 'long_context', 'domain_adaptation',
          'scoring', 'multihost', 'reliability', 'performance')


def rel(path: pathlib.Path) -> str:
  return str(path.relative_to(ROOT))


def config_keys(config=None, prefix='') -> dict:
  """Every leaf key of configs/default.py by its dotted name, with its value."""
  config = default.get_config() if config is None else config
  keys = {}
  for key, value in config.items():
    if hasattr(value, 'items'):
      keys.update(config_keys(value, f'{prefix}{key}.'))
    else:
      keys[prefix + key] = value
  return keys


# | `key` | `default` | meaning |
_ROW = re.compile(r'^\| `([a-z_][a-z0-9_.]*)` \| `([^`]*)` \|', re.M)


def documented_keys(text: str) -> dict:
  """The keys of docs/configs.md's table, with their defaults as Python values."""
  return {key: ast.literal_eval(value) for key, value in _ROW.findall(text)}


def test_the_config_reference_lists_every_key_of_the_default_config_and_no_other():
  documented = documented_keys((ROOT / 'docs' / 'configs.md').read_text())
  keys = config_keys()
  assert sorted(set(keys) - set(documented)) == [], 'keys missing from docs/configs.md'
  assert sorted(set(documented) - set(keys)) == [], 'docs/configs.md lists keys that are gone'


def test_the_config_reference_gives_each_keys_default():
  documented = documented_keys((ROOT / 'docs' / 'configs.md').read_text())
  wrong = {key: (documented[key], value) for key, value in config_keys().items()
           if key in documented and (documented[key] != value
                                     or type(documented[key]) is not type(value))}
  assert wrong == {}, 'docs/configs.md default != configs/default.py (documented, actual)'


def test_the_reader_of_the_table_sees_a_missing_or_changed_key():
  """The two tests above are only as good as this reader."""
  table = '| `block_size` | `64` | tokens |\n| `model_config.hidden_size` | `128` | width |\n'
  assert documented_keys(table) == {'block_size': 64, 'model_config.hidden_size': 128}
  assert documented_keys(table.replace('`64`', "'64'")) == {'model_config.hidden_size': 128}


_CONFIG_FLAG = re.compile(r'--config\.([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*)')


@pytest.mark.parametrize('path', DOCS, ids=rel)
def test_every_config_key_the_docs_mention_exists(path):
  keys = set(config_keys())
  prefixes = {k.rsplit('.', 1)[0] for k in keys if '.' in k}
  unknown = sorted({k for k in _CONFIG_FLAG.findall(path.read_text())
                    if k not in keys and k not in prefixes})
  assert unknown == []


def test_the_config_flag_reader_finds_keys_and_leaves_placeholders():
  text = '`--config.block_size=8192`, --config.model_config.hidden_size=8, --config.KEY=VALUE'
  assert _CONFIG_FLAG.findall(text) == ['block_size', 'model_config.hidden_size']


# ----------------------------------------------------------------------------
# Links and paths.

_LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')
_HEADING = re.compile(r'^#{1,6} (.+)$', re.M)


def anchor(heading: str) -> str:
  """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as dashes."""
  heading = re.sub(r'[`*_]', '', heading.strip().lower())
  return re.sub(r'[^\w\- ]', '', heading).replace(' ', '-')


def headings(path: pathlib.Path) -> set[str]:
  text = re.sub(r'```.*?```', '', path.read_text(), flags=re.S)  # No headings in code.
  return {anchor(h) for h in _HEADING.findall(text)}


def broken_links(path: pathlib.Path) -> list[str]:
  broken = []
  for target in _LINK.findall(path.read_text()):
    if re.match(r'[a-z]+:', target):  # https:, mailto:: not this repo's.
      continue
    file, _, fragment = target.partition('#')
    resolved = (path.parent / file).resolve() if file else path
    if not resolved.exists():
      broken.append(target)
    elif fragment and resolved.suffix == '.md' and fragment not in headings(resolved):
      broken.append(target)
  return broken


@pytest.mark.parametrize('path', DOCS, ids=rel)
def test_every_relative_link_and_anchor_resolves(path):
  assert broken_links(path) == []


def test_the_link_reader_sees_a_missing_file_and_a_missing_anchor(tmp_path):
  page = tmp_path / 'page.md'
  page.write_text('# A title\n[ok](page.md#a-title) [web](https://x.org/y) [gone](nope.md) '
                  '[bad anchor](#no-such-heading) [here](#a-title)\n')
  assert broken_links(page) == ['nope.md', '#no-such-heading']


# A repo path in backticks: a top folder of the repo, then lower-case path characters (an
# upper-case part, such as `tests/FILE.py`, is a placeholder), optionally `::test_name`. A
# bare file name (`backbone.py`, `run_mlm_flax.py`) may be anyone's: not checked.
_PATH = re.compile(r'`((?:configs|mlm_jax|benchmarks|tests|docs|\.ci)/[a-z0-9_./-]*)'
                   r'(?:::([a-z0-9_]+))?`')
# A test cited by file and name: `test_x.py::test_name` (a `...` prefix is left unchecked).
_TEST = re.compile(r'`(test_[a-z0-9_]+\.py)(?:::([a-z0-9_]+))?`')
_MODULE = re.compile(r'`(?:python -m )?(mlm_jax(?:\.[a-z_]+)+)')


def missing_paths(path: pathlib.Path) -> list[str]:
  text = path.read_text()
  missing = []
  for name, test in _PATH.findall(text) + [(f'tests/{f}', t) for f, t in _TEST.findall(text)]:
    file = ROOT / name
    if not file.exists():
      missing.append(name)
    elif test and not re.search(rf'^def {test}\(', file.read_text(), re.M):
      missing.append(f'{name}::{test}')
  for module in _MODULE.findall(text):
    parts = module.split('.')
    # The longest prefix that is a module or package; what follows it names an attribute.
    found = [i for i in range(2, len(parts) + 1)
             if (ROOT.joinpath(*parts[:i]).with_suffix('.py')).exists()
             or (ROOT.joinpath(*parts[:i]) / '__init__.py').exists()]
    if not found:
      missing.append(module)
  return missing


@pytest.mark.parametrize('path', DOCS, ids=rel)
def test_every_repo_path_test_and_module_the_docs_name_exists(path):
  assert missing_paths(path) == []


def test_the_path_reader_sees_missing_files_tests_and_modules(tmp_path):
  page = tmp_path / 'page.md'
  page.write_text('`mlm_jax/masking.py` `mlm_jax/nope.py` `tests/FILE.py` `WORKDIR/export` '
                  '`test_docs.py::test_the_path_reader_sees_missing_files_tests_and_modules` '
                  '`test_docs.py::test_gone` `python -m mlm_jax.evaluate` `mlm_jax.nope` '
                  '`mlm_jax.masking.mask_tokens`')
  assert missing_paths(page) == ['mlm_jax/nope.py', 'tests/test_docs.py::test_gone',
                                 'mlm_jax.nope']
  other = tmp_path / 'other.md'
  other.write_text('`backbone.py` `run_mlm_flax.py`')  # Anyone's file names: not checked.
  assert missing_paths(other) == []


def test_the_docs_index_and_the_readme_link_every_topic_page():
  for page in ('README.md', 'docs/README.md'):
    text = (ROOT / page).read_text()
    linked = {pathlib.Path(t.partition('#')[0]).stem for t in _LINK.findall(text)}
    assert sorted(set(TOPICS) - linked) == [], page


def test_the_readme_is_a_front_page():
  assert len((ROOT / 'README.md').read_text().splitlines()) <= 250


# ----------------------------------------------------------------------------
# Commands.


def test_every_shell_command_of_the_docs_is_run_or_skipped_by_name():
  commands = test_docs_commands.doc_commands()
  assert len(commands) > 10
  unknown = [c.text for c in commands if test_docs_commands.plan(c) is None]
  assert unknown == [], 'add these to test_docs_commands.py: a way to run them, or a skip reason'
