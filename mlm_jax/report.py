"""What a run tells its user: progress lines, the closing summary, and the hub upload."""

import math

import jax

from mlm_jax import checkpoint
from mlm_jax import errors
from mlm_jax import metrics as metrics_lib
from mlm_jax import storage


def log(message: str) -> None:
  """Prints on process 0 only, so a pod's hosts do not repeat each other."""
  if jax.process_index() == 0:
    print(message, flush=True)


def describe_blocks(sources) -> str:
  """'N train / M test blocks', and for a mixture each source's with its share of the rows."""
  def count(split: str) -> int:
    return sum(len(getattr(s.blocks, split)) for s in sources)
  text = f'{count("train")} train / {count("test")} test blocks'
  if len(sources) > 1:
    total = sum(s.weight for s in sources)
    text += ' (' + ', '.join(f'{s.name}: {len(s.blocks.train)} / {len(s.blocks.test)}, '
                             f'{s.weight / total:.0%} of the rows' for s in sources) + ')'
  return text


def describe_eval(step: int, figures: dict) -> str:
  """An evaluation in one line: the overall perplexity, then each source's."""
  parts = [f'step {step}: eval perplexity {figures["eval_perplexity"]:.3f}']
  parts += [f'{name} {own["perplexity"]:.3f}'
            for name, own in metrics_lib.by_source(figures).items()]
  return ', '.join(parts)


def summary(run, records: list[dict], wall: float, steps_run: int,
            final_step: int | None = None) -> dict:
  """The run's closing figures, from its metrics records (see `metric_writers.read_metrics`).

  `final_step` is where the run ended (default: its last step; earlier when it stopped
  early). With `keep_best_by`, `best_step` and `best_perplexity` are the evaluation after
  training (step > 0) with the lowest loss, the first of equals, as `early_stopping.Record`
  chooses it: the exported checkpoint's. A mixture's adds each source's perplexity before
  and after (`perplexity_by_source`).
  """
  evals = [r for r in records if 'eval_perplexity' in r]
  tokens = steps_run * run.global_batch_size * run.config.block_size
  final_step = run.total_steps if final_step is None else final_step
  best = {}
  key = run.config.keep_best_by
  trained = [r for r in evals if r['step'] > 0 and math.isfinite(r[key])] if key else []
  if trained:
    chosen = min(trained, key=lambda r: r[key])  # The first of equals.
    # The perplexity of what `key` is the loss of: all the eval sets, or one source's.
    perplexity = key.removesuffix('loss') + 'perplexity' if key.startswith('eval/') else 'eval_perplexity'
    best = {'best_step': chosen['step'], 'best_perplexity': chosen[perplexity]}
  first, last = (metrics_lib.by_source(evals[i]) if evals else {} for i in (0, -1))
  by_source = {name: {'perplexity_before': first.get(name, {}).get('perplexity', float('nan')),
                      'perplexity_after': own['perplexity'], 'eval_loss': own['loss']}
               for name, own in last.items()}
  return {
      'steps': final_step, 'planned_steps': run.total_steps,
      'stopped_early': final_step < run.total_steps, **best,
      'steps_this_run': steps_run, 'wall_time_s': wall,
      'tokens_per_s': tokens / wall if wall > 0 else 0.0,
      'eval_loss': evals[-1]['eval_loss'] if evals else float('nan'),
      'perplexity_before': evals[0]['eval_perplexity'] if evals else float('nan'),
      'perplexity_after': evals[-1]['eval_perplexity'] if evals else float('nan'),
      'eval_accuracy': evals[-1]['eval_accuracy'] if evals else float('nan'),
      'checkpoint_dir': str(checkpoint.checkpoint_dir(run.workdir)),
      'export_dir': str(checkpoint.export_dir(run.workdir)),
      **({'perplexity_by_source': by_source} if by_source else {}),
  }


def print_summary(figures: dict) -> None:
  early = (f' (stopped early; {figures["planned_steps"]} planned)' if figures['stopped_early']
           else '')
  best = (f'  best: step {figures["best_step"]}, perplexity {figures["best_perplexity"]:.2f} '
          '(the export)\n' if 'best_step' in figures else '')
  log(f'Done: {figures["steps"]} steps{early} ({figures["steps_this_run"]} in this run) in '
      f'{figures["wall_time_s"]:.1f} s, {figures["tokens_per_s"]:,.0f} tokens/s.\n'
      f'  eval loss {figures["eval_loss"]:.4f}, accuracy {figures["eval_accuracy"]:.3f}\n'
      f'  perplexity {figures["perplexity_before"]:.2f} before -> '
      f'{figures["perplexity_after"]:.2f} after training\n' +
      ''.join(f'    {name}: {own["perplexity_before"]:.2f} -> {own["perplexity_after"]:.2f}\n'
              for name, own in figures.get('perplexity_by_source', {}).items()) + best +
      f'  checkpoints: {figures["checkpoint_dir"]}\n  export: {figures["export_dir"]}')


def push_to_hub(export_dir: str, repo_id: str) -> None:
  """Uploads the export; a failure is reported, never fatal (everything is saved)."""
  try:
    import huggingface_hub  # pylint: disable=import-outside-toplevel
    huggingface_hub.create_repo(repo_id, exist_ok=True)
    with storage.local_copy(export_dir) as local:
      huggingface_hub.upload_folder(repo_id=repo_id, folder_path=local)
    log(f'Pushed {export_dir} to https://huggingface.co/{repo_id}')
  except Exception as e:  # pylint: disable=broad-except
    log(f'push_to_hub failed ({errors.described(e)}); '
        f'the export is saved in {export_dir}: upload it later with '
        f'`hf upload {repo_id} {export_dir}`')  # huggingface_hub's command since its 1.0.
