"""The table gpu.sh prints last: one row per train_step.py JSON in a folder, then the ratios
to the reference rows, and the loss curves' gap. It goes last because a device run returns
only the end of its output; it is also written to FOLDER/summary.json.

--pack DIR copies what is worth bringing back from a device machine (which returns at most
8 files) into DIR: summary.json, loss_curves.png and results.tgz (the folder without the raw
profiler traces and the curves' checkpoints). Run on its own after gpu.sh, it packs what a
run cut short by `timeout` left.

  python benchmarks/gpu_summary.py /tmp/gpu
  python benchmarks/gpu_summary.py /tmp/gpu --pack $OUT
"""

import argparse
import json
import pathlib
import shutil
import tarfile


def load(folder: pathlib.Path) -> dict[str, dict]:
  """{variant name (the JSON's stem): train_step.py's report} for each report in `folder`."""
  reports = {}
  for path in sorted(folder.glob('*.json')):
    report = json.loads(path.read_text())
    if isinstance(report, dict) and 'tokens_per_s_median' in report:
      reports[path.stem] = report
  return reports


def _percent(x: float | None) -> str:
  return 'n/a' if x is None else f'{x * 100:.1f}%'


def row(name: str, r: dict) -> dict:
  mfu = {peak: m['median'] for peak, m in r.get('mfu', {}).items()}
  peak = r['peak_device_bytes']
  return {'variant': name, 'step_ms': r['step_ms_median'], 'tokens_per_s': r['tokens_per_s_median'],
          'mfu_790': mfu.get('790'), 'mfu_989': mfu.get('989'),
          'peak_gib': None if peak is None else peak / 2**30,
          'ratio_to_anchors': r.get('ratio_to_anchors', {})}


def print_table(rows: list[dict]) -> None:
  print(f'{"variant":28s} {"step ms":>9s} {"tokens/s":>12s} {"MFU 790":>8s} {"MFU 989":>8s} '
        f'{"peak GiB":>9s}   (median step; MFU by the FLOPs the step executes)')
  for r in rows:
    gib = 'n/a' if r['peak_gib'] is None else f'{r["peak_gib"]:.2f}'
    print(f'{r["variant"]:28s} {r["step_ms"]:9.2f} {r["tokens_per_s"]:12,.0f} '
          f'{_percent(r["mfu_790"]):>8s} {_percent(r["mfu_989"]):>8s} {gib:>9s}')
  for r in rows:
    for anchor, ratio in r['ratio_to_anchors'].items():
      print(f'  {r["variant"]} / {anchor}: {ratio:.2f}x (back-to-back tokens/s)')


def curves(folder: pathlib.Path) -> dict | None:
  path = folder / 'curves' / 'loss_curves.json'
  return json.loads(path.read_text()) if path.is_file() else None


# Left out of results.tgz: large, and not read back (the profile's top ops are in the JSON).
UNPACKED = ('.pb', '.pb.gz', '.tfevents', 'checkpoints', 'export')


def pack(folder: pathlib.Path, into: pathlib.Path) -> None:
  into.mkdir(parents=True, exist_ok=True)
  for path in (folder / 'summary.json', folder / 'curves' / 'loss_curves.png'):
    if path.is_file():
      shutil.copy(path, into)
  keep = lambda info: None if any(part in info.name for part in UNPACKED) else info
  with tarfile.open(into / 'results.tgz', 'w:gz') as tar:
    tar.add(folder, arcname=folder.name, filter=keep)
  print(f'packed into {into}: {sorted(p.name for p in into.iterdir())}')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('folder', type=pathlib.Path)
  parser.add_argument('--pack', type=pathlib.Path, default=None, metavar='DIR')
  args = parser.parse_args()
  folder = args.folder
  rows = [row(name, r) for name, r in load(folder).items()]
  print_table(rows)
  gap = curves(folder)
  if gap:
    print(f'loss curves (float32 vs bf16, {gap["logged_steps"]} logged steps): max |gap| '
          f'{gap["max_abs_loss_gap"]:.4f}, mean {gap["mean_abs_loss_gap"]:.4f}; final eval '
          f'perplexity {gap["final_eval_perplexity"]}')
  (folder / 'summary.json').write_text(json.dumps({'rows': rows, 'curves': gap}, indent=1))
  if args.pack:
    pack(folder, args.pack)


if __name__ == '__main__':
  main()
