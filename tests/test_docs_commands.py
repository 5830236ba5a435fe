"""Every command of README.md's and docs/*.md's ```sh blocks runs as written (slow: -m slow).

The commands run in document order (README.md first, then docs/*.md by name) in one scratch
folder that holds what they name: `configs/`, `run_train.py`, `run_infer.py`, and, so that
no hub is needed, tiny local stand-ins for the hub ids the docs use (a folder
`distilbert/distilroberta-base` holding a tiny RoBERTa saved in the hub's format, likewise
`answerdotai/ModernBERT-base`, and a dataset folder `eli5_category` holding the shipped ELI5
sample), plus `my_data/*.jsonl`, `notes/*.jsonl`, `wiki/*.txt` and `texts.txt`. Transformers, datasets and this package all
read a local folder before the hub, so the commands' own words resolve to them.

Training, preparing and evaluating get `TINY` appended where the command leaves a key unset,
and `CAPPED` always (the later flag wins): a few steps of short blocks, so that every page
runs in minutes on 2 cores. Commands that cannot run here are skipped by name, with the
reason (`SKIPS`); `tests/test_docs.py` fails on a command that is neither run nor skipped.
"""

import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / 'README.md'] + sorted((ROOT / 'docs').glob('*.md'))

# Appended to every command that takes a config, where the command does not set the key
# itself: 4 steps of 4 rows. The tiny stand-in models have few positions, so `block_size` is
# set whatever the command says (its 8192 tokens become 32).
TINY = dict(num_train_steps='4', eval_every_steps='2', log_every_steps='2',
            checkpoint_every_steps='2', per_device_batch_size='4', eval_batch_size='8',
            max_eval_blocks='16', num_proc='1', split="'train[:80]'", tokenizer_vocab_size='400')
CAPPED = dict(block_size='32')

# (pattern of the command, why it cannot run here), first match wins.
SKIPS = (
    (r'python -m pytest', 'the test suite itself (.ci/run runs it)'),
    (r'^pip install', 'installs packages into the environment (.ci/run installs the test extra)'),
    (r'^gcloud ', 'needs Google Cloud: a TPU VM or a bucket'),
    (r'^srun ', 'needs a SLURM cluster'),
    (r'^export ', 'sets the shell\'s environment for the commands after it'),
    (r'^tensorboard ', 'TensorBoard is not a dependency of the package'),
    (r'^hf upload', 'needs the hub and a token'),
    (r'gs://', 'needs a Google Cloud Storage bucket (tests/test_storage.py and '
               'tests/test_gcs_data.py run gs:// against an emulator)'),
    (r'--coordinator_address', 'needs other hosts (tests/test_distributed.py runs two '
                               'processes on 127.0.0.1)'),
    (r'--config\.push_to_hub=True', 'uploads to the hub'),
    (r'CUDA_VISIBLE_DEVICES|attention_impl=cudnn|benchmarks/gpu\.sh', 'needs a GPU'),
    (r'^python benchmarks/long_context\.py', 'the benchmark against PyTorch '
                                              '(needs torch, minutes a length)'),
    (r'^git archive', 'packs a git clone of the repository for a TPU VM (the scratch folder '
                      'is not a clone)'),
)
# Optional environment variables, then one of the package's entry points.
_ENV = r'^(?:[A-Z_]+=\S+ )*'
_RUNS = re.compile(_ENV + r'python (run_train\.py|run_infer\.py|-m mlm_jax\.[a-z_]+)')
_TAKES_CONFIG = re.compile(_ENV + r'python (run_train\.py|-m mlm_jax\.(prepare|evaluate))')


@dataclasses.dataclass(frozen=True)
class Command:
  page: str  # Relative to the repo.
  text: str  # As written, continuation lines joined.

  def __str__(self):
    return f'{self.page}: {self.text}'


@dataclasses.dataclass(frozen=True)
class Plan:
  run: str | None = None  # The shell line to run, or None: skipped ...
  skip: str | None = None  # ... for this reason.


def doc_commands(pages=PAGES) -> list[Command]:
  """The commands of the ```sh blocks of `pages`, in order."""
  commands = []
  for page in pages:
    # Fences may be indented (inside a numbered list).
    for block in re.findall(r'^[ \t]*```sh\n(.*?)^[ \t]*```', page.read_text(), re.S | re.M):
      for line in block.replace('\\\n', ' ').splitlines():
        line = re.sub(r'\s+#.*$', '', re.sub(r'\s+', ' ', line)).strip()  # No comment.
        if line and not line.startswith('#'):
          commands.append(Command(str(page.relative_to(ROOT)), line))
  return commands


