"""PLL scoring: the package's batched scorer against PyTorch loops, side by side, in one command.

The model is `cpu_vs_torch.py`'s: a randomly initialised RoBERTa of the distilroberta-base size
(`--shape=distilroberta-base`, the default) or of the tiny shape (2 x 128, `--shape=tiny`),
saved by PyTorch (`save_pretrained`) with a BPE tokenizer trained on the package's sample. The
texts are `--texts` sample answers cut to `--words` words. Each timed call scores them all:

  * ours: `infer.score_texts(load_predictor(dir), texts)`: every masked copy of every text
    through one compiled forward (`--batch_size` copies a call, padded to bucketed shapes), the
    vocabulary projection at the masked token only;
  * theirs, the plain loop: PyTorch transformers' `AutoModelForMaskedLM` on the same directory,
    one masked copy at a time (`model(ids).logits[0, i].log_softmax(-1)[token]`), as the
    Salazar et al. definition reads and as `tests/goldens/make_pll_goldens.py` computes it;
  * theirs, batched per text (`--per_text_batch`): all masked copies of one text in one PyTorch
    batch, as minicons scores; context for the plain loop's figure, no goal.

The sides alternate (`cpu_vs_torch.alternate`: a warm-up call each, then `--rounds` rounds);
the figures are medians, texts/s, and the ratio is ours over theirs (the goal: at least 3x the
plain loop). It also prints the largest difference between ours and the plain loop's PLLs.

  python benchmarks/score.py                         # distilroberta-base, 16 texts of 16 words
  python benchmarks/score.py --shape=tiny --texts=64 --rounds=5
"""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # Before jax is imported.
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
# `infer` imports transformers, whose notice on a missing torch would precede our own line.
os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')

import argparse  # pylint: disable=wrong-import-position
import pathlib
import sys
import tempfile
from typing import Sequence

import numpy as np

import cpu_vs_torch  # pylint: disable=wrong-import-position
import infer as infer_benchmark  # pylint: disable=wrong-import-position

GOAL = 3.0  # Ours over the plain PyTorch loop, texts/s.


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--shape', choices=sorted(infer_benchmark.SHAPES),
                      default='distilroberta-base')
  parser.add_argument('--texts', type=int, default=16, help='texts per timed call')
  parser.add_argument('--words', type=int, default=16, help='words per text')
  parser.add_argument('--batch_size', type=int, default=128, help='our masked copies per call')
  parser.add_argument('--rounds', type=int, default=3, help='alternations between the sides')
  parser.add_argument('--steps', type=int, default=1, help='timed calls per side per round')
  parser.add_argument('--per_text_batch', action='store_true',
                      help='also time PyTorch with each text\'s copies in one batch')
  parser.add_argument('--json', default=None, metavar='PATH', help='write the results here')
  return parser.parse_args(argv)


def sample_texts(count: int, words: int) -> list[str]:
  """`count` sample answers of at least `words` words, cut to `words` (cycling)."""
  usable = [a.split()[:words] for a in infer_benchmark.sample_answers() if len(a.split()) >= words]
  if not usable:
    raise SystemExit(f'no sample answer has {words} words; lower --words')
  return [' '.join(usable[i % len(usable)]) for i in range(count)]


def torch_plain_loop(model, tokenizer, texts: Sequence[str], torch) -> list[float]:
  """Each text's PLL, one masked copy at a time (variant original)."""
  plls = []
  for text in texts:
    encoding = tokenizer(text, return_special_tokens_mask=True)
    ids = torch.tensor([encoding['input_ids']])
    total = 0.0
    with torch.no_grad():
      for position, special in enumerate(encoding['special_tokens_mask']):
        if special:
          continue
        copy = ids.clone()
        copy[0, position] = tokenizer.mask_token_id
        logits = model(input_ids=copy).logits[0, position]
        total += torch.log_softmax(logits, -1)[ids[0, position]].item()
    plls.append(total)
  return plls


