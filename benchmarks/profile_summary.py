"""Per-op device time from a `jax.profiler` trace: where a compiled step spends its time.

`summarize(trace_dir)` reads the newest `*.xplane.pb` under `trace_dir` with
`jax.profiler.ProfileData` and sums the durations of the device's kernel events by name
(XLA's op names: `fusion.12`, `cublas...gemm`, `input_scatter_fusion`, ...), so the top
rows say which ops to work on. The optimized HLO of the step (written beside the trace
by `train_step.py --profile`) maps a fusion's name to what it computes.
"""

import collections
import pathlib

from jax.profiler import ProfileData


def _device_planes(profile: ProfileData) -> list:
  return [p for p in profile.planes if p.name.startswith('/device:')]


def _kernel_lines(plane) -> list:
  """The 'XLA Ops' line where the plane has one (one event per HLO op), else every stream."""
  lines = list(plane.lines)
  ops = [line for line in lines if line.name == 'XLA Ops']
  return ops or [line for line in lines if line.name.startswith('Stream')]


def summarize(trace_dir: str, steps: int, top: int = 25) -> dict:
  """{total_ms_per_step, rows: [(name, ms per step, share, count per step)]} of the device."""
  files = sorted(pathlib.Path(trace_dir).rglob('*.xplane.pb'), key=lambda p: p.stat().st_mtime)
  if not files:
    return {'error': f'no .xplane.pb under {trace_dir}'}
  profile = ProfileData.from_file(str(files[-1]))
  times, counts = collections.Counter(), collections.Counter()
  planes = _device_planes(profile)
  for plane in planes:
    for line in _kernel_lines(plane):
      for event in line.events:
        times[event.name] += event.duration_ns
        counts[event.name] += 1
  total = sum(times.values())
  if not total:
    return {'error': f'no device kernel events in {files[-1]} (planes: '
                     f'{[p.name for p in profile.planes]})'}
  rows = [(name, ns / steps / 1e6, ns / total, counts[name] / steps)
          for name, ns in times.most_common(top)]
  return {'total_ms_per_step': total / steps / 1e6, 'rows': rows,
          'planes': [p.name for p in planes]}


def print_summary(summary: dict) -> None:
  if 'error' in summary:
    print(f'profile: {summary["error"]}')
    return
  print(f'profile: {summary["total_ms_per_step"]:.2f} ms of device kernels per step '
        f'({summary["planes"]}); top ops:')
  for name, ms, share, count in summary['rows']:
    print(f'  {ms:8.3f} ms  {share * 100:5.1f}%  x{count:<5g} {name[:110]}')
