"""Loss curves of the float32 step against a faster variant, on the same data and seed.

Trains the same config twice with `run_train.py` (the package's real loop, data, masking
and evaluation), once as the reference (float32) and once as the variant (default:
bfloat16 computation, `--attention` picking `config.attention_impl`), then plots both
train-loss and eval-perplexity curves into one PNG and prints how far apart they are.
Same seed, so both runs see the same batches, masks and dropout keys: what differs is
the arithmetic alone, and the gap should be bf16 noise, not a trend.

  python benchmarks/loss_curves.py --out=/tmp/curves                       # default config
  python benchmarks/loss_curves.py --out=$OUT/curves --steps=300 --config.per_device_batch_size=64

`--fresh_modernbert=POSITIONS` trains both from one fresh ModernBERT of 6 layers x 256 (4 heads,
global attention every 3rd layer, window 128) with a BPE tokenizer of the shipped sample
(`tests/tiny_models.py`), saved in OUT/model; at long lengths, for instance:

  python benchmarks/loss_curves.py --out=/tmp/curves4k --steps=120 --fresh_modernbert=4096 \
      --config=configs/modernbert.py --reference_attention=auto --attention=auto \
      --config.block_size=4096 --config.per_device_batch_size=1 --config.dataset= \
      --config.learning_rate=1e-3 --config.warmup_steps=10
"""

import argparse
import json
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def parse_args() -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--config', default=str(REPO_ROOT / 'configs' / 'default.py'))
  parser.add_argument('--out', required=True, help='folder for the two workdirs and the PNG')
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--dtype', default='bfloat16', help="the variant's config.dtype")
  parser.add_argument('--attention', default='xla', help="the variant's config.attention_impl")
  parser.add_argument('--reference_attention', default='xla',
                      help="the float32 reference's config.attention_impl")
  parser.add_argument('--fresh_modernbert', type=int, default=0, metavar='POSITIONS',
                      help='train both from a fresh 6 x 256 ModernBERT of POSITIONS positions')
  args, overrides = parser.parse_known_args()
  return args, overrides  # Extra --config.KEY=VALUE flags go to both runs.


def train(config: str, workdir: pathlib.Path, steps: int, fields: dict,
          overrides: list[str]) -> list[dict]:
  flags = [f'--config.{key}={value}' for key, value in fields.items()]
  command = [sys.executable, str(REPO_ROOT / 'run_train.py'), f'--config={config}',
             f'--workdir={workdir}', f'--config.num_train_steps={steps}',
             f'--config.eval_every_steps={max(steps // 6, 1)}', '--config.log_every_steps=5',
             *flags, *overrides]
  print('$', ' '.join(command[1:]), flush=True)
  subprocess.run(command, check=True, cwd=REPO_ROOT)
  lines = (workdir / 'metrics.jsonl').read_text(encoding='utf-8').splitlines()
  return [json.loads(line) for line in lines if line.strip()]


def series(records: list[dict], key: str) -> dict[int, float]:
  return {r['step']: r[key] for r in records if key in r}


def plot(curves: dict[str, list[dict]], path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  figure, (loss_axis, perplexity_axis) = plt.subplots(1, 2, figsize=(11, 4))
  for name, records in curves.items():
    loss_axis.plot(*zip(*sorted(series(records, 'loss').items())), label=name, alpha=0.8)
    perplexity_axis.plot(*zip(*sorted(series(records, 'eval_perplexity').items())),
                         marker='o', label=name)
  loss_axis.set(xlabel='step', ylabel='cross-entropy', title='Train loss (masked tokens)')
  perplexity_axis.set(xlabel='step', ylabel='perplexity', yscale='log',
                      title='Held-out perplexity')
  for axis in (loss_axis, perplexity_axis):
    axis.grid(alpha=0.3)
    axis.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=120)


def compare(reference: list[dict], variant: list[dict]) -> dict:
  """Largest and mean |difference| of the train loss; final eval perplexities."""
  ref_loss, var_loss = series(reference, 'loss'), series(variant, 'loss')
  gaps = [abs(ref_loss[s] - var_loss[s]) for s in ref_loss.keys() & var_loss.keys()]
  ref_ppl, var_ppl = series(reference, 'eval_perplexity'), series(variant, 'eval_perplexity')
  last = max(ref_ppl.keys() & var_ppl.keys())
  return {'logged_steps': len(gaps), 'max_abs_loss_gap': max(gaps),
          'mean_abs_loss_gap': sum(gaps) / len(gaps), 'final_step': last,
          'final_eval_perplexity': {'reference': ref_ppl[last], 'variant': var_ppl[last]}}


def main() -> None:
  args, overrides = parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.fresh_modernbert:
    sys.path.insert(0, str(REPO_ROOT))
    from tests import tiny_models  # pylint: disable=import-outside-toplevel
    tiny_models.save_modernbert(str(out / 'model'), positions=args.fresh_modernbert,
                                hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                                num_attention_heads=4, local_attention=128)
    overrides = [f'--config.model_name_or_path={out / "model"}', *overrides]
  reference = {'dtype': 'float32', 'attention_impl': args.reference_attention}
  variant_fields = {'dtype': args.dtype, 'attention_impl': args.attention}
  names = {'reference': f'float32, {args.reference_attention} attention',
           'variant': f'{args.dtype}, {args.attention} attention'}
  curves = {names['reference']: train(args.config, out / 'reference', args.steps, reference,
                                      overrides),
            names['variant']: train(args.config, out / 'variant', args.steps, variant_fields,
                                    overrides)}
  plot(curves, out / 'loss_curves.png')
  result = compare(*curves.values())
  (out / 'loss_curves.json').write_text(json.dumps(result, indent=1))
  print(json.dumps(result, indent=1))
  print(f'wrote {out / "loss_curves.png"}')


if __name__ == '__main__':
  main()