def torch_per_text_batch(model, tokenizer, texts: Sequence[str], torch) -> list[float]:
  """Each text's PLL, its masked copies in one batch (variant original)."""
  plls = []
  for text in texts:
    encoding = tokenizer(text, return_special_tokens_mask=True)
    ids = torch.tensor(encoding['input_ids'])
    positions = torch.tensor([i for i, s in enumerate(encoding['special_tokens_mask']) if not s])
    copies = ids.repeat(len(positions), 1)
    copies[torch.arange(len(positions)), positions] = tokenizer.mask_token_id
    with torch.no_grad():
      logits = model(input_ids=copies).logits[torch.arange(len(positions)), positions]
    plls.append(torch.log_softmax(logits, -1)[torch.arange(len(positions)),
                                              ids[positions]].sum().item())
  return plls


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  torch = cpu_vs_torch.import_torch('score.py')
  if torch is None:
    return 2
  import jax  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from mlm_jax import host_memory  # pylint: disable=import-outside-toplevel
  from mlm_jax import infer  # pylint: disable=import-outside-toplevel
  transformers.utils.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()
  torch.set_num_threads(cpu_vs_torch.CORES)
  host_memory.keep_freed_memory()  # Both sides, as in cpu_vs_torch.py.
  texts = sample_texts(args.texts, args.words)
  print(f'{cpu_vs_torch.CORES} CPU cores ({cpu_vs_torch.cpu_model()}); jax {jax.__version__}, '
        f'torch {torch.__version__} ({torch.get_num_threads()} threads), transformers '
        f'{transformers.__version__}; load average {cpu_vs_torch.load_average()}', flush=True)
  report = {'cpu': cpu_vs_torch.cpu_model(), 'cores': cpu_vs_torch.CORES, 'args': vars(args),
            'load_average_before': cpu_vs_torch.load_average()}
  with tempfile.TemporaryDirectory() as directory:
    cpu_vs_torch.torch_saved_model(pathlib.Path(directory), torch, args.shape)
    predictor = infer.load_predictor(directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForMaskedLM.from_pretrained(directory).eval()
    tokens = [sum(1 - s for s in tokenizer(t, return_special_tokens_mask=True)
                  ['special_tokens_mask']) for t in texts]
    print(f'{args.shape} RoBERTa; {len(texts)} texts of {args.words} words, {sum(tokens)} scored '
          f'tokens ({min(tokens)} to {max(tokens)} a text), variant original; ours '
          f'{args.batch_size} copies a call', flush=True)
    results = {}
    def ours_call():
      results['ours'] = [s.pll for s in infer.score_texts(predictor, texts, 'original',
                                                          args.batch_size)]
    ours = cpu_vs_torch.Side('ours (infer.score_texts)', ours_call)
    sides = {'plain-loop': cpu_vs_torch.Side('theirs (plain loop)', lambda: results.__setitem__(
        'plain-loop', torch_plain_loop(model, tokenizer, texts, torch)))}
    if args.per_text_batch:
      sides['per-text-batch'] = cpu_vs_torch.Side(
          'theirs (a batch per text)', lambda: results.__setitem__(
              'per-text-batch', torch_per_text_batch(model, tokenizer, texts, torch)))
    for name, theirs in sides.items():
      print(f'{name}:', flush=True)
      ours.times.clear()
      cpu_vs_torch.alternate(ours, theirs, args.rounds, args.steps)
      ratio = theirs.median_s / ours.median_s
      verdict = f' (goal {GOAL}x: {"met" if ratio >= GOAL else "NOT met"})' if name == \
          'plain-loop' else ''
      difference = float(np.max(np.abs(np.subtract(results['ours'], results[name]))))
      print(f'{name}: ours {len(texts) / ours.median_s:.2f} texts/s '
            f'({ours.median_s:.3f} s), theirs {len(texts) / theirs.median_s:.2f} texts/s '
            f'({theirs.median_s:.3f} s): {ratio:.2f}x{verdict}; largest PLL difference '
            f'{difference:.2e}', flush=True)
      report[name] = {'ours_s': list(ours.times), 'theirs_s': theirs.times,
                      'ours_texts_per_s': len(texts) / ours.median_s,
                      'theirs_texts_per_s': len(texts) / theirs.median_s, 'ratio': ratio,
                      'max_pll_difference': difference}
  return cpu_vs_torch.finish_report(report, args.json)


if __name__ == '__main__':
  sys.exit(main())