def plan(command: Command) -> Plan | None:
  """How `command` runs here, why it is skipped, or None: neither is known."""
  for pattern, reason in SKIPS:
    if re.search(pattern, command.text):
      return Plan(skip=reason)
  module = re.match(_ENV + r'python -m (mlm_jax\.[a-z_]+)', command.text)
  if module and not (ROOT / (module.group(1).replace('.', '/') + '.py')).exists():
    return Plan(skip=f'{module.group(1)} is not in this tree yet')
  if not _RUNS.match(command.text):
    return None
  if not _TAKES_CONFIG.match(command.text):
    return Plan(run=command.text)
  extra = {k: v for k, v in TINY.items() if f'--config.{k}=' not in command.text} | CAPPED
  return Plan(run=' '.join([command.text] + [f'--config.{k}={v}' for k, v in extra.items()]))


# ----------------------------------------------------------------------------
# The scratch folder.


def _sample_lines() -> list[str]:
  from mlm_jax.data import sources  # pylint: disable=import-outside-toplevel
  return pathlib.Path(sources.sample_data_path()).read_text().splitlines()


def _save_roberta(directory: pathlib.Path, texts: list[str]) -> None:
  """A tiny RoBERTa and its byte-level BPE, saved as the hub's distilroberta-base is."""
  import transformers  # pylint: disable=import-outside-toplevel
  from mlm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  from mlm_jax.models import FlaxAutoModelForMaskedLM  # pylint: disable=import-outside-toplevel
  tokenizer = tokenizer_lib.train_bpe_tokenizer(texts, vocab_size=400, model_max_length=512)
  config = transformers.RobertaConfig(
      vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
      intermediate_size=64, max_position_embeddings=514, type_vocab_size=1,
      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id)
  tokenizer.save_pretrained(directory)
  FlaxAutoModelForMaskedLM.from_config(config, seed=0).save_pretrained(str(directory))


def make_scratch_folder(folder: pathlib.Path) -> None:
  from tests import tiny_models  # pylint: disable=import-outside-toplevel
  shutil.copytree(ROOT / 'configs', folder / 'configs')
  for script in ('run_train.py', 'run_infer.py'):
    shutil.copy(ROOT / script, folder / script)
  lines = _sample_lines()
  for name, part in (('eli5_category/train.jsonl', lines), ('my_data/part-0.jsonl', lines[::2]),
                     ('my_data/part-1.jsonl', lines[1::2])):
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text('\n'.join(part) + '\n')
  (folder / 'texts.txt').write_text('The Milky Way is a <mask> galaxy.\nCells get <mask> '
                                    'from food.\n')
  texts = [' '.join(json.loads(line)['answers']['text']) for line in lines]
  # A domain corpus and a general one, for docs/domain_adaptation.md's mixture.
  (folder / 'notes').mkdir()
  (folder / 'notes' / 'part-0.jsonl').write_text('\n'.join(lines[::3]) + '\n')
  (folder / 'wiki').mkdir()
  (folder / 'wiki' / 'part-0.txt').write_text(
      ''.join(text.replace('\n', ' ') + '\n' for text in texts[1::3]))
  _save_roberta(folder / 'distilbert' / 'distilroberta-base', texts)
  tiny_models.save_modernbert(str(folder / 'answerdotai' / 'ModernBERT-base'))


@pytest.fixture(scope='module')
def scratch(tmp_path_factory) -> pathlib.Path:
  folder = tmp_path_factory.mktemp('docs_commands')
  make_scratch_folder(folder)
  return folder


COMMANDS = doc_commands()


@pytest.mark.slow
@pytest.mark.parametrize('command', COMMANDS, ids=[f'{c.page}:{i}' for i, c in
                                                   enumerate(COMMANDS)])
def test_the_docs_command_runs_as_written(command, scratch):
  how = plan(command)
  assert how is not None, f'neither run nor skipped: {command}'
  if how.skip:
    pytest.skip(f'{how.skip}: {command}')
  env = dict(os.environ, PYTHONPATH=f'{ROOT}{os.pathsep}{os.environ.get("PYTHONPATH", "")}',
             HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1')
  result = subprocess.run(['bash', '-c', how.run.replace('python ', f'{sys.executable} ', 1)],
                          cwd=scratch, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
  assert result.returncode == 0, f'{how.run}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}'
