"""Per-op time from a `jax.profiler` trace: where a compiled step spends its time.

`summarize(trace_dir, steps)` reads the newest `*.xplane.pb` under `trace_dir` with
`jax.profiler.ProfileData` and sums the durations of the compiled program's op events by
name (XLA's op names: `fusion.12`, `cublas...gemm`, `ynn_fusion.80`, ...), so the top rows
say which ops to work on. On GPU they are the device plane's kernel events; on CPU, where
there is no device plane, the events of XLA's CPU threads on the host plane (each a thunk:
one op run on one thread; the executor's own bookkeeping events are left out). CPU ops on
two threads overlap, so there the total is CPU time, not wall time.

With the step's optimized HLO (written beside the trace by `train_step.py --profile`),
`summarize` also adds the time up by what each op computes, from the op's `op_name`
metadata: the model's module path (layer numbers folded), forward or backward, or the
random bits, the masking and the optimizer.
"""

import collections
import pathlib
import re

from jax.profiler import ProfileData

# Events of XLA's CPU runtime that are not ops (they wrap or wait for them).
_CPU_BOOKKEEPING = re.compile(r'::|^Thunk|Await')


def _device_planes(profile: ProfileData) -> list:
  return [p for p in profile.planes if p.name.startswith('/device:')]


def _kernel_lines(plane) -> list:
  """The 'XLA Ops' line where the plane has one (one event per HLO op), else every stream."""
  lines = list(plane.lines)
  ops = [line for line in lines if line.name == 'XLA Ops']
  return ops or [line for line in lines if line.name.startswith('Stream')]


def _op_events(profile: ProfileData):
  """(plane names, the op events): the device's kernels, else XLA's CPU threads' thunks."""
  planes = _device_planes(profile)
  if planes:
    return [p.name for p in planes], [e for p in planes for line in _kernel_lines(p)
                                      for e in line.events]
  host = [p for p in profile.planes if p.name == '/host:CPU']
  events = [e for p in host for line in p.lines if line.name.startswith('tf_XLA')
            for e in line.events if not _CPU_BOOKKEEPING.search(e.name)]
  return [f'{p.name} (XLA CPU threads)' for p in host], events


def op_names(hlo_text: str) -> dict[str, str]:
  """{HLO instruction name: its op_name metadata} of an optimized HLO module's text."""
  pattern = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"', re.MULTILINE)
  return {name: op_name for name, op_name in pattern.findall(hlo_text)}


def what_it_computes(op_name: str) -> str:
  """A readable bucket for an op_name: the model's module path with layer numbers folded,
  forward or backward; random bits, masking, or the optimizer and the rest of the step."""
  if re.search(r'threefry|random_bits|_bernoulli|_uniform|_randint|rng_bit', op_name):
    kind = 'dropout' if re.search(r'Dropout|_bernoulli', op_name) else 'masking'
    return f'random bits ({kind})'
  if 'mask_tokens' in op_name or 'mask_micro_batches' in op_name:
    return 'masking (the rest)'
  model = re.search(r'(transpose\()?jvp\((\w*)\)\)?/?([^;]*)', op_name)
  if not model:
    return 'optimizer, loss and the rest of the step'
  path = re.sub(r'/\d+/', '/*/', model.group(3) + '/')
  path = '/'.join(part for part in path.split('/')[:-2] if part and '(' not in part)
  return f'{"backward" if model.group(1) else "forward"}: {path or "(top level)"}'


def summarize(trace_dir: str, steps: int, top: int = 25) -> dict:
  """{total_ms_per_step, rows: [(name, ms per step, share, count per step)], groups:
  [(what it computes, ms per step, share)] (with the HLO beside the trace), planes}."""
  files = sorted(pathlib.Path(trace_dir).rglob('*.xplane.pb'), key=lambda p: p.stat().st_mtime)
  if not files:
    return {'error': f'no .xplane.pb under {trace_dir}'}
  profile = ProfileData.from_file(str(files[-1]))
  planes, events = _op_events(profile)
  times, counts = collections.Counter(), collections.Counter()
  for event in events:
    times[event.name] += event.duration_ns
    counts[event.name] += 1
  total = sum(times.values())
  if not total:
    return {'error': f'no op events in {files[-1]} (planes: '
                     f'{[p.name for p in profile.planes]})'}
  rows = [(name, ns / steps / 1e6, ns / total, counts[name] / steps)
          for name, ns in times.most_common(top)]
  summary = {'total_ms_per_step': total / steps / 1e6, 'rows': rows, 'planes': planes}
  hlo = pathlib.Path(trace_dir) / 'train_step.hlo.txt'
  if hlo.is_file():
    names = op_names(hlo.read_text())
    groups = collections.Counter()
    for name, ns in times.items():
      groups[what_it_computes(names.get(name, ''))] += ns
    summary['groups'] = [(what, ns / steps / 1e6, ns / total) for what, ns in groups.most_common()]
  return summary


def print_summary(summary: dict) -> None:
  if 'error' in summary:
    print(f'profile: {summary["error"]}')
    return
  print(f'profile: {summary["total_ms_per_step"]:.2f} ms of op time per step '
        f'({summary["planes"]}); top ops:')
  for name, ms, share, count in summary['rows']:
    print(f'  {ms:8.3f} ms  {share * 100:5.1f}%  x{count:<5g} {name[:110]}')
  if 'groups' in summary:
    print('by what the ops compute:')
    for what, ms, share in summary['groups']:
      print(f'  {ms:8.3f} ms  {share * 100:5.1f}%  {what}')
