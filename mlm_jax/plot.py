"""Plots a run's curves: `python -m mlm_jax.plot WORKDIR` writes WORKDIR/curves.png."""

import sys

from mlm_jax import metric_writers
from mlm_jax import storage


def plot_curves(workdir: str) -> str:
  """Train loss and eval perplexity against step; returns the PNG's path."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  records = metric_writers.read_metrics(workdir)
  train = [(r['step'], r['loss']) for r in records if 'loss' in r]
  evals = [(r['step'], r['eval_perplexity']) for r in records if 'eval_perplexity' in r]
  if not train and not evals:
    raise FileNotFoundError(f'{workdir} has no metrics.jsonl records to plot')
  figure, (loss_axis, perplexity_axis) = plt.subplots(1, 2, figsize=(11, 4))
  if train:
    loss_axis.plot(*zip(*train), label='train loss (masked tokens)')
  loss_axis.set(xlabel='step', ylabel='cross-entropy', title='Train loss')
  if evals:
    perplexity_axis.plot(*zip(*evals), marker='o', color='tab:orange')
  perplexity_axis.set(xlabel='step', ylabel='perplexity', yscale='log',
                      title='Held-out perplexity')
  for axis in (loss_axis, perplexity_axis):
    axis.grid(alpha=0.3)
  figure.tight_layout()
  path = storage.path(workdir) / 'curves.png'
  with path.open('wb') as f:
    figure.savefig(f, format='png', dpi=120)
  plt.close(figure)
  return str(path)


def main(argv: list[str]) -> int:
  if len(argv) != 2:
    print('usage: python -m mlm_jax.plot WORKDIR', file=sys.stderr)
    return 2
  try:
    print(plot_curves(argv[1]))
  except FileNotFoundError as e:
    print(f'error: {e}; pass the --workdir of a training run', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
